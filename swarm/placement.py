"""Placement: which node holds which layers. Pure functions of (model cost, node offers, topology).

A plan is a pipeline of stages, each one node holding a contiguous layer range [start, end); the
first stage also holds the embedding, the last the final norm and lm_head. The strategies give each
node at most one stage; a topology may give a node several (blocks that do not join up), never two
in a row. Strategies:

- fastest (default): fewest nodes, fastest first. A pipeline at batch 1 pays per layer and per hop,
  so the plan uses as few nodes as can hold the model, picks the fastest such set, and fills its
  nodes in speed order, each with as many layers as fit its budget. A model that fits on one node
  is not split.
- proportional: exo's memory-weighted split over every node, checked against budgets.
- topology: a person's topology YAML, validated (see topology/); the source node takes the layers
  a file lists for no one, and a file whose nodes all have `layers: []` is placed by the strategy.

A model that does not fit fails with what it needs and what the swarm offers, and, when a shorter
--max-context would make it fit, with the longest that would.

Ties are broken by node id, so the same input always gives the same plan.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, replace
from itertools import accumulate
from typing import Callable, Iterable, Mapping

from topology import Topology, TopologyError, format_size, pipeline, validate

__all__ = [
    "NodeOffer", "ModelCost", "Stage", "Plan", "PlacementError", "kv_bytes_per_layer",
    "plan_fastest", "plan_proportional", "plan_from_topology", "make_plan", "STRATEGIES",
]

# Above this many nodes the exact fewest-nodes search (2**n subsets) gives way to a plain fill in
# speed order, which is still valid but may use a node more than needed.
EXACT_SEARCH_MAX_NODES = 14


@dataclass(frozen=True)
class NodeOffer:
    node_id: str
    name: str
    budget_bytes: int
    speed: float  # measured GB/s, higher is faster


def kv_bytes_per_layer(num_kv_heads: int, head_dim: int, max_context: int, dtype_bytes: int) -> int:
    """Bytes of one layer's K and V caches at max_context tokens."""
    return 2 * num_kv_heads * head_dim * max_context * dtype_bytes


@dataclass(frozen=True)
class ModelCost:
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int  # final norm + lm_head (or the embedding again when tied): the caller decides
    kv_bytes_per_layer: int
    max_context: int = 0  # the tokens kv_bytes_per_layer holds (--max-context); 0 when unknown

    def __post_init__(self):
        sizes = (*self.layer_bytes, self.embed_bytes, self.head_bytes, self.kv_bytes_per_layer)
        if not self.layer_bytes or min(sizes) < 0:
            raise ValueError("a model has at least one layer and no negative sizes")

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    def stage_bytes(self, start: int, end: int, first: bool, last: bool) -> int:
        return (sum(self.layer_bytes[start:end]) + (end - start) * self.kv_bytes_per_layer
                + self.embed_bytes * first + self.head_bytes * last)

    def total_bytes(self) -> int:
        return self.stage_bytes(0, self.num_layers, True, True)


