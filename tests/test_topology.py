"""Topology YAML: parse both layouts, validate with line numbers, render and read back, sizes; cake's own
kinds of files (workers only, `layers: []`, other layer prefixes, blocks that do not join up)."""
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from topology import (NodeSpec, Topology, TopologyError, format_size, parse, parse_size, pipeline, render,
                      validate)

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "topology" / "examples").glob("*.yaml"))

# Qwen2.5-7B-Instruct 4-bit (group 64: 0.5 byte a weight + fp16 scale and bias per 64 weights),
# KV cache for 32k tokens in float16.
Q4 = 0.5 + 4 / 64
QWEN7B_LAYER = int(Q4 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944))
QWEN7B_EMBED = int(Q4 * 152064 * 3584)
QWEN7B_KV = 2 * 4 * 128 * 32768 * 2


def qwen7b_cost(_node, start, end, first, last):
    return (end - start) * (QWEN7B_LAYER + QWEN7B_KV) + QWEN7B_EMBED * first + QWEN7B_EMBED * last


def issues_of(text, num_layers=28, **kw):
    return [(i.line, i.message) for i in validate(parse(text), num_layers, **kw)]


def parse_error(text):
    with pytest.raises(TopologyError) as e:
        parse(text, "t.yaml")
    return [(i.line, i.message) for i in e.value.errors], str(e.value)


# ---------------------------------------------------------------- examples and layouts

def test_there_are_four_examples():
    assert len(EXAMPLES) == 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_validates_for_qwen7b(path):
    topo = parse(path.read_text(), str(path))
    assert len(topo.nodes) == 2
    assert all(n.host and n.memory_budget for n in topo.nodes.values())
    # the source, started with --model, takes what a file leaves to no one (the workers-only example)
    budgets = {"source": 10 * 2**30}
    assert validate(topo, 28, layer_cost=qwen7b_cost, source="source", budgets=budgets) == []
    assert [layer for _, s, e in pipeline(topo, 28, "source") for layer in range(s, e)] == list(range(28))
    assert parse(render(topo)) == topo


def test_both_layouts_read_the_same():
    ours = parse("""
model: m
nodes:
  a:
    host: 10.0.0.1:10128
    layers: [model.layers.0-3]
  b:
    host: 10.0.0.2:10128
    description: second
    memory_budget: 800MB
    layers:
      - model.layers.4-6
      - model.layers.7
""")
    cake = parse("""
model: m
a:
  host: '10.0.0.1:10128'
  layers:
    - 'model.layers.0-3'
b:
  host: '10.0.0.2:10128'
  description: 'second'
  memory_budget: 800000000
  layers: ['model.layers.4-6', 'model.layers.7']
""")
    assert ours == cake
    assert ours.model == "m"
    assert list(ours.nodes) == ["a", "b"]
    assert ours.nodes["b"] == NodeSpec("b", "10.0.0.2:10128", "second", ((4, 7), (7, 8)), 800_000_000)
    assert ours.nodes["b"].line == 7 and ours.nodes["b"].layer_lines == (12, 13)


def test_cake_readme_topology_and_cake_extra_fields():
    topo = parse("""
linux_server_1:
  host: 'linux_server.host:10128'
  description: 'NVIDIA Titan X Pascal (12GB)'
  layers:
    - 'model.layers.0-5'
iphone:
  host: 'iphone.host:10128'
  description: 'iPhone 15 Pro Max'
  vram_bytes: 8000000000
  tflops: 2.1
  backend: 'Metal'
  layers:
    - 'model.language_model.layers.6'
macbook:
  host: 'macbook.host:10128'
  layers:
    - 'model.layers.7-31'
""")
    assert topo.model is None
    assert topo.placement() == (("linux_server_1", 0, 6), ("iphone", 6, 7), ("macbook", 7, 32))
    assert validate(topo, 32) == []


def test_a_node_named_nodes_in_cake_layout():
    topo = parse("nodes:\n  host: h:1\n  layers: [model.layers.0-1]\n")
    assert topo.placement() == (("nodes", 0, 2),)


# ---------------------------------------------------------------- parse errors with lines

def test_malformed_ranges_name_their_lines():
    errors, text = parse_error("""\
a:
  host: h:1
  layers:
    - model.layers.7-3
    - layers.x
    - model.layers.-1
    - model.layers.2
""")
    assert [line for line, _ in errors] == [4, 5, 6]
    assert "ends (3) before it starts (7)" in errors[0][1]
    assert "'layers.x'" in errors[1][1] and "'model.layers.-1'" in errors[2][1]
    assert text.splitlines()[0].startswith("t.yaml:4: node 'a': malformed layer range")


