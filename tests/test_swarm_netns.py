"""Three hosts in network namespaces on one bridge: real addresses, real multicast, a cache folder each.

The model is only on the first host; the others find it over mDNS, pull their shards from it over
HTTP and give, through any node, exactly the tokens of one node.
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

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

PORT = 10128


def in_namespace(host, code: str, timeout: float = 60.0):
    """Run Python inside a host's namespace (this test's own namespace cannot reach the bridge)."""
    out = host.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise AssertionError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def state(host) -> dict:
    return in_namespace(host, f"import json; from tests.swarm_harness import get_json; "
                              f"print(json.dumps(get_json('http://{host.addr}:{PORT}/api/swarm')))")


def chat_ids(host, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt_ids": prompt, "max_tokens": max_tokens}
    return in_namespace(host, f"import json; from tests.swarm_harness import chat_ws; "
                              f"print(json.dumps(chat_ws('http://{host.addr}:{PORT}', {body!r})))", timeout=120)


def test_three_namespaces_split_and_pull_shards(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    key = uuid.uuid4().hex
    with netns_hosts(3) as hosts:
        daemons = []
        for host, name, speed in zip(hosts, "abc", "321"):
            args = ["--memory-budget", "300000", "--max-context", "256", "--speed", speed, "--cluster-key", key,
                    "--cache-dir", str(tmp_path / name)] + (["--model", "demo"] if name == "a" else [])
            daemons.append(Daemon(name, host.addr, PORT, args, tmp_path, env, popen=host.popen))
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    states = [state(h) for h in hosts]
                except AssertionError as e:  # not listening yet
                    states = [{"ready": False, "error": str(e)[-200:]}]
                if all(s["ready"] and len(s["nodes"]) == 3 for s in states) and len({s["epoch"] for s in states}) == 1:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"not ready: {states}\n" + "\n".join(d.log()[-2000:] for d in daemons))
                time.sleep(0.5)
            plan = [(s["name"], s["start"], s["end"]) for s in states[0]["plan"]]
            assert plan == [("a", 0, 2), ("b", 2, 4), ("c", 4, 5)]
            addresses = {n["name"]: n["addr"] for n in states[1]["nodes"]}
            assert addresses == {"a": hosts[0].addr, "b": hosts[1].addr, "c": hosts[2].addr}
            for name, (start, end) in (("b", (2, 4)), ("c", (4, 5))):
                manifests = list((tmp_path / name).glob("shards/*/*/shard.json"))
                assert [(json.loads(m.read_text())["start"], json.loads(m.read_text())["end"]) for m in manifests] == \
                    [(start, end)]
            # the source built the shards it served; its own stage it loads from the model's files
            built = sorted(json.loads(m.read_text())["start"] for m in (tmp_path / "a").glob("shards/*/*/shard.json"))
            assert built == [2, 4]

            prompt = [1, 403, 407, 261, 378]
            out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "demo", "--prompt-ids",
                                  ",".join(map(str, prompt)), "--max-tokens", "40", "--output", "ids"],
                                 capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, check=True)
            expected = [int(t) for t in out.stdout.split(",")]
            for host in hosts:
                result = chat_ids(host, prompt, 40)
                assert result.get("done", {}).get("token_ids") == expected, (host.name, result)
        finally:
            for d in daemons:
                d.stop()
