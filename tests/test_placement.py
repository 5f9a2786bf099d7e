"""Placement: properties of the fastest and proportional strategies on generated swarms, topology plans."""
import json
import random
from itertools import combinations, permutations

import cbor2
import pytest
import yaml
from hypothesis import assume, given, settings, strategies as st

from swarm.placement import (ModelCost, NodeOffer, Plan, PlacementError, Stage, kv_bytes_per_layer,
                             make_plan, plan_fastest, plan_from_topology, plan_proportional)
from tests.test_topology import cake_reads
from topology import TopologyError, parse, render


@st.composite
def costs(draw, max_layers=12):
    layers = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=max_layers))
    return ModelCost(tuple(layers), draw(st.integers(0, 800)), draw(st.integers(0, 800)), draw(st.integers(0, 200)))


@st.composite
def swarms(draw, max_nodes=5, max_budget=8000, min_budget=0):
    ids = draw(st.lists(st.sampled_from([f"n{i}" for i in range(10)]), min_size=1, max_size=max_nodes, unique=True))
    # Few distinct speeds so that ties (broken by node id) come up.
    speeds = st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.5])
    return [NodeOffer(i, f"name-{i}", draw(st.integers(min_budget, max_budget)), draw(speeds)) for i in ids]


@st.composite
def cases(draw, max_layers=12, max_nodes=5, roomy=False):
    """A model and a swarm whose budgets are on the model's scale, so that some plans fit and some don't."""
    cost = draw(costs(max_layers))
    total = cost.total_bytes()
    if roomy:  # budgets that a split in proportion to them mostly fits
        return cost, draw(swarms(max_nodes, min_budget=total // 2, max_budget=2 * total + 1))
    return cost, draw(swarms(max_nodes, min_budget=total // 6, max_budget=total * 5 // 4 + 1))


def plan_or_none(strategy, cost, nodes):
    try:
        return strategy(cost, nodes)
    except PlacementError:
        return None


def check_plan(plan, cost, nodes):
    by_id = {n.node_id: n for n in nodes}
    n = cost.num_layers
    assert plan.stages, "a plan has at least one stage"
    assert [s.start for s in plan.stages] == [0] + [s.end for s in plan.stages[:-1]], "contiguous and ordered"
    assert plan.stages[-1].end == n
    assert all(s.end > s.start for s in plan.stages), "no empty stages"
    placed = [layer for s in plan.stages for layer in range(s.start, s.end)]
    assert placed == list(range(n)), "every layer exactly once"
    assert len(set(plan.node_ids())) == len(plan.stages), "one stage per node"
    for i, s in enumerate(plan.stages):
        assert s.first == (i == 0) and s.last == (i == len(plan.stages) - 1)
        assert s.bytes == cost.stage_bytes(s.start, s.end, s.first, s.last)
        assert s.bytes <= by_id[s.node_id].budget_bytes, "budget held"


def min_nodes_brute_force(cost, nodes):
    """Fewest nodes that can hold the model in some order and split, by trying them all."""
    n = cost.num_layers
    for k in range(1, len(nodes) + 1):
        for subset in combinations(nodes, k):
            for order in permutations(subset):
                for cuts in combinations(range(1, n), k - 1):
                    bounds = (0, *cuts, n)
                    if all(cost.stage_bytes(s, e, s == 0, e == n) <= node.budget_bytes
                           for node, s, e in zip(order, bounds, bounds[1:])):
                        return k
    return None


# ---------------------------------------------------------------- properties

@settings(max_examples=200, deadline=None)
@given(cases())
def test_fastest_plans_are_valid_and_deterministic(case):
    cost, nodes = case
    plan = plan_or_none(plan_fastest, cost, nodes)
    assume(plan is not None)
    check_plan(plan, cost, nodes)
    assert plan.strategy == "fastest"
    assert plan_fastest(cost, nodes) == plan
    shuffled = list(nodes)
    random.Random(len(nodes)).shuffle(shuffled)
    assert plan_fastest(cost, list(reversed(shuffled))) == plan, "input order does not matter"


@settings(max_examples=200, deadline=None)
@given(cases(roomy=True))
def test_proportional_plans_are_valid_and_deterministic(case):
    cost, nodes = case
    plan = plan_or_none(plan_proportional, cost, nodes)
    assume(plan is not None)
    check_plan(plan, cost, nodes)
    assert plan_proportional(cost, list(reversed(nodes))) == plan


@settings(max_examples=500, deadline=None)  # only about a quarter of the draws fit at all
@given(cases(max_layers=7, max_nodes=4))
def test_fastest_uses_no_more_nodes_than_needed(case):
    cost, nodes = case
    need = min_nodes_brute_force(cost, nodes)
    if need is None:
        with pytest.raises(PlacementError):
            plan_fastest(cost, nodes)
    else:
        assert len(plan_fastest(cost, nodes).stages) == need


@settings(max_examples=200, deadline=None)
@given(costs(), swarms(), st.integers(0, 100))
def test_fastest_keeps_a_model_that_fits_the_fastest_node_whole(cost, nodes, spare):
    fastest = min(nodes, key=lambda n: (-n.speed, n.node_id))
    nodes = [NodeOffer(n.node_id, n.name, cost.total_bytes() + spare, n.speed) if n is fastest else n for n in nodes]
    plan = plan_fastest(cost, nodes)
    assert plan.stages == (Stage(fastest.node_id, 0, cost.num_layers, True, True, cost.total_bytes()),)


@settings(max_examples=200, deadline=None)
@given(costs(), st.data())
def test_a_model_that_does_not_fit_says_what_it_needs(cost, data):
    assume(cost.total_bytes() > 0)
    nodes = data.draw(swarms(max_budget=(cost.total_bytes() - 1) // 5))
    with pytest.raises(PlacementError) as e:
        plan_fastest(cost, nodes)
    assert e.value.needed == cost.total_bytes()
    assert e.value.offered == {n.node_id: n.budget_bytes for n in nodes}
    assert f"{cost.total_bytes()} bytes" in str(e.value)
    assert all(f"name-{n.node_id} ({n.node_id})" in str(e.value) for n in nodes)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_plan_round_trips_through_the_wire_and_a_topology(case):
    cost, nodes = case
    plan = plan_or_none(plan_fastest, cost, nodes)
    assume(plan is not None)
    assert Plan.from_dict(cbor2.loads(cbor2.dumps(plan.to_dict()))) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    by_name = {n.name: n for n in nodes}
    names = {n.node_id: n.name for n in nodes}
    topo = parse(render(plan, names=names, hosts={n.node_id: f"10.0.0.{i}:10128" for i, n in enumerate(nodes)}))
    assert plan_from_topology(topo, cost, by_name).stages == plan.stages


# ---------------------------------------------------------------- examples

def test_fastest_fills_the_fastest_node_then_the_next():
    cost = ModelCost((100,) * 10, 50, 60, 0)
    nodes = [NodeOffer("slow", "s", 10_000, 0.5), NodeOffer("fast", "f", 560, 2.0), NodeOffer("mid", "m", 600, 1.0)]
    # No single node but "slow" holds all 1110 bytes, so it alone is the plan (fewest hops).
    assert plan_fastest(cost, nodes).node_ids() == ("slow",)
    nodes[0] = NodeOffer("slow", "s", 500, 0.5)
    plan = plan_fastest(cost, nodes)
    # Two nodes are needed; the fastest pair is fast + mid, fast filled first (embedding + 5 layers).
    assert [(s.node_id, s.start, s.end) for s in plan.stages] == [("fast", 0, 5), ("mid", 5, 10)]
    assert plan.stage_of("mid").last and plan.stage_of("slow") is None


def test_fastest_puts_the_head_where_it_fits():
    # The fastest node cannot take the last layer with the head, so it goes first in the pipeline.
    cost = ModelCost((100,) * 4, 0, 1000, 0)
    nodes = [NodeOffer("a", "a", 400, 9.0), NodeOffer("b", "b", 1100, 1.0)]
    assert [(s.node_id, s.start, s.end) for s in plan_fastest(cost, nodes).stages] == [("a", 0, 3), ("b", 3, 4)]
    # When speed order fails, another order of the same nodes is used.
    nodes = [NodeOffer("a", "a", 1350, 9.0), NodeOffer("b", "b", 100, 1.0)]
    assert [(s.node_id, s.start, s.end) for s in plan_fastest(cost, nodes).stages] == [("b", 0, 1), ("a", 1, 4)]


def test_ties_are_broken_by_node_id():
    cost = ModelCost((100,) * 4, 0, 0, 0)
    nodes = [NodeOffer("b", "x", 400, 1.0), NodeOffer("a", "y", 400, 1.0)]
    assert plan_fastest(cost, nodes).node_ids() == ("a",)
    assert plan_proportional(cost, nodes).node_ids() == ("a", "b")


def test_proportional_split_follows_budgets():
    cost = ModelCost((10,) * 12, 0, 0, 0)
    nodes = [NodeOffer("a", "a", 100, 1.0), NodeOffer("b", "b", 300, 1.0), NodeOffer("c", "c", 200, 1.0)]
    plan = plan_proportional(cost, nodes)
    assert [(s.node_id, s.end - s.start) for s in plan.stages] == [("b", 6), ("c", 4), ("a", 2)]
    with pytest.raises(PlacementError, match="more than its budget"):
        plan_proportional(ModelCost((10,) * 12, 500, 0, 0), nodes)


def test_kv_bytes_and_stage_bytes():
    # Qwen2.5-7B: 4 KV heads of 128, 32k context, float16.
    assert kv_bytes_per_layer(4, 128, 32768, 2) == 64 * 2**20
    cost = ModelCost((1, 2, 3, 4), 10, 20, 100)
    assert cost.stage_bytes(1, 3, False, False) == 5 + 200
    assert cost.stage_bytes(0, 4, True, True) == cost.total_bytes() == 10 + 400 + 10 + 20


def test_make_plan_and_bad_input():
    cost = ModelCost((1,), 0, 0, 0)
    node = NodeOffer("a", "a", 10, 1.0)
    assert make_plan(cost, [node], "proportional").strategy == "proportional"
    with pytest.raises(ValueError, match="unknown strategy"):
        make_plan(cost, [node], "random")
    with pytest.raises(ValueError, match="duplicate"):
        plan_fastest(cost, [node, node])
    with pytest.raises(PlacementError, match="no nodes"):
        plan_fastest(cost, [])
    with pytest.raises(ValueError):
        ModelCost((), 0, 0, 0)


@pytest.mark.parametrize("d", [
    {"strategy": "x"},
    {"strategy": "x", "stages": []},
    {"strategy": "x", "stages": [{"node_id": "a", "start": 1, "end": 2, "first": True, "last": True, "bytes": 0}]},
    {"strategy": "x", "stages": [{"node_id": "a", "start": 0, "end": 2, "first": True, "last": False, "bytes": 0}]},
    {"strategy": "x", "stages": [{"node_id": "a", "start": 0, "end": 1, "first": True, "last": False, "bytes": 0},
                                 {"node_id": "a", "start": 1, "end": 2, "first": False, "last": True, "bytes": 0}]},
])
def test_from_dict_rejects_malformed_plans(d):
    with pytest.raises(ValueError, match="malformed plan"):
        Plan.from_dict(d)


def test_plan_from_topology_merges_entries_and_checks_budgets():
    cost = ModelCost((100,) * 6, 50, 50, 10)
    nodes = {"mac": NodeOffer("id-mac", "mac", 1000, 1.0), "pad": NodeOffer("id-pad", "pad", 400, 0.2)}
    topo = parse("mac:\n  layers: [model.layers.0-2, model.layers.3]\npad:\n  layers: [model.layers.4-5]\n")
    plan = plan_from_topology(topo, cost, nodes)
    assert plan == Plan((Stage("id-mac", 0, 4, True, False, 490), Stage("id-pad", 4, 6, False, True, 270)), "topology")
    with pytest.raises(TopologyError) as e:
        plan_from_topology(topo, cost, {**nodes, "pad": NodeOffer("id-pad", "pad", 200, 0.2)})
    assert [i.line for i in e.value.errors] == [3] and "budget is 200B" in str(e.value)
    with pytest.raises(TopologyError, match="'pad' is not in the swarm"):
        plan_from_topology(topo, cost, {"mac": nodes["mac"]})


# ---------------------------------------------------------------- cake's files, several stages on a node

def test_a_plan_may_run_a_node_twice_but_never_twice_in_a_row():
    stages = (Stage("m", 0, 2, True, False, 1), Stage("w", 2, 3, False, False, 1), Stage("m", 3, 5, False, True, 1))
    plan = Plan.from_dict(Plan(stages, "topology").to_dict())
    assert plan.stages == stages and plan.node_ids() == ("m", "w")
    assert plan.stages_of("m") == (stages[0], stages[2]) and plan.stage_of("m") == stages[0]
    assert plan.stages_of("x") == () and plan.stage_of("x") is None


def offers(**budgets):
    return {name: NodeOffer(f"id-{name}", name, budget, 1.0) for name, budget in budgets.items()}


def test_a_workers_only_file_gives_the_rest_to_the_source():
    cost = ModelCost((100,) * 8, 50, 60, 10)
    topo = parse("gpu:\n  host: '10.0.0.2:10128'\n  layers:\n    - 'model.layers.3-5'\n")
    nodes = offers(mac=1000, gpu=1000)
    plan = plan_from_topology(topo, cost, nodes, source="mac")
    assert [(s.node_id, s.start, s.end, s.first, s.last) for s in plan.stages] == [
        ("id-mac", 0, 3, True, False), ("id-gpu", 3, 6, False, False), ("id-mac", 6, 8, False, True)]
    assert [s.bytes for s in plan.stages] == [cost.stage_bytes(s.start, s.end, s.first, s.last) for s in plan.stages]
    # both of the source's stages must fit its budget together
    together = plan.stages[0].bytes + plan.stages[2].bytes
    with pytest.raises(TopologyError, match="'mac' needs .* layers 0-2, layers 6-7 \\+ embedding \\+ head"):
        plan_from_topology(topo, cost, offers(mac=together - 1, gpu=1000), source="mac")
    with pytest.raises(TopologyError, match="layers 0-2 not placed"):
        plan_from_topology(topo, cost, nodes)  # no source: the file must place every layer


def test_empty_layers_everywhere_place_by_the_strategy_over_the_file_and_the_source():
    cost = ModelCost((100,) * 8, 50, 60, 10)
    topo = parse("a:\n  host: 'a:1'\n  layers: []\nb:\n  host: 'b:1'\n  layers: []\n")
    nodes = {**offers(src=500, a=2000, b=2000), "c": NodeOffer("id-c", "c", 10**6, 9.0)}  # c is not in the file
    plan = plan_from_topology(topo, cost, nodes, source="src", strategy="proportional")
    assert plan.strategy == "topology" and set(plan.node_ids()) == {"id-src", "id-a", "id-b"}
    assert plan.stages == plan_proportional(cost, [nodes[n] for n in ("a", "b", "src")]).stages


def test_a_plan_with_a_node_twice_round_trips_through_both_layouts():
    cost = ModelCost((100,) * 8, 50, 60, 10)
    nodes = offers(mac=1000, gpu=1000, pad=1000)
    topo = parse("mac:\n  layers: [model.layers.0-1, model.layers.6-7]\ngpu:\n  layers: [model.layers.2-3]\n"
                 "pad:\n  layers: [model.layers.4-5]\n")
    plan = plan_from_topology(topo, cost, nodes)
    assert [s.node_id for s in plan.stages] == ["id-mac", "id-gpu", "id-pad", "id-mac"]
    names = {n.node_id: n.name for n in nodes.values()}
    hosts = {n.node_id: f"{n.name}.local:10128" for n in nodes.values()}
    assert plan_from_topology(parse(render(plan, names=names, hosts=hosts)), cost, nodes) == plan
    cake = render(plan, names=names, hosts=hosts, cake=True, master="id-mac")
    assert "mac" not in yaml.safe_load(cake)
    assert cake_reads(cake) == {f"model.layers.{i}": n for n, r in (("gpu", (2, 3)), ("pad", (4, 5))) for i in r}
    assert plan_from_topology(parse(cake), cost, nodes, source="mac") == plan


@settings(max_examples=200, deadline=None)
@given(cases(), st.data())
def test_plans_round_trip_through_cakes_layout_with_any_source(case, data):
    cost, nodes = case
    plan = plan_or_none(plan_fastest, cost, nodes)
    assume(plan is not None)
    master = data.draw(st.sampled_from(nodes))
    names = {n.node_id: n.name for n in nodes}
    hosts = {n.node_id: f"10.0.0.{i}:10128" for i, n in enumerate(nodes)}
    cake = render(plan, names=names, hosts=hosts, cake=True, master=master.node_id)
    assert cake_reads(cake) == {f"model.layers.{i}": names[s.node_id] for s in plan.stages
                                if s.node_id != master.node_id for i in range(s.start, s.end)}
    again = plan_from_topology(parse(cake), cost, {n.name: n for n in nodes}, source=master.name)
    assert again.stages == plan.stages


# ---------------------------------------------------------------- a shorter --max-context

def test_no_split_fits_says_which_max_context_would_fit():
    # 3 layers of 1000 bytes, each with 501 bytes of KV cache for 1000 tokens; nodes of 3000 and 1600 bytes
    cost = ModelCost((1000,) * 3, 0, 0, 501, max_context=1000)
    nodes = [NodeOffer("a", "a", 3000, 2.0), NodeOffer("b", "b", 1600, 1.0)]
    with pytest.raises(PlacementError) as e:
        plan_fastest(cost, nodes)
    # a takes two layers once their KV cache is 500 bytes or less: ceil(501 * n / 1000) <= 500 up to n = 998
    assert e.value.context_that_fits == 998
    assert str(e.value).startswith("no split fits")
    assert str(e.value).endswith("; with --max-context 998 or less it would fit (KV cache 1.46KiB instead of "
                                 "1.47KiB for 1000 tokens)")
    shorter = ModelCost((1000,) * 3, 0, 0, 500, max_context=998)
    assert [(s.node_id, s.start, s.end) for s in plan_fastest(shorter, nodes).stages] == [("a", 0, 2), ("b", 2, 3)]
    with pytest.raises(PlacementError) as e:  # without the context it is sized for, nothing to say
        plan_fastest(ModelCost((1000,) * 3, 0, 0, 501), nodes)
    assert e.value.context_that_fits is None and "--max-context" not in str(e.value)


@settings(max_examples=150, deadline=None)
@given(cases(), st.integers(2, 5000), st.sampled_from([plan_fastest, plan_proportional]))
def test_the_max_context_named_is_the_longest_that_fits(case, context, strategy):
    cost, nodes = case
    cost = ModelCost(cost.layer_bytes, cost.embed_bytes, cost.head_bytes, cost.kv_bytes_per_layer * 40 + 1, context)
    try:
        strategy(cost, nodes)
        return
    except PlacementError as e:
        fits = e.context_that_fits

    def plan_at(tokens):
        shorter = ModelCost(cost.layer_bytes, cost.embed_bytes, cost.head_bytes,
                            -(-cost.kv_bytes_per_layer * tokens // context), tokens)
        return plan_or_none(strategy, shorter, nodes)

    if fits is None:
        assert plan_at(1) is None
    else:
        assert 1 <= fits < context and plan_at(fits) is not None and (fits + 1 == context or plan_at(fits + 1) is None)
