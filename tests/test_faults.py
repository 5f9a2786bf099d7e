"""Faults on loopback, with real daemons: stages lost or leaving mid-stream, joins, topology edits, the
source gone, strangers at the door.

Streams survive: the node that took a request keeps its prompt and tokens, and when the plan changes
under it (a stage's node killed or leaving, a join that moves layers, a topology edit) the request moves
to the new plan, which prefills prompt + tokens so far and goes on. The client sees a pause, never an
error, and the text is `cake-swarm generate`'s.

The move tests run four nodes whose budgets hold two of the demo's five layers each. The fastest strategy
fills the fastest nodes first, so the plan uses a, b, c (2/2/1); the source s (the one started with
--model) is the slowest and stays a spare, so any of a, b, c can go and s, holding the model, takes a
part without a download. Requests enter at s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest

from swarm import auth
from swarm.protocol import decode_frame, encode_frame
from swarm.tls import client_context
from tests.swarm_harness import Daemon, chat_ws, free_port, wait_for, wait_ready
from tests.test_swarm import single_node_ids

BUDGET = "300000"                 # two demo layers (+ KV for --max-context 256, + embedding or head) per node
PROMPT = [1, 17, 99, 212, 3, 300, 42]
LONG = 200                        # greedy on PROMPT runs to max_tokens: no end token before 209 tokens
FAULT_AT = 20                     # the fault comes after this many streamed tokens
ERROR_WITHIN_S = 5.0              # the client hears of a fatal fault within this, or the test fails
READY_WITHIN_S = 15.0
PAUSE_WITHIN_S = 15.0             # the longest pause a moved stream may see


class Swarm:
    """Daemons on loopback in one cluster of their own; the first one started holds the demo model."""

    def __init__(self, tmp_path: Path, *extra: str):
        self.tmp_path, self.extra = tmp_path, list(extra)
        self.env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
        self.key = uuid.uuid4().hex
        self.daemons: dict[str, Daemon] = {}
        self.seed: Daemon | None = None

    def start(self, name: str, speed: str, *extra: str, port: int | None = None) -> Daemon:
        args = ["--memory-budget", BUDGET, "--max-context", "256", "--speed", speed, "--cluster-key", self.key,
                "--cache-dir", str(self.tmp_path / name), "--config-dir", str(self.tmp_path / f"config-{name}"),
                "--no-mdns", *self.extra, *extra]
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

    def expected(self, max_tokens: int, prompt: list[int] = PROMPT) -> list[int]:
        return single_node_ids("demo", prompt, max_tokens, {**os.environ, **self.env})

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


def stream_with_fault(url: str, body: dict, fault, after: int = FAULT_AT, within: float = 60.0,
                      more: dict | None = None) -> dict:
    """Stream a /ws/chat answer and call fault() once `after` tokens arrived (and more[n]() after n tokens).

    Returns {"ids": the token ids streamed, "end": the last frame, "at": time.monotonic() of the fault,
    "pause_s": the longest wait between two tokens after the fault, "after_s": seconds from the fault to
    the last frame}; fails if the socket ends without a frame or nothing ends it within `within` s."""
    async def run():
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws/chat") as ws:
            await ws.send_json(body)
            ids, faulted, last, pause = [], None, None, 0.0
            while True:
                try:
                    msg = await ws.receive(timeout=within)
                except asyncio.TimeoutError:
                    raise AssertionError(f"nothing for {within} s after {len(ids)} tokens") from None
                assert msg.type == aiohttp.WSMsgType.TEXT, f"the chat socket ended with {msg.type.name}, not a frame"
                frame, now = json.loads(msg.data), time.monotonic()
                if faulted is not None:
                    pause = max(pause, now - last)
                last = now
                if frame["type"] != "token":
                    return {"ids": ids, "end": frame, "at": faulted, "pause_s": pause,
                            "after_s": None if faulted is None else now - faulted}
                ids.append(frame["id"])
                if len(ids) == after:
                    faulted = time.monotonic()
                    fault()
                elif len(ids) in (more or {}):
                    more[len(ids)]()
    return asyncio.run(run())


def assert_undisturbed(result: dict, expected: list[int]) -> None:
    """The stream ended as an undisturbed run does: done, every token the same."""
    assert result["end"]["type"] == "done", result["end"]
    assert result["end"]["token_ids"] == expected and result["ids"] == expected[:len(result["ids"])], result
    assert result["pause_s"] < PAUSE_WITHIN_S, result["pause_s"]


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


def spare_source_swarm(swarm: Swarm) -> tuple[Daemon, dict[str, Daemon]]:
    """s (the source, slowest: the spare) and a, b, c holding 2/2/1; requests enter at s."""
    s = swarm.start("s", "1")
    nodes = {n: swarm.start(n, speed) for n, speed in (("a", "4"), ("b", "3"), ("c", "2"))}
    wait_ready([s, *nodes.values()], nodes=4)
    # all four known is not yet the plan over all four: a node seen last is placed by the next replan
    recovered([s, *nodes.values()], [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)], since=time.monotonic())
    return s, nodes


@pytest.mark.parametrize("killed, left", [
    ("a", [("b", 0, 2), ("c", 2, 4), ("s", 4, 5)]),      # the first stage
    ("b", [("a", 0, 2), ("c", 2, 4), ("s", 4, 5)]),      # the middle
    ("c", [("a", 0, 2), ("b", 2, 4), ("s", 4, 5)]),      # the last
])
def test_stage_killed_mid_stream(swarm, killed, left):
    """SIGKILL on a stage after 20 tokens: the stream pauses, moves to the plan without that node and
    finishes with exactly `cake-swarm generate`'s tokens; no error reaches the client."""
    s, nodes = spare_source_swarm(swarm)
    expected = swarm.expected(LONG)
    assert len(expected) == LONG  # so the stream below is still running when the node dies

    result = stream_with_fault(s.url, {"prompt_ids": PROMPT, "max_tokens": LONG},
                               lambda: nodes[killed].stop(signal.SIGKILL))
    assert_undisturbed(result, expected)
    print(f"\nkill {killed}: the stream paused at most {result['pause_s']:.2f} s and finished "
          f"{result['after_s']:.2f} s after the SIGKILL")
    survivors = [s] + [d for n, d in nodes.items() if n != killed]
    took = recovered(survivors, left, since=result["at"])
    print(f"kill {killed}: ready on {left} {took:.2f} s after the SIGKILL")
    assert s.state()["stats"]["moves"] >= 1


