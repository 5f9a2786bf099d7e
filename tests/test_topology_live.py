"""Manual placement on running nodes: an edit of the topology file moves layers and keeps the output;
a broken edit changes nothing; the plan printed by `cake-swarm topology` applies back to the same plan."""

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.swarm_harness import REPO, Daemon, chat_ws, free_port, wait_for, wait_ready

PROMPT = [1, 403, 407, 261, 378]

TOPOLOGY = """\
model: demo
nodes:
  a:
    host: 127.0.0.1:{a}
    description: the node with the model
    layers:
      - model.layers.{a_layers}
  b:
    host: 127.0.0.1:{b}
    layers: [model.layers.{b_layers}]
"""


def placement(daemon):
    return [(s["name"], s["start"], s["end"]) for s in daemon.state()["plan"]]


@pytest.fixture
def two_nodes(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    ports = {"a": free_port(), "b": free_port()}
    topo = tmp_path / "topology.yaml"
    topo.write_text(TOPOLOGY.format(**ports, a_layers="0-2", b_layers="3-4"))
    key = uuid.uuid4().hex
    common = ["--memory-budget", "4MB", "--max-context", "256", "--cluster-key", key]
    a = Daemon("a", "127.0.0.1", ports["a"], [*common, "--model", "demo", "--topology", str(topo),
                                              "--cache-dir", str(tmp_path / "a")], tmp_path, env)
    b = Daemon("b", "127.0.0.1", ports["b"], [*common, "--cache-dir", str(tmp_path / "b")], tmp_path, env)
    try:
        wait_ready([a, b], nodes=2)
        out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "demo", "--prompt-ids",
                              ",".join(map(str, PROMPT)), "--max-tokens", "30", "--output", "ids"],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, check=True)
        yield a, b, topo, ports, [int(t) for t in out.stdout.split(",")]
    finally:
        a.stop()
        b.stop()


def ids_through(daemon):
    return chat_ws(daemon.url, {"prompt_ids": PROMPT, "max_tokens": 30})["done"]["token_ids"]


def test_edit_moves_layers_and_keeps_output(two_nodes):
    a, b, topo, ports, expected = two_nodes
    assert placement(a) == [("a", 0, 3), ("b", 3, 5)]
    assert ids_through(b) == expected
    epoch = a.state()["epoch"]

    topo.write_text(TOPOLOGY.format(**ports, a_layers="0", b_layers="1-4"))
    wait_for(lambda: placement(b) == [("a", 0, 1), ("b", 1, 5)] and all(d.state()["ready"] for d in (a, b)),
             20, "the edited plan", [a, b])
    assert a.state()["epoch"] > epoch
    assert ids_through(a) == expected and ids_through(b) == expected


def test_broken_edit_changes_nothing(two_nodes):
    a, b, topo, ports, expected = two_nodes
    before = a.state()
    broken = TOPOLOGY.format(**ports, a_layers="0-2", b_layers="2-4")  # layer 2 placed twice
    topo.write_text(broken)
    wait_for(lambda: a.state()["topology_error"], 20, "the edit to be refused", [a, b])
    error = a.state()["topology_error"]
    assert "topology.yaml:10: layer 2 placed twice" in error and "line 7" in error, error
    time.sleep(1.5)
    after = a.state()
    assert (after["epoch"], after["plan"]) == (before["epoch"], before["plan"])
    assert ids_through(b) == expected


def test_printed_topology_applies_to_the_same_plan(two_nodes, tmp_path):
    a, b, topo, ports, expected = two_nodes
    cli = [sys.executable, "-m", "swarm.cli", "topology", "--node", f"127.0.0.1:{ports['b']}"]
    printed = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "model.layers.0-2" in printed and "model.layers.3-4" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    before = placement(a)
    subprocess.run(cli + ["--apply", str(tmp_path / "printed.yaml")], capture_output=True, text=True, cwd=REPO,
                   check=True)
    wait_ready([a, b], nodes=2)
    assert placement(a) == before
    assert ids_through(a) == expected