def test_yaml_syntax_error_has_its_line():
    errors, text = parse_error("a:\n  host: h:1\n   layers: [model.layers.0]\n")
    assert errors[0][0] == 3 and "YAML syntax error" in errors[0][1]
    assert text.startswith("t.yaml:3: YAML syntax error")


@pytest.mark.parametrize("text, line, words", [
    ("a:\n  host: h\n  layer: [model.layers.0]\n", 1, "has no 'layers'"),
    ("a:\n  host: h\n  layer: [model.layers.0]\n  layers: []\n", 3, "unknown key 'layer'"),
    ("a:\n  layers: []\nb:\n  layers: []\na:\n  layers: []\n", 5, "'a' defined twice (first on line 1)"),
    ("a:\n  layers: []\n  memory_budget: lots\n", 3, "bad size 'lots'"),
    ("a: model.layers.0\n", 1, "must be a mapping"),
    ("model: m\nnodes:\n  a: {layers: []}\nextra: 1\n", 4, "unknown top-level key 'extra'"),
    ("- a\n- b\n", 1, "a mapping of node names"),
    ("\n", 1, "empty topology"),
])
def test_structure_errors_name_their_lines(text, line, words):
    errors, _ = parse_error(text)
    assert errors[0][0] == line and words in errors[0][1], errors


def test_every_parse_error_is_reported_at_once():
    errors, _ = parse_error("a:\n  layers: [model.layers.x]\nb:\n  oops: 1\n  layers: [model.layers.9-1]\n")
    assert [line for line, _ in errors] == [2, 4, 5]


# ---------------------------------------------------------------- validation with lines

TWO = """\
a:
  host: h:1
  layers:
    - model.layers.0-9
b:
  host: h:2
  layers:
    - model.layers.10-27
"""


def test_valid_topology_has_no_issues():
    assert issues_of(TWO, known_nodes={"a", "b"}, budgets={"a": 10**12, "b": 10**12}, layer_cost=qwen7b_cost) == []


def test_layer_placed_twice_names_both_lines():
    issues = issues_of(TWO.replace("0-9", "0-12"))
    assert issues == [(8, "layers 10-12 placed twice: on node 'a' (line 4) and on node 'b' (line 8)")]


def test_layer_placed_twice_on_one_node():
    issues = issues_of("a:\n  layers:\n    - model.layers.0-27\n    - model.layers.5\n")
    assert issues == [(4, "layer 5 placed twice: on node 'a' (line 3) and again (line 4)")]


def test_missing_layers_are_named():
    issues = issues_of(TWO.replace("10-27", "14-27"))
    assert issues == [(4, "layers 10-13 not placed on any node (the model has 28 layers: 0-27)")]
    assert issues_of(TWO.replace("0-9", "1-9")) == [
        (4, "layer 0 not placed on any node (the model has 28 layers: 0-27)")]


def test_range_past_the_last_layer():
    issues = issues_of(TWO.replace("10-27", "10-31"))
    assert issues == [(8, "node 'b': layers 10-31 goes past the model's last layer (the model has 28 layers: 0-27)")]


def test_unknown_node():
    issues = issues_of(TWO, known_nodes={"a", "c"})
    assert issues == [(5, "node 'b' (h:2) is not in the swarm (known: a, c)")]


def test_node_over_its_budget():
    need_b = qwen7b_cost("b", 10, 28, False, True)
    over = TWO.replace("  host: h:2\n", "  host: h:2\n  memory_budget: 2GiB\n")
    issues = issues_of(over, layer_cost=qwen7b_cost)
    assert issues == [(5, f"node 'b' needs {format_size(need_b)} for layers 10-27 + head (incl. KV cache) "
                          f"but its budget is 2GiB")]
    # The budget a node offers counts as well, and the smaller of the two holds.
    assert [line for line, _ in issues_of(TWO, budgets={"a": 2**30}, layer_cost=qwen7b_cost)] == [1]
    roomy = TWO.replace("  host: h:1\n", "  host: h:1\n  memory_budget: 100GiB\n")
    assert [line for line, _ in issues_of(roomy, budgets={"a": 2**30}, layer_cost=qwen7b_cost)] == [1]
    assert issues_of(roomy, budgets={"a": 2**40}, layer_cost=qwen7b_cost) == []


def test_blocks_that_do_not_join_up_are_stages_of_their_own():
    text = "a:\n  layers: [model.layers.0-4, model.layers.10-27]\nb:\n  layers: [model.layers.5-9]\n"
    assert issues_of(text) == []
    assert pipeline(parse(text), 28) == (("a", 0, 5), ("b", 5, 10), ("a", 10, 28))
    # Entries that join up are one range.
    assert pipeline(parse("a:\n  layers: [model.layers.0-4, model.layers.5-27]\n"), 28) == (("a", 0, 28),)


