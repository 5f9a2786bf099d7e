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


async def test_a_node_a_peer_names_is_redialed_until_it_answers(tmp_path):
    """A joining node learns the others from its first peer's welcome. One that does not answer at once (a
    link just back up, a SYN lost) is dialed again each heartbeat until it does: here b is reachable only
    through a relay that opens 1.5 s after c joined a."""
    from swarm.membership import Membership
    from swarm.tls import load_identity

    key, relay_port = uuid.uuid4().hex, free_port()
    nodes = {}

    def member(name: str, peer_port_told: int = 0) -> Membership:
        info = lambda: {"name": name, "addr": "127.0.0.1", "port": peer_port_told or nodes[name].peer_port,  # noqa: E731
                        "peer_port": peer_port_told or nodes[name].peer_port}
        nodes[name] = Membership(name, key, info, lambda peer: None, lambda peer, why: None, lambda peer_id, frame: None)
        return nodes[name]

    a, b, c = member("a"), member("b", peer_port_told=relay_port), member("c")
    relay = None
    try:
        for name, m in nodes.items():
            await m.start("127.0.0.1", 0, load_identity(tmp_path / name))
        assert await b.dial("127.0.0.1", a.peer_port) is not None
        assert await c.dial("127.0.0.1", a.peer_port) is not None  # a's welcome names b, at the relay's port
        await asyncio.sleep(0.3)
        assert "b" not in c.peers  # nothing listens there yet

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        async def forward(reader, writer):
            to_reader, to_writer = await asyncio.open_connection("127.0.0.1", b.peer_port)
            await asyncio.gather(pipe(reader, to_writer), pipe(to_reader, writer), return_exceptions=True)

        await asyncio.sleep(1.2)
        relay = await asyncio.start_server(forward, "127.0.0.1", relay_port)
        deadline = time.monotonic() + 10
        while "b" not in c.peers or c.peers["b"].link is None:
            assert time.monotonic() < deadline, f"c never joined b: {sorted(c.peers)}"
            await asyncio.sleep(0.1)
    finally:
        if relay is not None:
            relay.close()
        for m in nodes.values():
            await m.close()
