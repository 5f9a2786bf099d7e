"""Manual placement on running nodes: an edit of the topology file moves layers and keeps the output;
a broken edit changes nothing; the plan printed by `cake-swarm topology` (ours or cake's layout) applies
back to the same plan; cake's workers-only files give the source the layers no one names."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

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


# cake's kind of file: the workers only; the node started with --model (cake's master) takes the rest
WORKERS_ONLY = """\
b:
  host: '127.0.0.1:{b}'
  description: 'the node without the model'
  layers:
    - 'model.layers.{b_layers}'
"""


def put_topology(daemon, text: str) -> tuple[int, dict]:
    request = urllib.request.Request(daemon.url + "/api/topology", text.encode(), method="PUT",
                                     headers={"Content-Type": "application/yaml"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ready_on(daemons, expected_placement):
    wait_for(lambda: placement(daemons[0]) == expected_placement and all(d.state()["ready"] for d in daemons),
             30, f"the plan {expected_placement}", daemons)


def test_a_workers_only_topology_file_gives_the_source_the_rest(two_nodes):
    a, b, topo, ports, expected = two_nodes
    topo.write_text(WORKERS_ONLY.format(b=ports["b"], b_layers="2-4"))  # the file `up --topology` watches
    ready_on([a, b], [("a", 0, 2), ("b", 2, 5)])
    assert a.state()["topology_error"] is None
    assert ids_through(b) == expected


def test_a_workers_only_file_put_gives_the_source_the_rest(two_nodes):
    a, b, _, ports, expected = two_nodes
    status, body = put_topology(b, WORKERS_ONLY.format(b=ports["b"], b_layers="3-4"))  # b passes it to a
    assert status == 200, body
    ready_on([a, b], [("a", 0, 3), ("b", 3, 5)])
    assert ids_through(a) == expected and ids_through(b) == expected


def test_the_cake_export_applies_back_to_the_same_plan(two_nodes, tmp_path):
    a, b, _, ports, expected = two_nodes
    cli = [sys.executable, "-m", "swarm.cli", "topology", "--node", f"127.0.0.1:{ports['b']}"]
    printed = subprocess.run(cli + ["--cake"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    with urllib.request.urlopen(a.url + "/api/topology?format=cake", timeout=10) as r:
        assert r.read().decode() == printed
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(a.url + "/api/topology?format=xml", timeout=10)
    assert e.value.code == 400
    # cake's layout: the workers only, at the top level; a, the model's node, is cake's master
    assert yaml.safe_load(printed) == {"b": {"host": f"127.0.0.1:{ports['b']}", "layers": ["model.layers.3-4"]}}
    before = a.state()
    (tmp_path / "cake.yml").write_text(printed)
    subprocess.run(cli + ["--apply", str(tmp_path / "cake.yml")], capture_output=True, text=True, cwd=REPO, check=True)
    wait_for(lambda: a.state()["epoch"] > before["epoch"], 20, "the applied file's epoch", [a, b])
    ready_on([a, b], [(s["name"], s["start"], s["end"]) for s in before["plan"]])
    assert ids_through(b) == expected


def test_a_worker_in_the_middle_makes_the_source_run_two_stages(two_nodes):
    a, b, _, ports, expected = two_nodes
    status, body = put_topology(a, WORKERS_ONLY.format(b=ports["b"], b_layers="1-2"))
    assert status == 200, body
    ready_on([a, b], [("a", 0, 1), ("b", 1, 3), ("a", 3, 5)])
    assert ids_through(a) == expected and ids_through(b) == expected


def test_image_model_files_are_refused_with_their_line(two_nodes):
    a, b, _, ports, _ = two_nodes
    before = a.state()
    status, body = put_topology(a, f"worker1:\n  host: '127.0.0.1:{ports['b']}'\n  layers: ['ltx2-transformer.3-4']\n")
    assert status == 400 and body["errors"][0]["line"] == 3
    assert "this swarm runs text models" in body["errors"][0]["message"]
    assert a.state()["epoch"] == before["epoch"]


def test_the_swarm_stops_at_the_demos_end_token_as_generate_does(two_nodes):
    a, b, *_ = two_nodes
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "demo", "--prompt-ids",
                          ",".join(map(str, PROMPT)), "--max-tokens", "400", "--output", "ids"],
                         capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(a.log_path.parent / "xdg")})
    alone = [int(t) for t in out.stdout.split(",")]
    assert alone[-1] == 1 and len(alone) < 400  # the story ends with BOS, as in llama2.c's run.c
    done = chat_ws(b.url, {"prompt_ids": PROMPT, "max_tokens": 400})["done"]
    assert done["token_ids"] == alone and done["finish_reason"] == "stop"