def test_a_node_with_two_blocks_needs_room_for_both():
    text = ("a:\n  memory_budget: 4GiB\n  layers: [model.layers.0-4, model.layers.10-27]\n"
            "b:\n  layers: [model.layers.5-9]\n")
    need = qwen7b_cost("a", 0, 5, True, False) + qwen7b_cost("a", 10, 28, False, True)
    assert issues_of(text, layer_cost=qwen7b_cost) == [
        (1, f"node 'a' needs {format_size(need)} for layers 0-4, layers 10-27 + embedding + head (incl. KV cache) "
            f"but its budget is 4GiB")]


def test_issues_come_sorted_by_line():
    text = TWO.replace("0-9", "0-11").replace("10-27", "10-30")
    lines = [line for line, _ in issues_of(text, known_nodes={"b"})]
    assert lines == sorted(lines) and lines[0] == 1 and len(lines) == 3


# ---------------------------------------------------------------- cake's own kinds of files

CAKE_LAYER_RANGE = re.compile(r"^(.+[^\d])(\d+)-(\d+)$")


def cake_reads(text: str) -> dict[str, str]:
    """Which worker cake's master sends each layer name to, by cake's rules for a topology file (written
    out here): a mapping of worker names to nodes whose host and layers must be there; `P.A-B` names
    P.A to P.B; any other name is taken as it is; a layer no worker names runs on the master."""
    owner = {}
    for worker, node in (yaml.safe_load(text) or {}).items():
        assert isinstance(node["host"], str) and isinstance(node["layers"], list), node
        for name in node["layers"]:
            m = CAKE_LAYER_RANGE.match(name)
            for layer in ([f"{m[1]}{i}" for i in range(int(m[2]), int(m[3]) + 1)] if m else [name]):
                owner[layer] = worker
    return owner


# Two workers of a 24-layer model whose checkpoint calls its layers model.language_model.layers.N.
TWO_WORKERS = """\
pi:
  host: 'pi.local:10128'
  description: 'Raspberry Pi 5 (CPU)'
  layers:
    - 'model.language_model.layers.0-1'

laptop:
  host: 'laptop.local:10128'
  description: 'Apple M1 (Metal)'
  layers:
    - 'model.language_model.layers.2-3'
"""

# One worker in the middle, as `cake split` writes a worker's own file.
ONE_WORKER = """\
gpu:
  host: "192.168.50.20:10128"
  layers:
    - "model.layers.8-15"
"""


def test_a_workers_only_file_leaves_the_rest_to_the_source():
    topo = parse(TWO_WORKERS)
    assert validate(topo, 24, source="master") == []
    assert pipeline(topo, 24, "master") == (("pi", 0, 2), ("laptop", 2, 4), ("master", 4, 24))
    assert issues_of(TWO_WORKERS, 24) == [(11, "layers 4-23 not placed on any node (the model has 24 layers: 0-23)")]
    # a file that lists the source itself says where all of its layers go: a gap is a mistake
    listed = TWO_WORKERS + "master:\n  host: 'm:1'\n  layers: ['model.language_model.layers.4-20']\n"
    assert issues_of(listed, 24, source="master") == [
        (14, "layers 21-23 not placed on any node (the model has 24 layers: 0-23)")]


def test_the_source_around_a_worker_runs_two_stages():
    topo = parse(ONE_WORKER)
    assert pipeline(topo, 24, "master") == (("master", 0, 8), ("gpu", 8, 16), ("master", 16, 24))
    cost = lambda _n, s, e, first, last: (e - s) * 100 + 1000 * first + 1000 * last  # noqa: E731
    # both of the source's stages count against its budget, with embedding and head
    assert validate(topo, 24, source="master", layer_cost=cost, budgets={"master": 3600}) == []
    issues = validate(topo, 24, source="master", layer_cost=cost, budgets={"master": 3599})
    assert [i.message for i in issues] == ["node 'master' needs 3.52KiB for layers 0-7, layers 16-23 + embedding + "
                                           "head (incl. KV cache) but its budget is 3.51KiB"]
    assert [i.message for i in validate(topo, 24, source="master", known_nodes={"gpu"})] == [
        "the source node 'master' is not in the swarm"]


def test_empty_layers_everywhere_mean_assign_automatically():
    topo = parse("a:\n  host: 'a:1'\n  layers: []\nb:\n  host: 'b:1'\n  layers: []\n")
    assert topo.automatic and validate(topo, 24) == [] and validate(topo, 24, source="master") == []
    # beside a node that has layers, [] is a node that holds none (cake does the same)
    mixed = parse("a:\n  host: 'a:1'\n  layers: []\nb:\n  host: 'b:1'\n  layers: ['model.layers.0-9']\n")
    assert not mixed.automatic and pipeline(mixed, 24, "master") == (("b", 0, 10), ("master", 10, 24))


