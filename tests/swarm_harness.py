"""Real daemons for tests: `cake-swarm up` subprocesses, their logs, and their cleanup."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Daemon:
    """One `cake-swarm up` process; `popen` lets a namespace wrap the command."""

    def __init__(self, name: str, host: str, port: int, args: list[str], log_dir: Path, env: dict | None = None,
                 popen=subprocess.Popen):
        self.name, self.host, self.port = name, host, port
        self.url = f"http://{host}:{port}"
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "swarm.cli", "up", "--name", name, "--host", host, "--port", str(port), *args]
        self.proc = popen(cmd, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def state(self) -> dict:
        return get_json(self.url + "/api/swarm")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for(predicate, timeout: float, what: str, daemons=()):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError as e:
            last_error = e
        time.sleep(0.2)
    logs = "\n".join(f"--- {d.name} ---\n{d.log()[-3000:]}" for d in daemons)
    raise AssertionError(f"timed out waiting for {what} ({last_error})\n{logs}")


def wait_ready(daemons, timeout: float = 90.0, nodes: int | None = None) -> list[dict]:
    """Until every daemon reports the swarm ready on one epoch (with `nodes` nodes, when given)."""
    def check():
        states = [d.state() for d in daemons]
        epochs = {s["epoch"] for s in states}
        if all(s["ready"] for s in states) and len(epochs) == 1 and \
                (nodes is None or all(len(s["nodes"]) == nodes for s in states)):
            return states
        return None
    return wait_for(check, timeout, "the swarm to be ready", daemons)


def chat_ws(url: str, body: dict, timeout: float = 60.0) -> dict:
    """Send one /ws/chat request; returns {"text", "ids", "done"|"error"}."""
    import asyncio

    import aiohttp

    async def run():
        text, ids = "", []
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws/chat") as ws:
            await ws.send_json(body)
            while True:
                msg = await ws.receive(timeout=timeout)
                frame = json.loads(msg.data)
                if frame["type"] == "token":
                    text += frame["text"]
                    ids.append(frame["id"])
                else:
                    return {"text": text, "ids": ids, frame["type"]: frame}
    return asyncio.run(run())
