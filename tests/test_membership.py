"""Joining a ready swarm makes a new epoch that the next request uses; a wrong cluster key never gets in."""

import asyncio
import os
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from swarm import auth
from swarm.protocol import decode_frame, encode_frame
from swarm.tls import client_context, seen_fingerprint
from tests.swarm_harness import REPO, Daemon, chat_ws, free_port, wait_for, wait_ready

PROMPT = [1, 403, 407, 261, 378]


@pytest.fixture
def swarm(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    key = uuid.uuid4().hex
    daemons = []

    def start(name, speed, *extra, cluster_key=key):
        args = ["--memory-budget", "450000", "--max-context", "256", "--speed", speed, "--cluster-key", cluster_key,
                "--cache-dir", str(tmp_path / name), "--config-dir", str(tmp_path / f"{name}-config"), *extra]
        daemons.append(Daemon(name, "127.0.0.1", free_port(), args, tmp_path, env))
        return daemons[-1]

    try:
        yield start, daemons, env, key
    finally:
        for d in daemons:
            d.stop()


def expected_ids(env, max_tokens=30):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "demo", "--prompt-ids",
                          ",".join(map(str, PROMPT)), "--max-tokens", str(max_tokens), "--output", "ids"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, check=True)
    return [int(t) for t in out.stdout.split(",")]


def test_join_makes_new_epoch_used_by_next_request(swarm):
    start, daemons, env, _ = swarm
    a = start("a", "2", "--model", "demo")
    b = start("b", "1")
    first = wait_ready([a, b], nodes=2)[0]
    assert [(s["name"], s["start"], s["end"]) for s in first["plan"]] == [("a", 0, 3), ("b", 3, 5)]
    expected = expected_ids(env)
    assert chat_ws(b.url, {"prompt_ids": PROMPT, "max_tokens": 30})["done"]["token_ids"] == expected

    c = start("c", "5")  # the fastest node joins: the two fastest now hold the model
    states = wait_ready([a, b, c], nodes=3)
    assert states[0]["epoch"] > first["epoch"]
    assert [(s["name"], s["start"], s["end"]) for s in states[0]["plan"]] == [("c", 0, 3), ("a", 3, 5)]
    result = chat_ws(b.url, {"prompt_ids": PROMPT, "max_tokens": 30})
    assert result["done"]["token_ids"] == expected
    assert c.state()["nodes"][0]["state"] == "loaded"


def test_wrong_cluster_key_is_never_admitted(swarm):
    start, daemons, env, key = swarm
    a = start("a", "2", "--model", "demo", "--no-mdns", "--memory-budget", "2MB")
    intruder = start("x", "9", "--no-mdns", "--peer", f"127.0.0.1:{a.port}", cluster_key="not-the-key")
    wait_ready([a], nodes=1)
    # the intruder dials a, is refused, and keeps trying: a never lists it
    wait_for(lambda: intruder.state()["refused"], 20, "the intruder to be refused", [a, intruder])
    time.sleep(2)
    assert [n["name"] for n in a.state()["nodes"]] == ["a"]
    assert intruder.state()["plan"] == []

    async def impostor():
        """Claims a's cluster id (public in mDNS) without the key: the challenge-response fails."""
        peer_port = a.state()["nodes"][0]["peer_port"]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context())) as http, \
                http.ws_connect(f"https://127.0.0.1:{peer_port}/peer") as ws:
            hello = decode_frame((await ws.receive()).data)
            assert hello["cluster"] == auth.cluster_id(key)
            await ws.send_bytes(encode_frame({"t": "auth", "node_id": "impostor", "challenge": auth.new_challenge(),
                                              "response": auth.respond("guess", hello["challenge"], "impostor",
                                                                       seen_fingerprint(ws))}))
            reply = await ws.receive()
            error = decode_frame(reply.data) if reply.type == aiohttp.WSMsgType.BINARY else None
            closed = await ws.receive()
            return error, closed.type

    error, closed = asyncio.run(impostor())
    assert error["t"] == "error" and "authentication failed" in error["message"]
    assert closed in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert [n["name"] for n in a.state()["nodes"]] == ["a"]
    assert "bad cluster key" in a.log()