def test_embedding_norm_and_head_names_place_nothing():
    text = """\
worker:
  host: '10.0.0.2:10128'
  layers:
    - 'model.embed_tokens'
    - 'model.layers.0-3'
    - 'model.norm'
    - 'lm_head'
"""
    topo = parse(text)
    assert topo.nodes["worker"].layers == ((0, 4),)
    assert topo.nodes["worker"].parts == ("model.embed_tokens", "model.norm", "lm_head")
    assert pipeline(topo, 8, "master") == (("worker", 0, 4), ("master", 4, 8))
    assert parse(render(topo)) == topo and parse(render(topo, cake=True)).nodes == topo.nodes
    only_parts = parse("worker:\n  host: 'w:1'\n  layers: ['model.norm']\n")
    assert not only_parts.automatic and only_parts.placement() == ()


@pytest.mark.parametrize("name", ["unet", "vae", "clip", "ltx2-transformer", "ltx2-transformer.22-47",
                                  "wan-transformer", "flux1_transformer"])
def test_image_and_video_models_parts_are_refused(name):
    errors, text = parse_error(f"worker1:\n  host: \"192.168.1.158:10128\"\n  layers:\n    - \"{name}\"\n")
    assert [line for line, _ in errors] == [4]
    assert f"{name!r} is not a layer of a text model: this swarm runs text models" in errors[0][1]


def test_render_keeps_the_layer_prefix_as_written():
    topo = parse(TWO_WORKERS)
    assert topo.layer_prefix == "model.language_model.layers."
    for cake in (False, True):
        text = render(topo, cake=cake)
        assert "model.language_model.layers.0-1" in text and "model.language_model.layers.2-3" in text
        assert "'model.layers." not in text and " model.layers." not in text
        again = parse(text)
        assert again.nodes == topo.nodes and render(again, cake=cake) == text  # exact, both ways
    assert cake_reads(render(topo, cake=True)) == {f"model.language_model.layers.{i}": w
                                                   for w, layers in (("pi", (0, 1)), ("laptop", (2, 3)))
                                                   for i in layers}


def test_cake_reads_our_files_as_we_do():
    for text in (TWO_WORKERS, ONE_WORKER, TWO, *(p.read_text() for p in EXAMPLES)):
        topo = parse(text)
        cake = render(topo, cake=True)
        expected = {f"{p}{i}": n.name for n in topo.nodes.values()
                    for (s, e), p in zip(n.layers, n.layer_prefixes) for i in range(s, e)}
        assert cake_reads(cake) == expected
        assert "model:" not in cake and "nodes:" not in cake


# ---------------------------------------------------------------- render round trip

# The format's own words are names too: they must not confuse the two layouts.
names = st.sampled_from(["nodes", "model", "layers", "host", "yes", "123"]) | \
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10)
texts = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


@st.composite
def topologies(draw):
    num_layers = draw(st.integers(1, 40))
    cuts = draw(st.sets(st.integers(1, num_layers - 1), max_size=6)) if num_layers > 1 else set()
    bounds = [0, *sorted(cuts), num_layers]
    node_names = draw(st.lists(names, min_size=len(bounds) - 1, max_size=len(bounds) - 1, unique=True))
    nodes = {}
    for name, s, e in zip(node_names, bounds, bounds[1:]):
        nodes[name] = NodeSpec(name, draw(st.none() | texts), draw(st.none() | texts), ((s, e),),
                               draw(st.none() | st.integers(0, 2**42)))
    return Topology(draw(st.none() | names), nodes), num_layers


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_render_then_parse_gives_the_same_topology(case):
    topo, num_layers = case
    again = parse(render(topo))
    assert again == topo
    assert list(again.nodes) == list(topo.nodes)
    assert validate(again, num_layers) == []
    cake = parse(render(topo, cake=True))
    assert cake.placement() == topo.placement() and cake.model is None


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("text, n", [
    ("6GiB", 6 * 2**30), ("800MB", 800 * 10**6), ("1.5MB", 1_500_000), ("123", 123), (123, 123),
    ("24 GiB", 24 * 2**30), ("2gb", 2 * 10**9), ("1.5KiB", 1536), ("7B", 7), ("1TiB", 2**40),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "GiB", "-1", "6XB", "1.2.3GB", "6 G", -5, True])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size():
    assert [format_size(n) for n in (123, 1536, 24 * 2**30, 800 * 10**6, 0)] == \
        ["123B", "1.5KiB", "24GiB", "762.94MiB", "0B"]


@given(st.integers(0, 2**50))
def test_format_size_reads_back_close(n):
    assert abs(parse_size(format_size(n)) - n) <= n * 0.005 + 0.5
