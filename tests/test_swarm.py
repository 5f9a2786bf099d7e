"""Three real daemons on loopback: a three-way split gives exactly the single-node tokens, through every node."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.swarm_harness import REPO, Daemon, chat_ws, free_port, wait_ready

# Budgets that hold two layers (+ KV for --max-context 256, + embedding or head) but not three: a 2/2/2 split.
# A model is "demo" or the name of a session fixture (tests/conftest.py) whose checkpoint mlx-lm wrote.
MODELS = {
    "tiny_qwen2": ("tiny_qwen2", "1700000"),
    "demo": ("demo", "300000"),
}


def single_node_ids(model: str, prompt: list[int], max_tokens: int, env: dict) -> list[int]:
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", model, "--prompt-ids",
                          ",".join(map(str, prompt)), "--max-tokens", str(max_tokens), "--output", "ids"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=True)
    return [int(t) for t in out.stdout.strip().split(",")]


@pytest.mark.parametrize("model_name,discovery", [("tiny_qwen2", "mdns"), ("demo", "mdns"), ("demo", "peer")])
def test_three_way_split_equals_one_node(request, tmp_path, model_name, discovery):
    """The model only on a; budgets force a 2/2/2 split; b and c find a through mDNS (or --peer)."""
    model, budget = MODELS[model_name]
    if model != "demo":
        model = str(request.getfixturevalue(model).folder)
    seed_port = free_port()
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    key = uuid.uuid4().hex  # a cluster of this test's own: daemons of other tests on loopback are ignored
    daemons = []
    try:
        for name, speed in (("a", "3"), ("b", "2"), ("c", "1")):
            args = ["--memory-budget", budget, "--max-context", "256", "--speed", speed,
                    "--cache-dir", str(tmp_path / name), "--cluster-key", key]
            if discovery == "peer":
                args += ["--no-mdns"] + ([] if name == "a" else ["--peer", f"127.0.0.1:{seed_port}"])
            if name == "a":
                args += ["--model", model]
            daemons.append(Daemon(name, "127.0.0.1", seed_port if name == "a" else free_port(), args, tmp_path, env))
        states = wait_ready(daemons, nodes=3)
        plan = states[0]["plan"]
        layers = plan[-1]["end"]
        assert [(s["name"], s["start"], s["end"]) for s in plan] == [("a", 0, 2), ("b", 2, 4), ("c", 4, layers)]
        # b and c pulled their shards from a: their caches hold exactly their stage
        for d, (start, end) in zip(daemons[1:], [(2, 4), (4, layers)]):
            manifests = list((tmp_path / d.name).glob("shards/*/*/shard.json"))
            assert [(json.loads(m.read_text())["start"], json.loads(m.read_text())["end"]) for m in manifests] == [(start, end)]

        status = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--node", f"127.0.0.1:{daemons[1].port}"],
                                capture_output=True, text=True, cwd=REPO, timeout=30, check=True).stdout
        assert "ready, epoch" in status and "shard 2-4: [" + "#" * 30 + "] 100%" in status, status

        prompt = [1, 17, 99, 212, 3, 300, 42]
        expected = single_node_ids(model, prompt, 40, {**os.environ, **env})
        for d in daemons:
            result = chat_ws(d.url, {"prompt_ids": prompt, "max_tokens": 40})
            assert "done" in result, result
            assert result["done"]["token_ids"] == expected, d.name
    finally:
        for d in daemons:
            d.stop()


def test_node_addresses_take_the_forms_users_paste():
    from swarm.cli import _node_url
    for given in ("127.0.0.1:10128", "http://127.0.0.1:10128", "http://127.0.0.1:10128/", "127.0.0.1:10128/"):
        assert _node_url(given) + "/ws/chat" == "http://127.0.0.1:10128/ws/chat", given
    assert _node_url("https://node.example:8443/") == "https://node.example:8443"
