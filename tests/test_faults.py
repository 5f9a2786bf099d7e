"""Faults on loopback, with real daemons: a stage killed mid-stream, the source gone, strangers at the door.

The kill test runs four nodes with budgets that hold two of the demo's five layers each. The fastest
strategy fills the fastest nodes first, so the plan uses a, b, c (2/2/1) and leaves the slowest, d, as
a spare: with b killed, a, c and d still hold the model and the swarm can replan without it. b comes
back with the same --cache-dir and, being faster than d, takes its layers back from the shard it cached.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest

from swarm import auth
from swarm.protocol import decode_frame, encode_frame
from tests.swarm_harness import Daemon, chat_ws, free_port, wait_for, wait_ready
from tests.test_swarm import single_node_ids

BUDGET = "300000"                 # two demo layers (+ KV for --max-context 256, + embedding or head) per node
PROMPT = [1, 17, 99, 212, 3, 300, 42]
LONG = 200                        # greedy on PROMPT runs to max_tokens: no EOS before 240 tokens
ERROR_WITHIN_S = 5.0              # the client hears of the fault within this, or the test fails
READY_WITHIN_S = 15.0


class Swarm:
    """Daemons on loopback in one cluster of their own; the first one named holds the demo model."""

    def __init__(self, tmp_path: Path, *extra: str):
        self.tmp_path, self.extra = tmp_path, list(extra)
        self.env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
        self.key = uuid.uuid4().hex
        self.daemons: dict[str, Daemon] = {}
        self.seed: Daemon | None = None

    def start(self, name: str, speed: str, *extra: str, port: int | None = None) -> Daemon:
        args = ["--memory-budget", BUDGET, "--max-context", "256", "--speed", speed, "--cluster-key", self.key,
                "--cache-dir", str(self.tmp_path / name), "--no-mdns", *self.extra, *extra]
        if self.seed is None or self.seed.name == name:
            args += ["--model", "demo"]
        else:
            args += ["--peer", f"127.0.0.1:{self.seed.port}"]
        d = Daemon(name, "127.0.0.1", port or free_port(), args, self.tmp_path, self.env)
        self.seed = self.seed or d
        self.daemons[name] = d
        return d

    def __getitem__(self, name: str) -> Daemon:
        return self.daemons[name]

    def alive(self) -> list[Daemon]:
        return [d for d in self.daemons.values() if d.proc.poll() is None]

    def expected(self, max_tokens: int) -> list[int]:
        return single_node_ids("demo", PROMPT, max_tokens, {**os.environ, **self.env})

    def stop(self) -> None:
        for d in self.daemons.values():
            d.stop()


@pytest.fixture
def swarm(tmp_path):
    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def plan_of(state: dict) -> list[tuple[str, int, int]]:
    return [(s["name"], s["start"], s["end"]) for s in state["plan"]]


def chat_with_fault(url: str, body: dict, fault, within: float = ERROR_WITHIN_S) -> dict:
    """Stream a /ws/chat answer and call fault() once the first token arrived.

    Returns {"tokens": tokens received, "end": the last frame, "at": time.monotonic() of the fault, "after_s":
    seconds from the fault to the last frame}; fails if the stream ends any other way or nothing ends it
    within `within` seconds of the fault."""
    async def run():
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws/chat") as ws:
            await ws.send_json(body)
            tokens, faulted = 0, None
            while True:
                left = None if faulted is None else within - (time.monotonic() - faulted)
                try:
                    msg = await ws.receive(timeout=max(left, 0.001) if left is not None else 30.0)
                except asyncio.TimeoutError:
                    raise AssertionError(f"no error frame within {within} s of the fault ({tokens} tokens)") from None
                assert msg.type == aiohttp.WSMsgType.TEXT, f"the chat socket ended with {msg.type.name}, not a frame"
                frame = json.loads(msg.data)
                if frame["type"] != "token":
                    return {"tokens": tokens, "end": frame, "at": faulted,
                            "after_s": None if faulted is None else time.monotonic() - faulted}
                tokens += 1
                if faulted is None:
                    faulted = time.monotonic()
                    fault()
    return asyncio.run(run())


def shard_files(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """Cached shard files -> (inode, mtime_ns): a second download would replace them."""
    out = {}
    for f in cache_dir.glob("shards/*/*/model.safetensors"):
        st = f.stat()
        out[f.parent.name] = (st.st_ino, st.st_mtime_ns)
    return out


def recovered(daemons, plan: list[tuple[str, int, int]], since: float, timeout: float = READY_WITHIN_S) -> float:
    """Seconds from `since` (a time.monotonic()) until every daemon is ready on one epoch with this plan;
    fails `timeout` seconds after `since`."""

    def check():
        states = [d.state() for d in daemons]
        return (all(s["ready"] and plan_of(s) == plan for s in states)
                and len({s["epoch"] for s in states}) == 1)
    wait_for(check, since + timeout - time.monotonic(), f"the swarm to be ready on {plan}", daemons)
    return time.monotonic() - since


def test_middle_stage_killed_mid_stream(swarm):
    """SIGKILL on the middle stage: error frame at once, replan on the spare, correct answers, and the
    restarted node takes its layers back from its own cache."""
    a, b, c, d = (swarm.start(n, s) for n, s in (("a", "4"), ("b", "3"), ("c", "2"), ("d", "1")))
    full = [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]
    states = wait_ready([a, b, c, d], nodes=4)
    assert plan_of(states[0]) == full
    cached = shard_files(swarm.tmp_path / "b")
    assert list(cached) == ["2-4-f0l0"]
    expected = swarm.expected(LONG)
    assert len(expected) == LONG  # so the stream below is still running when b dies

    result = chat_with_fault(a.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, lambda: b.stop(signal.SIGKILL))
    assert result["end"]["type"] == "error", result
    assert "left the swarm" in result["end"]["message"] and result["end"]["status"] == 503
    assert result["tokens"] < LONG
    print(f"\nkill: error frame {result['after_s']:.3f} s after SIGKILL, after {result['tokens']} tokens")

    survivors = [a, c, d]
    took = recovered(survivors, [("a", 0, 2), ("c", 2, 4), ("d", 4, 5)], since=result["at"])
    print(f"kill: ready on a new plan {took:.2f} s after the SIGKILL")
    assert all(len(s.state()["nodes"]) == 3 for s in survivors)
    assert chat_ws(c.url, {"prompt_ids": PROMPT, "max_tokens": LONG})["done"]["token_ids"] == expected

    b = swarm.start("b", "3", port=b.port)  # same name, port and --cache-dir; a new node id
    took = recovered([a, b, c, d], full, since=time.monotonic(), timeout=60)
    print(f"kill: restarted b back in the plan {took:.2f} s after its start")
    assert shard_files(swarm.tmp_path / "b") == cached  # the same file: not downloaded again
    assert b.state()["nodes"][0]["state"] == "loaded"
    assert chat_ws(b.url, {"prompt_ids": PROMPT, "max_tokens": LONG})["done"]["token_ids"] == expected


def test_plan_changes_mid_stream(swarm):
    """The spare leaving and coming back moves no layer: the epoch stays and a stream in flight goes on.
    A new epoch (here the plan in force applied again as a topology) ends a stream in flight at once."""
    a, b, c, d = (swarm.start(n, s) for n, s in (("a", "4"), ("b", "3"), ("c", "2"), ("d", "1")))
    epoch = wait_ready([a, b, c, d], nodes=4)[0]["epoch"]
    expected = swarm.expected(LONG)

    result = chat_with_fault(a.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, lambda: d.stop(signal.SIGKILL),
                             within=60)
    assert result["end"]["type"] == "done" and result["end"]["token_ids"] == expected, result
    d = swarm.start("d", "1", port=d.port)
    states = wait_ready([a, b, c, d], nodes=4)
    assert {s["epoch"] for s in states} == {epoch}

    def reapply():
        with urllib.request.urlopen(a.url + "/api/topology", timeout=5) as r:
            yaml_text = r.read()
        request = urllib.request.Request(a.url + "/api/topology", data=yaml_text, method="PUT",
                                         headers={"Content-Type": "application/yaml"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert json.loads(r.read())["epoch"] > epoch

    result = chat_with_fault(c.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, reapply)
    assert result["end"]["type"] == "error" and "changed its plan" in result["end"]["message"], result
    print(f"\nnew epoch: error frame {result['after_s']:.3f} s after the topology was applied")
    wait_ready([a, b, c, d], nodes=4)
    assert chat_ws(c.url, {"prompt_ids": PROMPT, "max_tokens": LONG})["done"]["token_ids"] == expected


def test_source_gone(swarm):
    """The only node holding the model dies: every node says so and requests fail at once, saying why;
    the source started again brings the swarm back."""
    a, b, c = (swarm.start(n, s) for n, s in (("a", "3"), ("b", "2"), ("c", "1")))
    states = wait_ready([a, b, c], nodes=3)
    assert all(s["source_present"] for s in states)
    expected = swarm.expected(20)
    a.stop(signal.SIGKILL)
    wait_for(lambda: not any(d.state()["source_present"] for d in (b, c)), 10, "b and c to miss the source", [b, c])
    for d in (b, c):
        t0 = time.monotonic()
        result = chat_ws(d.url, {"prompt_ids": PROMPT, "max_tokens": 20}, timeout=ERROR_WITHIN_S)
        took = time.monotonic() - t0
        assert "error" in result, result
        assert "source left the swarm" in result["error"]["message"] and result["error"]["status"] == 503, result
        print(f"\nsource gone: {d.name} refused a chat in {took * 1000:.0f} ms: {result['error']['message']}")
        state = d.state()
        assert state["source_present"] is False and state["ready"] is False
    status, body = post_json(b.url + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5})
    assert status == 503 and "source left the swarm" in body["error"]["message"], body

    a = swarm.start("a", "3", port=a.port)  # b and c redial their --peer
    recovered([a, b, c], [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)], since=time.monotonic(), timeout=60)
    assert all(d.state()["source_present"] for d in (a, b, c))
    assert chat_ws(c.url, {"prompt_ids": PROMPT, "max_tokens": 20})["done"]["token_ids"] == expected


def post_json(url: str, body: dict, timeout: float = ERROR_WITHIN_S) -> tuple[int, dict]:
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_strangers_are_refused(swarm):
    """Without the cluster key no shard and no peer link; without the API key no API, socket or dashboard."""
    a = swarm.start("a", "1", "--memory-budget", "2MB", "--api-key", "let-me-in")
    bearer = {"Authorization": "Bearer let-me-in"}
    wait_for(lambda: get_json_auth(a.url + "/api/swarm", bearer)["ready"], 60, "a to be ready", [a])
    model = get_json_auth(a.url + "/api/swarm", bearer)["nodes"][0]["model"]
    shard, side = f"/shards/{model}/0-2-f1l0", f"/shards/{model}/files/config.json"

    async def probe():
        async with aiohttp.ClientSession() as http:
            out = {}
            for name, path, headers in (("shard unsigned", shard, {}), ("side unsigned", side, {}),
                                        ("shard wrong key", shard, auth.sign_request("guess", "GET", shard)),
                                        ("shard signed", shard, auth.sign_request(swarm.key, "GET", shard)),
                                        ("api", "/api/swarm", {}), ("api keyed", "/api/swarm", bearer),
                                        ("openai", "/v1/models", {}), ("chat socket", "/ws/chat", {})):
                async with http.get(a.url + path, headers=headers, allow_redirects=False) as r:
                    out[name] = r.status
            async with http.get(a.url + "/", allow_redirects=False) as r:
                out["dashboard"] = (r.status, r.headers.get("Location", ""))
            # a peer that skips the handshake: its first frame is a pipeline frame, not an answer
            async with http.ws_connect(a.url + "/peer") as ws:
                hello = decode_frame((await ws.receive()).data)
                await ws.send_bytes(encode_frame({"t": "forward", "session": "s", "epoch": 1, "pos": 0,
                                                  "tokens": [1], "origin": "x"}))
                reply = await ws.receive()
                out["peer"] = (hello["t"], decode_frame(reply.data)["message"], (await ws.receive()).type)
            return out

    out = asyncio.run(probe())
    assert out["shard unsigned"] == out["side unsigned"] == out["shard wrong key"] == 401, out
    assert out["shard signed"] == 200, out  # the same request, signed with the key, is served
    assert out["api"] == out["openai"] == out["chat socket"] == 401 and out["api keyed"] == 200, out
    assert out["dashboard"][0] == 302 and out["dashboard"][1].startswith("/login"), out
    assert out["peer"][0] == "hello" and "authentication failed" in out["peer"][1], out
    assert out["peer"][2] in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), out
    assert [n["name"] for n in get_json_auth(a.url + "/api/swarm", bearer)["nodes"]] == ["a"]


def get_json_auth(url: str, headers: dict) -> dict:
    import urllib.request
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return json.loads(r.read())