def test_join_mid_stream_moves_layers(swarm):
    """A faster node joining mid-stream takes layers (a new plan): the stream moves and stays exact. The
    node that comes back is b restarted with its --cache-dir: it loads its shard from there."""
    s, nodes = spare_source_swarm(swarm)
    b = nodes["b"]
    # b's shard of the plan over all four (a plan from before the last node joined may have left another)
    cached = shard_files(swarm.tmp_path / "b")["2-4-f0l0"]
    expected = swarm.expected(LONG)
    b.stop(signal.SIGKILL)
    recovered([s, nodes["a"], nodes["c"]], [("a", 0, 2), ("c", 2, 4), ("s", 4, 5)], since=time.monotonic())

    # b starts after the first stream's 20th token. Halfway through each stream the next one starts, until b
    # is back in the plan: one stream is always decoding, so the join lands in the middle of one however long
    # b takes to start (streams one after another left gaps, and a join in a gap moved nothing)
    joined, full = {}, [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]
    chain_until = time.monotonic() + 120

    def b_in_plan() -> bool:
        state = s.state()
        return "b" in joined and plan_of(state) == full and state["ready"]

    def next_stream() -> None:
        if not b_in_plan() and time.monotonic() < chain_until:
            futures.append(pool.submit(stream, False))

    def stream(first: bool) -> dict:
        fault = (lambda: joined.setdefault("b", swarm.start("b", "3", port=b.port))) if first else (lambda: None)
        return stream_with_fault(s.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, fault,
                                 more={LONG // 2: next_stream})

    with ThreadPoolExecutor(4) as pool:
        futures, streams = [pool.submit(stream, True)], []
        while len(streams) < len(futures):  # a stream adds its successor before it returns
            streams.append(futures[len(streams)].result())
    for result in streams:
        assert_undisturbed(result, expected)
    took = recovered([s, nodes["a"], joined["b"], nodes["c"]], full, since=streams[0]["at"], timeout=60)
    print(f"\njoin: {len(streams)} streams, the longest pause {max(r['pause_s'] for r in streams):.2f} s; "
          f"b back in the plan {took:.2f} s after its start")
    assert shard_files(swarm.tmp_path / "b")["2-4-f0l0"] == cached  # the same file: not downloaded again
    assert s.state()["stats"]["moves"] >= 1


def test_topology_edit_mid_stream(swarm):
    """A topology applied mid-stream moves layers: the stream follows and stays exact."""
    s, nodes = spare_source_swarm(swarm)
    expected = swarm.expected(LONG)
    pinned = "".join(f"{name}:\n  layers: [model.layers.{layers}]\n" for name, layers in
                     (("c", "0-1"), ("s", "2-3"), ("a", "4")))

    def apply():
        request = urllib.request.Request(s.url + "/api/topology", data=pinned.encode(), method="PUT",
                                         headers={"Content-Type": "application/yaml"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200

    result = stream_with_fault(s.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, apply)
    assert_undisturbed(result, expected)
    states = wait_ready([s, *nodes.values()], nodes=4)
    assert plan_of(states[0]) == [("c", 0, 2), ("s", 2, 4), ("a", 4, 5)]
    print(f"\ntopology edit: the stream paused at most {result['pause_s']:.2f} s")


def test_a_request_moved_too_often_fails_clearly(tmp_path):
    """--max-moves 1: a stream that the swarm moves twice (two topology edits) ends with an error that says
    so, and the node answers correctly afterwards."""
    swarm = Swarm(tmp_path, "--max-moves", "1")
    try:
        s, nodes = spare_source_swarm(swarm)

        def apply(layout):
            text = "".join(f"{name}:\n  layers: [model.layers.{layers}]\n" for name, layers in layout)
            request = urllib.request.Request(s.url + "/api/topology", data=text.encode(), method="PUT",
                                             headers={"Content-Type": "application/yaml"})
            urllib.request.urlopen(request, timeout=10).close()

        result = stream_with_fault(s.url, {"prompt_ids": PROMPT, "max_tokens": LONG},
                                   lambda: apply((("c", "0-1"), ("s", "2-3"), ("a", "4"))),
                                   more={FAULT_AT + 10: lambda: apply((("a", "0-1"), ("b", "2-3"), ("c", "4")))})
        assert result["end"]["type"] == "error", result["end"]
        assert "changed its plan 2 times" in result["end"]["message"], result["end"]
        assert len(result["ids"]) >= FAULT_AT + 10 and result["ids"] == swarm.expected(LONG)[:len(result["ids"])]
        wait_ready([s, *nodes.values()], nodes=4)
        assert chat_ws(s.url, {"prompt_ids": PROMPT, "max_tokens": 40})["done"]["token_ids"] == swarm.expected(40)
    finally:
        swarm.stop()


def test_sigterm_hands_over_before_exit(swarm):
    """SIGTERM on a stage: the node asks to be planned without, the stream moves to that plan, and only
    then the node exits (code 0). The origin hears of a new plan, never of a node lost."""
    s, nodes = spare_source_swarm(swarm)
    b = nodes["b"]
    expected = swarm.expected(LONG)
    result = stream_with_fault(s.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, lambda: b.proc.send_signal(signal.SIGTERM))
    assert_undisturbed(result, expected)
    assert b.proc.wait(30) == 0
    log = b.log()
    assert "leaving: handing layers 2-3 over" in log and "handed over: leaving" in log, log[-2000:]
    recovered([s, nodes["a"], nodes["c"]], [("a", 0, 2), ("c", 2, 4), ("s", 4, 5)], since=result["at"])
    origin_log = s.log()
    assert "changed its plan" in origin_log and "left the swarm" not in origin_log, origin_log[-3000:]
    print(f"\nSIGTERM: the stream paused at most {result['pause_s']:.2f} s")


def test_cake_swarm_down_hands_over(swarm):
    """`cake-swarm down --node HOST:PORT` does what SIGTERM does: the part moves, then the node exits."""
    s, nodes = spare_source_swarm(swarm)
    c = nodes["c"]
    import subprocess, sys
    from tests.swarm_harness import REPO
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "down", "--node", f"127.0.0.1:{c.port}"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "c is leaving" in out.stdout, out
    assert c.proc.wait(30) == 0
    assert "handed over: leaving" in c.log()
    recovered([s, nodes["a"], nodes["b"]], [("a", 0, 2), ("b", 2, 4), ("s", 4, 5)], since=time.monotonic())
    assert chat_ws(s.url, {"prompt_ids": PROMPT, "max_tokens": 40})["done"]["token_ids"] == swarm.expected(40)


def test_spare_leaving_keeps_the_epoch(swarm):
    """A spare coming and going moves no layer: the epoch stays and nothing in flight moves."""
    a, b, c, d = (swarm.start(n, s) for n, s in (("a", "4"), ("b", "3"), ("c", "2"), ("d", "1")))
    epoch = wait_ready([a, b, c, d], nodes=4)[0]["epoch"]
    expected = swarm.expected(LONG)
    result = stream_with_fault(a.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, lambda: d.stop(signal.SIGKILL))
    assert_undisturbed(result, expected)
    d = swarm.start("d", "1", port=d.port)
    states = wait_ready([a, b, c, d], nodes=4)
    assert {s["epoch"] for s in states} == {epoch}
    assert a.state()["stats"]["moves"] == 0


def test_pinned_topology_falls_back_and_returns(tmp_path):
    """Three nodes pinned by a YAML; the middle one killed: the two left are ready on an automatic plan
    within 15 s (the snapshot names the missing node) and answer correctly; restarted, the pin is back."""
    swarm = Swarm(tmp_path, "--memory-budget", "450000")  # three layers each: two nodes hold the model
    topology = tmp_path / "pinned.yaml"
    topology.write_text("a:\n  layers: [model.layers.0-1]\nb:\n  layers: [model.layers.2-3]\n"
                        "c:\n  layers: [model.layers.4]\n")
    try:
        a = swarm.start("a", "3", "--topology", str(topology))
        b, c = swarm.start("b", "2"), swarm.start("c", "1")
        pinned = [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]
        recovered([a, b, c], pinned, since=time.monotonic(), timeout=90)
        expected = swarm.expected(60)
        assert a.state()["topology"] == {"pinned": True, "missing": []}

        b.stop(signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: all(d.state()["ready"] and "b" not in [p[0] for p in plan_of(d.state())] for d in (a, c)),
                 READY_WITHIN_S, "a plan without b", [a, c])
        print(f"\npinned: ready without b {time.monotonic() - t0:.2f} s after the SIGKILL")
        for d in (a, c):
            state = d.state()
            assert state["topology"]["missing"] == ["b"] and "b" in state["topology"]["message"], state["topology"]
            assert chat_ws(d.url, {"prompt_ids": PROMPT, "max_tokens": 60})["done"]["token_ids"] == expected

        b = swarm.start("b", "2", port=b.port)
        recovered([a, b, c], pinned, since=time.monotonic(), timeout=60)
        assert a.state()["topology"] == {"pinned": True, "missing": []}
        assert chat_ws(b.url, {"prompt_ids": PROMPT, "max_tokens": 60})["done"]["token_ids"] == expected
    finally:
        swarm.stop()


def test_source_gone(swarm):
    """The only node holding the model dies: no plan can hold the model, so the stream in flight and every
    request after it fail at once, saying why; the source started again brings the swarm back."""
    a, b, c = (swarm.start(n, s) for n, s in (("a", "3"), ("b", "2"), ("c", "1")))
    states = wait_ready([a, b, c], nodes=3)
    assert all(s["source_present"] for s in states)
    expected = swarm.expected(20)
    result = stream_with_fault(c.url, {"prompt_ids": PROMPT, "max_tokens": LONG}, lambda: a.stop(signal.SIGKILL))
    assert result["end"]["type"] == "error" and "source left the swarm" in result["end"]["message"], result["end"]
    assert result["after_s"] < ERROR_WITHIN_S, result["after_s"]
    print(f"\nsource gone: the stream in flight ended {result['after_s']:.2f} s after the SIGKILL")
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
    answer = chat_ws(c.url, {"prompt_ids": PROMPT, "max_tokens": 20})
    assert "done" in answer and answer["done"]["token_ids"] == expected, answer


def test_a_model_that_does_not_fit_fails_at_once(swarm):
    """A swarm whose memory cannot hold the model refuses requests at once, saying what is missing and
    that a shorter --max-context would fit (it used to wait 30 s for a ready that could not come)."""
    a = swarm.start("a", "1", "--memory-budget", "500000")  # the weights fit, not with 256 tokens of KV cache
    wait_for(lambda: a.state()["plan_error"], 30, "the plan error", [a])
    t0 = time.monotonic()
    result = chat_ws(a.url, {"prompt_ids": PROMPT, "max_tokens": 5}, timeout=ERROR_WITHIN_S)
    took = time.monotonic() - t0
    assert "error" in result and result["error"]["status"] == 503, result
    message = result["error"]["message"]
    assert "does not fit" in message and "with --max-context" in message and "it would fit" in message, message
    print(f"\ndoes not fit: refused in {took * 1000:.0f} ms: {message}")
    status, body = post_json(a.url + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5})
    assert status == 503 and "does not fit" in body["error"]["message"], body


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
    me = get_json_auth(a.url + "/api/swarm", bearer)["nodes"][0]
    shard, side = f"/shards/{me['model']}/0-2-f1l0", f"/shards/{me['model']}/files/config.json"
    peers = f"https://127.0.0.1:{me['peer_port']}"   # peer socket and shards: the TLS peer port only

    async def probe():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context())) as http:
            out = {}
            for name, url, path, headers in (
                    ("shard unsigned", peers, shard, {}), ("side unsigned", peers, side, {}),
                    ("shard wrong key", peers, shard, auth.sign_request("guess", "GET", shard, me["cert"])),
                    ("shard signed", peers, shard, auth.sign_request(swarm.key, "GET", shard, me["cert"])),
                    ("api", a.url, "/api/swarm", {}), ("api keyed", a.url, "/api/swarm", bearer),
                    ("openai", a.url, "/v1/models", {}), ("chat socket", a.url, "/ws/chat", {})):
                async with http.get(url + path, headers=headers, allow_redirects=False) as r:
                    out[name] = r.status
            async with http.get(a.url + "/", allow_redirects=False) as r:
                out["dashboard"] = (r.status, r.headers.get("Location", ""))
            # a peer that skips the handshake: its first frame is a pipeline frame, not an answer
            async with http.ws_connect(peers + "/peer") as ws:
                hello = decode_frame((await ws.receive()).data)
                await ws.send_bytes(encode_frame({"t": "forward", "epoch": 1, "stage": 0, "tokens": [1],
                                                  "rows": [{"session": "s", "pos": 0, "n": 1, "origin": "x"}]}))
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
