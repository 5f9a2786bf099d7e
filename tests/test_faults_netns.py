"""A middle stage's cable pulled mid-stream (ip link set ... down), in network namespaces on one bridge.

The same four-node layout as tests/test_faults.py (a, b, c in the plan, the source s the spare, requests
entering at s), each node on a host of its own with real addresses and multicast. Unlike a kill,
nothing closes a TCP connection: the peers learn of b's loss only from missing heartbeats, and frames
sent to b pile up in socket buffers that never drain (sends then time out instead of blocking a stage
and its heartbeats for good). The stream in flight and six more chats pushed into the dead link move to
the plan without b and finish with exactly the single-node tokens. b itself lives on, cut off; plugged
back in, it redials its --peer, rejoins, and takes its layers back from the shard it cached.
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
from tests.test_faults import FAULT_AT, LONG, PAUSE_WITHIN_S, PROMPT, READY_WITHIN_S, plan_of, shard_files
from tests.test_swarm import single_node_ids

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

PORT = 10128
# runs inside host s's namespace: streams a chat, says FAULT after FAULT_AT tokens, then prints how it ended
STREAM = """
import asyncio, json, sys, time, aiohttp
async def main(url, body, fault_at):
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws/chat") as ws:
        await ws.send_json(body)
        ids, last, pause = [], None, 0.0
        while True:
            msg = await ws.receive(timeout=60)
            if msg.type != aiohttp.WSMsgType.TEXT:
                return {"ids": ids, "end": {"type": "socket " + msg.type.name}, "pause_s": pause}
            frame, now = json.loads(msg.data), time.monotonic()
            if len(ids) >= fault_at:
                pause = max(pause, now - last)
            last = now
            if frame["type"] != "token":
                return {"ids": ids, "end": frame, "pause_s": pause}
            ids.append(frame["id"])
            if len(ids) == fault_at:
                print("FAULT", flush=True)
print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])))), flush=True)
"""
# runs inside host s's namespace: six chats with near-full prompts, whose hidden states (60 KiB each) go into
# the dead link; prints how each ended
FLOOD_PROMPTS = [[1] + [(i * 7 + k) % 500 + 3 for k in range(240)] for i in range(6)]
FLOOD = """
import asyncio, json, sys, aiohttp
async def one(url, prompt):
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws/chat") as ws:
        await ws.send_json({"prompt_ids": prompt, "max_tokens": 5})
        while True:
            frame = json.loads((await ws.receive(timeout=60)).data)
            if frame["type"] != "token":
                return frame
async def main(url, prompts):
    return await asyncio.gather(*(one(url, p) for p in prompts))
print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))), flush=True)
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
        s, a, b, c = hosts
        daemons = []
        for host, name, speed in zip(hosts, "sabc", "1432"):
            args = ["--memory-budget", "300000", "--max-context", "256", "--speed", speed, "--cluster-key", key,
                    "--cache-dir", str(tmp_path / name), "--config-dir", str(tmp_path / f"config-{name}")]
            args += ["--model", "demo"] if name == "s" else ["--peer", f"{s.addr}:{PORT}"]
            daemons.append(Daemon(name, host.addr, PORT, args, tmp_path, env, popen=host.popen))
        try:
            wait_states(hosts, lambda ss: ready_on(full)(ss) and all(len(x["nodes"]) == 4 for x in ss), 90,
                        "four nodes ready", daemons)
            cached = shard_files(tmp_path / "b")
            assert list(cached) == ["2-4-f0l0"]
            solo_env = {**os.environ, **env}
            expected = single_node_ids("demo", PROMPT, LONG, solo_env)
            assert len(expected) == LONG
            flood_expected = [single_node_ids("demo", p, 5, solo_env) for p in FLOOD_PROMPTS]

            body = json.dumps({"prompt_ids": PROMPT, "max_tokens": LONG})
            client = s.popen([sys.executable, "-c", STREAM, f"http://{s.addr}:{PORT}", body, str(FAULT_AT)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert client.stdout.readline().strip() == "FAULT"
            cut = time.monotonic()
            b.set_link(False)
            # before anyone knows b is gone, s sends it more than the socket buffers hold: sends block
            flood = s.popen([sys.executable, "-c", FLOOD, f"http://{s.addr}:{PORT}", json.dumps(FLOOD_PROMPTS)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            result = json.loads(client.stdout.readline())  # the client's own 60 s receive timeout bounds this
            after = time.monotonic() - cut
            assert result["end"]["type"] == "done" and result["end"]["token_ids"] == expected, result
            assert result["pause_s"] < PAUSE_WITHIN_S, result["pause_s"]
            print(f"\nlink down: the stream paused at most {result['pause_s']:.2f} s and finished {after:.2f} s "
                  f"after the cut")
            ends = json.loads(flood.stdout.readline())
            assert [e.get("token_ids") for e in ends] == flood_expected, ends

            wait_states([s, a, c], ready_on([("a", 0, 2), ("c", 2, 4), ("s", 4, 5)]),
                        READY_WITHIN_S - (time.monotonic() - cut), "a new plan without b", daemons)
            print(f"link down: ready on a new plan {time.monotonic() - cut:.2f} s after the cut")
            assert chat(c, LONG)["done"]["token_ids"] == expected
            # b, cut off, knows it: alone, without the source, it refuses requests at once
            alone = state(b)
            assert [n["name"] for n in alone["nodes"]] == ["b"] and alone["source_present"] is False, alone
            assert "source left the swarm" in chat(b, 5)["error"]["message"]

            b.set_link(True)
            took = wait_states(hosts, lambda ss: ready_on(full)(ss) and all(len(x["nodes"]) == 4 for x in ss), 60,
                               "b back in the plan", daemons)
            print(f"link down: b back in the plan {took:.2f} s after the link came up")
            assert shard_files(tmp_path / "b") == cached  # not downloaded again
            assert chat(b, LONG)["done"]["token_ids"] == expected
        finally:
            for dm in daemons:
                dm.stop()
