"""A middle stage's cable pulled mid-stream (ip link set ... down), in network namespaces on one bridge.

The same four-node layout as tests/test_faults.py (a, b, c in the plan, d the spare), each node on a
host of its own with real addresses and multicast. Unlike a kill, nothing closes a TCP connection:
the peers learn of b's loss only from missing heartbeats, and frames sent to b pile up in socket buffers
that never drain (a's sends then time out instead of blocking its stage and heartbeats for good). b
itself lives on, cut off; plugged back in, it redials its --peer, rejoins, and takes its layers back
from the stage it still holds.
"""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from netns import netns_hosts, skip_reason

from tests.swarm_harness import REPO, Daemon
from tests.test_faults import ERROR_WITHIN_S, LONG, PROMPT, READY_WITHIN_S, plan_of, shard_files
from tests.test_swarm import single_node_ids

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

PORT = 10128
# runs inside host a's namespace: streams a chat, says FIRST at the first token, then prints how it ended
STREAM = """
import asyncio, json, sys, aiohttp
async def main(url, body):
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws/chat") as ws:
        await ws.send_json(body)
        tokens = 0
        while True:
            msg = await ws.receive(timeout=60)
            if msg.type != aiohttp.WSMsgType.TEXT:
                return {"tokens": tokens, "end": {"type": "socket " + msg.type.name}}
            frame = json.loads(msg.data)
            if frame["type"] != "token":
                return {"tokens": tokens, "end": frame}
            tokens += 1
            if tokens == 1:
                print("FIRST", flush=True)
print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))), flush=True)
"""
# runs inside host a's namespace: six chats with near-full prompts, whose hidden states (60 KiB each) a
# sends into the dead link; prints how each ended
FLOOD = """
import asyncio, json, sys, aiohttp
async def one(url, i):
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws/chat") as ws:
        await ws.send_json({"prompt_ids": [1] + [(i * 7 + k) % 500 + 3 for k in range(240)], "max_tokens": 5})
        while True:
            frame = json.loads((await ws.receive(timeout=60)).data)
            if frame["type"] != "token":
                return frame
async def main(url):
    return await asyncio.gather(*(one(url, i) for i in range(6)))
print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
"""


def in_namespace(host, code: str, *args: str, timeout: float = 60.0):
    out = host.run([sys.executable, "-c", code, *args], timeout=timeout, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise AssertionError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def state(host) -> dict:
    return in_namespace(host, "import json, sys; from tests.swarm_harness import get_json; "
                              "print(json.dumps(get_json(sys.argv[1] + '/api/swarm')))", f"http://{host.addr}:{PORT}")


def chat(host, max_tokens: int) -> dict:
    return in_namespace(host, "import json, sys; from tests.swarm_harness import chat_ws; "
                              "print(json.dumps(chat_ws(sys.argv[1], json.loads(sys.argv[2]))))",
                        f"http://{host.addr}:{PORT}", json.dumps({"prompt_ids": PROMPT, "max_tokens": max_tokens}),
                        timeout=120)


def wait_states(hosts, good, timeout: float, what: str, daemons) -> float:
    """Seconds until good(states) holds for the states of these hosts; fails after `timeout`."""
    t0 = time.monotonic()
    while True:
        try:
            states = [state(h) for h in hosts]
        except (AssertionError, subprocess.TimeoutExpired) as e:  # not listening yet
            states = [{"error": str(e)[-300:]}]
        if "error" not in states[0] and good(states):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}: {states}\n"
                                 + "\n".join(f"--- {d.name}\n{d.log()[-3000:]}" for d in daemons))
        time.sleep(0.3)


def ready_on(plan):
    return lambda states: all(s["ready"] and plan_of(s) == plan for s in states) and len({s["epoch"] for s in states}) == 1


def test_middle_stage_link_down_mid_stream(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    key = uuid.uuid4().hex
    full = [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]
    with netns_hosts(4) as hosts:
        a, b, c, d = hosts
        daemons = []
        for host, name, speed in zip(hosts, "abcd", "4321"):
            args = ["--memory-budget", "300000", "--max-context", "256", "--speed", speed, "--cluster-key", key,
                    "--cache-dir", str(tmp_path / name)]
            args += ["--model", "demo"] if name == "a" else ["--peer", f"{a.addr}:{PORT}"]
            daemons.append(Daemon(name, host.addr, PORT, args, tmp_path, env, popen=host.popen))
        try:
            wait_states(hosts, lambda ss: ready_on(full)(ss) and all(len(s["nodes"]) == 4 for s in ss), 90,
                        "four nodes ready", daemons)
            cached = shard_files(tmp_path / "b")
            assert list(cached) == ["2-4-f0l0"]
            expected = single_node_ids("demo", PROMPT, LONG, {**os.environ, **env})
            assert len(expected) == LONG

            body = json.dumps({"prompt_ids": PROMPT, "max_tokens": LONG})
            client = a.popen([sys.executable, "-c", STREAM, f"http://{a.addr}:{PORT}", body], stdout=subprocess.PIPE,
                             text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert client.stdout.readline().strip() == "FIRST"
            cut = time.monotonic()
            b.set_link(False)
            # before anyone knows b is gone, a sends it more than the socket buffers hold: a's sends block
            flood = a.popen([sys.executable, "-c", FLOOD, f"http://{a.addr}:{PORT}"], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            line = client.stdout.readline()  # the client's own 60 s receive timeout bounds this
            after = time.monotonic() - cut
            result = json.loads(line)
            assert result["end"]["type"] == "error", result
            assert "left the swarm" in result["end"]["message"] and result["end"]["status"] == 503, result
            assert result["tokens"] < LONG
            print(f"\nlink down: error frame {after:.2f} s after the cut, after {result['tokens']} tokens")
            assert after < ERROR_WITHIN_S, f"the error frame came {after:.2f} s after the cut"
            ends = json.loads(flood.stdout.readline())
            assert all(e["type"] == "error" and "left the swarm" in e["message"] for e in ends), ends

            took = wait_states([a, c, d], ready_on([("a", 0, 2), ("c", 2, 4), ("d", 4, 5)]),
                               READY_WITHIN_S - (time.monotonic() - cut), "a new plan without b", daemons)
            print(f"link down: ready on a new plan {time.monotonic() - cut:.2f} s after the cut")
            assert chat(c, LONG)["done"]["token_ids"] == expected
            # b, cut off, knows it: alone, without the source, it refuses requests at once
            alone = state(b)
            assert [n["name"] for n in alone["nodes"]] == ["b"] and alone["source_present"] is False, alone
            assert "source left the swarm" in chat(b, 5)["error"]["message"]

            b.set_link(True)
            took = wait_states(hosts, lambda ss: ready_on(full)(ss) and all(len(s["nodes"]) == 4 for s in ss), 60,
                               "b back in the plan", daemons)
            print(f"link down: b back in the plan {took:.2f} s after the link came up")
            assert shard_files(tmp_path / "b") == cached  # not downloaded again
            assert chat(b, LONG)["done"]["token_ids"] == expected
        finally:
            for dm in daemons:
                dm.stop()