@dataclass(frozen=True)
class Stage:
    node_id: str
    start: int
    end: int
    first: bool
    last: bool
    bytes: int


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]  # in pipeline order
    strategy: str

    def node_ids(self) -> tuple[str, ...]:
        """The nodes of the pipeline, each once, in the order of their first stage."""
        return tuple(dict.fromkeys(s.node_id for s in self.stages))

    def stage_of(self, node_id: str) -> Stage | None:
        """The node's stage (its first, when a topology gives it several), None when it has none."""
        return next((s for s in self.stages if s.node_id == node_id), None)

    def stages_of(self, node_id: str) -> tuple[Stage, ...]:
        """Every stage the node runs, in pipeline order."""
        return tuple(s for s in self.stages if s.node_id == node_id)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "stages": [asdict(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        """The inverse of to_dict, for plans received from peers. Raises ValueError on a malformed plan."""
        try:
            stages = tuple(Stage(str(s["node_id"]), int(s["start"]), int(s["end"]), bool(s["first"]),
                                 bool(s["last"]), int(s["bytes"])) for s in d["stages"])
            plan = cls(stages, str(d["strategy"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed plan: {e!r}") from None
        ends = [0] + [s.end for s in stages]
        if not stages or any(s.start != e or s.end <= s.start for s, e in zip(stages, ends)) \
                or any(a.node_id == b.node_id for a, b in zip(stages, stages[1:])) \
                or any(s.first != (i == 0) or s.last != (i == len(stages) - 1) for i, s in enumerate(stages)):
            raise ValueError("malformed plan: stages must be contiguous from layer 0, two in a row on different "
                             "nodes, flags right")
        return plan


class PlacementError(ValueError):
    """The model does not fit: says what it needs and what the swarm offers."""

    def __init__(self, cost: ModelCost, nodes: Iterable[NodeOffer], why: str = "the model does not fit",
                 context_that_fits: int | None = None):
        nodes = list(nodes)
        self.why = why
        self.needed = cost.total_bytes()
        self.offered = {n.node_id: n.budget_bytes for n in nodes}
        self.context_that_fits = context_that_fits
        layers = sum(cost.layer_bytes)
        kv = cost.kv_bytes_per_layer * cost.num_layers
        offers = ", ".join(f"{n.name} ({n.node_id}) {format_size(n.budget_bytes)}" for n in nodes) or "no nodes"
        hint = ""
        if context_that_fits:
            shorter = _kv_for(cost, context_that_fits) * cost.num_layers
            hint = (f"; with --max-context {context_that_fits} or less it would fit (KV cache {format_size(shorter)} "
                    f"instead of {format_size(kv)} for {cost.max_context} tokens)")
        super().__init__(
            f"{why}: the model needs {format_size(self.needed)} ({self.needed} bytes: {cost.num_layers} layers "
            f"{format_size(layers)} + KV cache {format_size(kv)} + embedding {format_size(cost.embed_bytes)} "
            f"+ head {format_size(cost.head_bytes)}); the swarm offers {format_size(sum(self.offered.values()))} "
            f"in all: {offers}{hint}")


def _kv_for(cost: ModelCost, context: int) -> int:
    """kv_bytes_per_layer for `context` tokens instead of cost.max_context."""
    return -(-cost.kv_bytes_per_layer * context // cost.max_context)


def _longest_context_that_fits(planner: Callable[[ModelCost, list[NodeOffer]], Plan], cost: ModelCost,
                               nodes: list[NodeOffer]) -> int | None:
    """The largest --max-context below cost.max_context for which planner finds a plan; None when none does."""
    if cost.max_context <= 1 or cost.kv_bytes_per_layer == 0:
        return None

    def fits(context: int) -> bool:
        try:
            planner(replace(cost, kv_bytes_per_layer=_kv_for(cost, context), max_context=context), nodes)
            return True
        except PlacementError:
            return False

    if not fits(1):
        return None
    lo, hi = 1, cost.max_context - 1  # fits(lo) holds; the cost only grows with the context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _with_context_hint(planner: Callable[[ModelCost, list[NodeOffer]], Plan], cost: ModelCost,
                       nodes: Iterable[NodeOffer]) -> Plan:
    """planner's plan; its PlacementError raised again with the longest --max-context that would fit."""
    nodes = _check_nodes(nodes)
    try:
        return planner(cost, nodes)
    except PlacementError as e:
        raise PlacementError(cost, nodes, e.why, _longest_context_that_fits(planner, cost, nodes)) from None


def _check_nodes(nodes: Iterable[NodeOffer]) -> list[NodeOffer]:
    nodes = list(nodes)
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate node ids in {sorted(ids)}")
    return nodes


class _Filler:
    """How far a node can take the pipeline from a given layer, in O(log n) with prefix sums."""

    def __init__(self, cost: ModelCost):
        self.cost = cost
        self.n = cost.num_layers
        self.prefix = list(accumulate((b + cost.kv_bytes_per_layer for b in cost.layer_bytes), initial=0))

    def reach(self, budget: int, start: int) -> int:
        """The largest end such that [start, end) fits budget; start when not even one layer fits."""
        limit = budget + self.prefix[start] - (self.cost.embed_bytes if start == 0 else 0)
        if self.prefix[self.n] + self.cost.head_bytes <= limit:
            return self.n
        # Ends short of the last layer carry no head, and their cost grows with end.
        return max(start, min(bisect_right(self.prefix, limit) - 1, self.n - 1))

    def stages(self, order: Iterable[NodeOffer]) -> list[Stage]:
        """Fill nodes in this order, each as far as it reaches; nodes that take nothing get no stage."""
        out, start = [], 0
        for node in order:
            if start == self.n:
                break
            end = self.reach(node.budget_bytes, start)
            if end > start:
                out.append(Stage(node.node_id, start, end, start == 0, end == self.n,
                                 self.cost.stage_bytes(start, end, start == 0, end == self.n)))
                start = end
        return out if start == self.n else []


def _by_speed(nodes: Iterable[NodeOffer]) -> list[NodeOffer]:
    return sorted(nodes, key=lambda n: (-n.speed, n.node_id))


def plan_fastest(cost: ModelCost, nodes: Iterable[NodeOffer]) -> Plan:
    """Fewest nodes; among those, the fastest set (compared fastest node first); filled in speed order."""
    return _with_context_hint(_plan_fastest, cost, nodes)


def _plan_fastest(cost: ModelCost, nodes: Iterable[NodeOffer]) -> Plan:
    ranked = _by_speed(_check_nodes(nodes))
    fill = _Filler(cost)
    if len(ranked) > EXACT_SEARCH_MAX_NODES:
        stages = fill.stages(ranked)
        if not stages:
            raise PlacementError(cost, ranked)
        return Plan(tuple(stages), "fastest")

    # reach[mask]: the farthest layer that the nodes in mask (indices into ranked) take the pipeline
    # to, every one of them used; going farther is never worse, so that is all a prefix needs to
    # keep. order[mask] is an order that gets there (the earliest in speed rank on ties).
    reach: dict[int, int] = {0: 0}
    order: dict[int, tuple[int, ...]] = {0: ()}
    for mask in range(1, 1 << len(ranked)):
        best = None
        for i in range(len(ranked)):
            prev = mask & ~(1 << i)
            if prev == mask or prev not in reach or reach[prev] == cost.num_layers:
                continue
            end = fill.reach(ranked[i].budget_bytes, reach[prev])
            if end > reach[prev]:
                cand = (-end, order[prev] + (i,))  # farthest, then earliest in speed rank
                best = cand if best is None else min(best, cand)
        if best:
            reach[mask], order[mask] = -best[0], best[1]

    full = [m for m, r in reach.items() if r == cost.num_layers]
    if not full:
        enough = sum(n.budget_bytes for n in ranked) >= cost.total_bytes()
        raise PlacementError(cost, ranked, "no split fits (each stage must fit one node's budget)" if enough
                             else "the model does not fit")
    # Fewest nodes, then the set whose fastest members are fastest.
    mask = min(full, key=lambda m: (bin(m).count("1"), [i for i in range(len(ranked)) if m >> i & 1]))
    chosen = [ranked[i] for i in range(len(ranked)) if mask >> i & 1]
    stages = fill.stages(chosen)  # speed order when it works
    if len(stages) != len(chosen):
        stages = fill.stages(ranked[i] for i in order[mask])
    return Plan(tuple(stages), "fastest")


def plan_proportional(cost: ModelCost, nodes: Iterable[NodeOffer]) -> Plan:
    """Layers split over all nodes in proportion to their budgets (as exo does), largest budget first."""
    return _with_context_hint(_plan_proportional, cost, nodes)


def _plan_proportional(cost: ModelCost, nodes: Iterable[NodeOffer]) -> Plan:
    ordered = sorted(_check_nodes(nodes), key=lambda n: (-n.budget_bytes, n.node_id))
    total = sum(n.budget_bytes for n in ordered)
    if total <= 0:
        raise PlacementError(cost, ordered, "no node offers any memory")
    n, stages, start, cum = cost.num_layers, [], 0, 0
    for node in ordered:
        cum += node.budget_bytes
        end = (2 * n * cum + total) // (2 * total)  # cumulative rounding: boundaries sum to n exactly
        if end > start:
            b = cost.stage_bytes(start, end, start == 0, end == n)
            if b > node.budget_bytes:
                raise PlacementError(cost, ordered, f"the proportional split gives {node.name} ({node.node_id}) "
                                                    f"{format_size(b)}, more than its budget")
            stages.append(Stage(node.node_id, start, end, start == 0, end == n, b))
            start = end
    return Plan(tuple(stages), "proportional")


STRATEGIES = {"fastest": plan_fastest, "proportional": plan_proportional}


def plan_from_topology(topo: Topology, cost: ModelCost, nodes_by_name: Mapping[str, NodeOffer],
                       source: str | None = None, strategy: str = "fastest") -> Plan:
    """The plan a topology pins, after validation. Raises TopologyError naming each problem's line.

    source is the name of the node that runs --model: when the file does not list it, it takes the
    layers the file gives no one (cake's master does the same). A file whose nodes all have
    `layers: []` is placed by `strategy` over its nodes and the source.
    """
    issues = validate(topo, cost.num_layers, known_nodes=set(nodes_by_name),
                      budgets={k: v.budget_bytes for k, v in nodes_by_name.items()},
                      layer_cost=lambda _name, s, e, first, last: cost.stage_bytes(s, e, first, last), source=source)
    if issues:
        raise TopologyError(issues, topo.source)
    if topo.automatic:
        names = list(topo.nodes) + ([source] if source is not None and source not in topo.nodes else [])
        return Plan(make_plan(cost, [nodes_by_name[n] for n in names], strategy).stages, "topology")
    n = cost.num_layers
    return Plan(tuple(Stage(nodes_by_name[name].node_id, s, e, s == 0, e == n, cost.stage_bytes(s, e, s == 0, e == n))
                      for name, s, e in pipeline(topo, n, source)), "topology")


def make_plan(cost: ModelCost, nodes: Iterable[NodeOffer], strategy: str = "fastest") -> Plan:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[strategy](cost, nodes)
