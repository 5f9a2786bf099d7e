"""Real daemons for tests: `cake-swarm up` subprocesses, their logs, and their cleanup."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
import urllib.request
from pathlib import Path

from tests.checkpoints import require_demo

REPO = Path(__file__).resolve().parents[1]


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a daemon's API, with the next one free for its peer port. Taken below the kernel's
    ephemeral range: a port from that range can be taken by some other connection's local end between
    this check and the daemon's bind (CI saw it happen). Never the same port twice in one test run."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(max(1024, low - 12000), low - 1)
        if port in _handed_out or port + 1 in _handed_out:
            continue
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind((host, p))
        except OSError:
            continue
        _handed_out.update((port, port + 1))
        return port
    raise RuntimeError(f"no two free ports in a row below {low} on {host}")


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def needs_demo(args) -> bool:
    return any(a == "--model" and b == "demo" for a, b in zip(args, args[1:]))


class Daemon:
    """One `cake-swarm up` process; `popen` lets a namespace wrap the command.

    A daemon started with `--model demo` first makes sure the demo's files can be had (the test skips
    when they cannot), so that it never fails on a download it cannot make."""

    def __init__(self, name: str, host: str, port: int, args: list[str], log_dir: Path, env: dict | None = None,
                 popen=subprocess.Popen):
        if needs_demo(args):
            require_demo()
        self.name, self.host, self.port = name, host, port
        self.url = f"http://{host}:{port}"
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "swarm.cli", "up", "--name", name, "--host", host, "--port", str(port), *args]
        self.proc = popen(cmd, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1",
                               "XDG_CONFIG_HOME": str(log_dir / f"{name}-config"), **(env or {})})

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
        dead = [d for d in daemons if d.proc.poll() is not None]
        if dead:
            raise AssertionError(f"{', '.join(d.name for d in dead)} exited while waiting for {what}\n"
                                 + "\n".join(f"--- {d.name} ---\n{d.log()[-3000:]}" for d in dead))
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


# --- helpers for the web tests ---------------------------------------------------------------------------

SOLO_CHAT = "The little dog wanted to"   # the solo_demo fixture's reference prompt (tests/conftest.py)
SOLO_MAX_TOKENS = 30

DEMO_SPLIT_BUDGET = "700000"  # the demo needs 1.06 MB with its KV cache (512 positions): two such nodes split it 0-2 | 3-4


class KeyedDaemon(Daemon):
    """A daemon started with `--api-key`: state() presents the key."""

    def __init__(self, *args, api_key: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.api_key = api_key

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def state(self) -> dict:
        request = urllib.request.Request(self.url + "/api/swarm", headers=self.auth)
        with urllib.request.urlopen(request, timeout=5.0) as r:
            return json.loads(r.read())


def demo_pair(tmp: Path, api_key: str | None = None, args_a: tuple = (), args_b: tuple = ()) -> list[KeyedDaemon]:
    """Two daemons on 127.0.0.1 running the demo as a two-stage pipeline: "a" holds the model and
    layers 0-2 (speed pinned higher), "b" pulls layers 3-4 from it. Demo conversion goes into tmp/xdg;
    each node has its own shard cache. The caller stops both (this stops them only when it raises)."""
    env = {"XDG_CACHE_HOME": str(tmp / "xdg")}
    keyed = ("--api-key", api_key) if api_key else ()
    daemons: list[KeyedDaemon] = []
    try:
        port_a = free_port()
        daemons.append(KeyedDaemon("a", "127.0.0.1", port_a, [
            "--model", "demo", "--no-mdns", "--speed", "2", "--memory-budget", DEMO_SPLIT_BUDGET,
            "--cache-dir", str(tmp / "cache-a"), *keyed, *args_a], tmp, env, api_key=api_key))
        daemons.append(KeyedDaemon("b", "127.0.0.1", free_port(), [
            "--peer", f"127.0.0.1:{port_a}", "--no-mdns", "--speed", "1", "--memory-budget", DEMO_SPLIT_BUDGET,
            "--cache-dir", str(tmp / "cache-b"), *keyed, *args_b], tmp, env, api_key=api_key))
        return daemons
    except BaseException:
        for d in daemons:
            d.stop()
        raise


def cli_generate(tmp: Path, *args: str, timeout: float = 120.0) -> str:
    """stdout of `cake-swarm generate --model demo ARGS` (single node, no daemon), without its final newline."""
    require_demo()
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "demo", *args], cwd=REPO,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp / "xdg")}, capture_output=True, text=True,
                         timeout=timeout, check=True)
    return out.stdout[:-1] if out.stdout.endswith("\n") else out.stdout


def own_sessions(daemon) -> dict:
    """The daemon's own stage sessions and requests, live (a peer's entry is as old as its last heartbeat)."""
    state = daemon.state()
    return {"stage_sessions": state["nodes"][0]["sessions"], "requests": state["sessions"]}


def wait_idle(daemons) -> None:
    wait_for(lambda: all(own_sessions(d) == {"stage_sessions": 0, "requests": 0} for d in daemons), 30,
             "every session to be freed on every stage", daemons)


@contextmanager
def ready_swarm(daemons, nodes: int):
    """The daemons once they agree the swarm is ready; stopped on the way out, whatever happened."""
    try:
        wait_ready(daemons, nodes=nodes)
        yield daemons
    finally:
        for d in daemons:
            d.stop()
