"""Topology YAML files: parse, validate and render manual placements; sizes like `6GiB`.

The format is cake's (node name -> host, description, layers as `model.layers.A-B` inclusive ranges
or single `model.layers.N`) plus an optional `memory_budget` per node and a top-level `model`.
Two layouts are read: cake's, where node names are top-level keys, and ours, with the nodes under a
`nodes:` key beside `model:`. `render` writes ours (or cake's with cake=True).

Layer ranges are kept half-open, [start, end), inside the program and written inclusive in files.
Each node holds one contiguous range: a node is one pipeline stage (several entries are fine when
they join up, e.g. 0-5 and 6-9). Every error names its line (1-based).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterable, Mapping

import yaml

__all__ = [
    "NodeSpec", "Topology", "TopologyIssue", "TopologyError",
    "parse", "validate", "render", "parse_size", "format_size",
]

# ---------------------------------------------------------------- sizes

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'6GiB' -> 6442450944; '800MB', '1.5MB', '123' (bytes). GiB/MiB/KiB are binary, GB/MB/KB decimal."""
    if isinstance(text, bool):
        raise ValueError(f"bad size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"bad size {text}: negative")
        return text
    m = _SIZE.match(str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if not m or unit is None:
        raise ValueError(f"bad size {text!r}: use bytes or a number with B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    try:
        return round(Decimal(m.group(1)) * unit)
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"bad size {text!r}") from None


def format_size(n: int) -> str:
    """Bytes as a short binary size: 25769803776 -> '24GiB', 1536 -> '1.5KiB', 123 -> '123B'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".") + unit
    return f"{n}B"


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class TopologyIssue:
    line: int | None
    message: str

    def format(self, source: str = "<topology>") -> str:
        return f"{source}:{self.line}: {self.message}" if self.line else f"{source}: {self.message}"


class TopologyError(ValueError):
    def __init__(self, errors: Iterable[TopologyIssue], source: str = "<topology>"):
        self.errors = list(errors)
        self.source = source
        super().__init__("\n".join(e.format(source) for e in self.errors))


@dataclass(frozen=True)
class NodeSpec:
    name: str
    host: str | None = None
    description: str | None = None
    layers: tuple[tuple[int, int], ...] = ()  # half-open [start, end), as written
    memory_budget: int | None = None
    # Where things were written; not part of the placement, so left out of ==.
    line: int = field(default=0, compare=False)
    layer_lines: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Topology:
    model: str | None
    nodes: dict[str, NodeSpec]  # in file order
    source: str = field(default="<topology>", compare=False)
    line: int = field(default=1, compare=False)  # of the nodes mapping

    def placement(self) -> tuple[tuple[str, int, int], ...]:
        """(node name, start, end) per range, in pipeline order."""
        return tuple(sorted(((n.name, s, e) for n in self.nodes.values() for s, e in n.layers),
                            key=lambda t: (t[1], t[2], t[0])))


# ---------------------------------------------------------------- parse

_RANGE = re.compile(r"^(?:.*\.)?layers\.(\d+)(?:-(\d+))?$")
_NODE_KEYS = {"host", "description", "layers", "memory_budget"}
# Written by newer cake versions from discovery; read and ignored.
_CAKE_EXTRA_KEYS = {"vram_bytes", "tflops", "backend", "hostname", "os"}
_NULL = "tag:yaml.org,2002:null"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _text(node: yaml.Node, what: str, issues: list[TopologyIssue]) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        issues.append(TopologyIssue(_line(node), f"{what} must be a single value"))
        return None
    return None if node.tag == _NULL else node.value


def parse_range(text: str) -> tuple[int, int]:
    """'model.layers.0-15' -> (0, 16); 'model.layers.7' -> (7, 8). Raises ValueError."""
    m = _RANGE.match(text.strip())
    if not m:
        raise ValueError(f"malformed layer range {text!r}: write model.layers.A-B (inclusive) or model.layers.N")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise ValueError(f"malformed layer range {text!r}: ends ({b}) before it starts ({a})")
    return a, b + 1


def _parse_node(name: str, key: yaml.Node, value: yaml.Node, issues: list[TopologyIssue]) -> NodeSpec | None:
    if not isinstance(value, yaml.MappingNode):
        issues.append(TopologyIssue(_line(key), f"node {name!r} must be a mapping with host and layers"))
        return None
    fields: dict[str, yaml.Node] = {}
    for k, v in value.value:
        kname = k.value if isinstance(k, yaml.ScalarNode) else None
        if kname in _CAKE_EXTRA_KEYS:
            continue
        if kname not in _NODE_KEYS:
            issues.append(TopologyIssue(_line(k), f"node {name!r}: unknown key {kname!r} "
                                                  f"(expected {', '.join(sorted(_NODE_KEYS))})"))
        elif kname in fields:
            issues.append(TopologyIssue(_line(k), f"node {name!r}: {kname!r} given twice"))
        else:
            fields[kname] = v
    host = _text(fields["host"], f"node {name!r}: host", issues) if "host" in fields else None
    desc = _text(fields["description"], f"node {name!r}: description", issues) if "description" in fields else None

    budget = None
    if "memory_budget" in fields:
        raw = _text(fields["memory_budget"], f"node {name!r}: memory_budget", issues)
        if raw is not None:
            try:
                budget = parse_size(raw)
            except ValueError as e:
                issues.append(TopologyIssue(_line(fields["memory_budget"]), f"node {name!r}: memory_budget: {e}"))

    layers: list[tuple[int, int]] = []
    lines: list[int] = []
    seq = fields.get("layers")
    if seq is None:
        issues.append(TopologyIssue(_line(key), f"node {name!r} has no 'layers' "
                                                f"(write layers: [] for a node that holds none)"))
        seq = yaml.SequenceNode("tag:yaml.org,2002:seq", [])
    elif isinstance(seq, yaml.ScalarNode):  # one range without a list, or an empty `layers:`
        seq = yaml.SequenceNode("tag:yaml.org,2002:seq", [] if seq.tag == _NULL else [seq])
    elif isinstance(seq, yaml.MappingNode):
        issues.append(TopologyIssue(_line(seq), f"node {name!r}: layers must be a list like [model.layers.0-15]"))
        seq = yaml.SequenceNode("tag:yaml.org,2002:seq", [])
    for item in seq.value:
        try:
            if not isinstance(item, yaml.ScalarNode):
                raise ValueError("a layer range must be a string like model.layers.0-15")
            layers.append(parse_range(item.value))
            lines.append(_line(item))
        except ValueError as e:
            issues.append(TopologyIssue(_line(item), f"node {name!r}: {e}"))
    return NodeSpec(name, host, desc, tuple(layers), budget, _line(key), tuple(lines))


def parse(text: str, source: str = "<topology>") -> Topology:
    """Read a topology file's text. Raises TopologyError listing every problem with its line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        where = f" ({e.context} on line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise TopologyError([TopologyIssue(line, f"YAML syntax error: {e.problem or e}{where}")], source) from None
    except yaml.YAMLError as e:
        raise TopologyError([TopologyIssue(None, f"YAML error: {e}")], source) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise TopologyError([TopologyIssue(None, "YAML nested too deeply for a topology")], source) from None
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL):
        raise TopologyError([TopologyIssue(1, "empty topology: expected node names with host and layers")], source)
    if not isinstance(root, yaml.MappingNode):
        issue = TopologyIssue(_line(root), "a topology is a mapping of node names to host and layers")
        raise TopologyError([issue], source)

    issues: list[TopologyIssue] = []
    top = {k.value: (k, v) for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    nodes_key, nodes_value = top.get("nodes", (None, None))
    # Our layout has the nodes under `nodes:`; in cake's a node may itself be called "nodes", and
    # then it has a field (host: ..., layers: [...]) where ours has a node (a mapping).
    nested = isinstance(nodes_value, yaml.MappingNode) and not any(
        getattr(k, "value", None) in _NODE_KEYS and not isinstance(v, yaml.MappingNode) for k, v in nodes_value.value)
    model_key, model_value = top.get("model", (None, None))
    if not nested and not isinstance(model_value, yaml.ScalarNode):
        model_key = model_value = None  # a node called "model", in cake's layout
    model = _text(model_value, "model", issues) if model_value is not None else None

    if nested:
        entries, nodes_line = nodes_value.value, _line(nodes_key)
        for k, _ in root.value:
            if k is not nodes_key and k is not model_key:
                issues.append(TopologyIssue(_line(k), f"unknown top-level key {getattr(k, 'value', '?')!r} "
                                                      f"(expected model, nodes)"))
    else:
        entries, nodes_line = [(k, v) for k, v in root.value if k is not model_key], _line(root)

    nodes: dict[str, NodeSpec] = {}
    for k, v in entries:
        if not isinstance(k, yaml.ScalarNode) or k.tag == _NULL or not k.value:
            issues.append(TopologyIssue(_line(k), "a node name must be a non-empty string"))
            continue
        if k.value in nodes:
            first = nodes[k.value].line
            issues.append(TopologyIssue(_line(k), f"node {k.value!r} defined twice (first on line {first})"))
            continue
        spec = _parse_node(k.value, k, v, issues)
        if spec is not None:
            nodes[k.value] = spec
    if issues:
        raise TopologyError(sorted(issues, key=lambda i: i.line or 0), source)
    return Topology(model, nodes, source, nodes_line)


# ---------------------------------------------------------------- validate

LayerCost = Callable[[str, int, int, bool, bool], int]


def _span(start: int, end: int) -> str:
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def validate(topo: Topology, num_layers: int, *, known_nodes: set[str] | None = None,
             budgets: Mapping[str, int] | None = None,
             layer_cost: LayerCost | None = None) -> list[TopologyIssue]:
    """Everything wrong with `topo` for a model of `num_layers` layers, sorted by line; [] when usable.

    layer_cost(node, start, end, first, last) gives a stage's bytes; a node's budget is the smaller
    of its memory_budget in the file and budgets[node] (what it offers), whichever are given.
    Nodes not in known_nodes are unknown.
    """
    issues: list[TopologyIssue] = []
    add = lambda line, message: issues.append(TopologyIssue(line, message))  # noqa: E731
    every = f"the model has {num_layers} layers: 0-{num_layers - 1}"
    entries = [(n.name, s, e, line) for n in topo.nodes.values()
               for (s, e), line in zip(n.layers, n.layer_lines or (n.line,) * len(n.layers))]

    for name, s, e, line in entries:
        if e > num_layers:
            add(line, f"node {name!r}: {_span(s, e)} goes past the model's last layer ({every})")
    for i, (n1, s1, e1, l1) in enumerate(entries):
        for n2, s2, e2, l2 in entries[i + 1:]:
            lo, hi = max(s1, s2), min(e1, e2, num_layers)
            if lo < hi:
                second = "again" if n1 == n2 else f"on node {n2!r}"
                add(l2, f"{_span(lo, hi)} placed twice: on node {n1!r} (line {l1}) and {second} (line {l2})")

    pos = 0
    for s, e in sorted((s, min(e, num_layers)) for _, s, e, _ in entries) + [(num_layers, num_layers)]:
        if s > pos:  # a gap [pos, s): say so next to the range before it, else the one after it
            near = [ln for _, _, end, ln in entries if end == pos] + [ln for _, start, _, ln in entries if start == s]
            add((near or [topo.line])[0], f"{_span(pos, s)} not placed on any node ({every})")
        pos = max(pos, e)

    for node in topo.nodes.values():
        if known_nodes is not None and node.name not in known_nodes:
            host = f" ({node.host})" if node.host else ""
            known = ", ".join(sorted(known_nodes)) or "none"
            add(node.line, f"node {node.name!r}{host} is not in the swarm (known: {known})")
        blocks = _blocks(node.layers)
        if len(blocks) > 1:
            held = ", ".join(_span(s, e) for s, e in blocks)
            add(node.line, f"node {node.name!r} holds {held}: a node holds one contiguous range (one pipeline stage)")
            continue
        # The file's memory_budget caps what the node offers; neither may be exceeded.
        limits = [b for b in (node.memory_budget, (budgets or {}).get(node.name)) if b is not None]
        if not blocks or layer_cost is None or not limits:
            continue
        s, e = blocks[0][0], min(blocks[0][1], num_layers)
        need = layer_cost(node.name, s, e, s == 0, e == num_layers) if s < e else 0
        if need > min(limits):
            parts = _span(s, e) + " + embedding" * (s == 0) + " + head" * (e == num_layers)
            add(node.line, f"node {node.name!r} needs {format_size(need)} for {parts} (incl. KV cache) "
                           f"but its budget is {format_size(min(limits))}")
    return sorted(issues, key=lambda i: i.line or 0)


def _blocks(layers: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges merged where they touch or overlap."""
    out: list[list[int]] = []
    for s, e in sorted(layers):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


# ---------------------------------------------------------------- render

def _range_text(start: int, end: int) -> str:
    return f"model.layers.{start}" if end - start == 1 else f"model.layers.{start}-{end - 1}"


def render(x, *, model: str | None = None, names: Mapping[str, str] | None = None,
           hosts: Mapping[str, str] | None = None, cake: bool = False) -> str:
    """A Topology, or a Plan (anything with .stages of node_id/start/end), as topology YAML.

    For a Plan, names and hosts map node ids to the names and addresses to write (default: the id).
    cake=True writes cake's layout (node names at the top level, no model).
    """
    entries: dict[str, dict] = {}
    if isinstance(x, Topology):
        model = model if model is not None else x.model
        for n in x.nodes.values():
            d: dict = {}
            if n.host is not None:
                d["host"] = n.host
            if n.description is not None:
                d["description"] = n.description
            if n.memory_budget is not None:
                text = format_size(n.memory_budget)
                d["memory_budget"] = text if parse_size(text) == n.memory_budget else n.memory_budget
            d["layers"] = [_range_text(s, e) for s, e in n.layers]
            entries[n.name] = d
    else:
        for st in x.stages:
            name = (names or {}).get(st.node_id, st.node_id)
            d = {"host": hosts[st.node_id]} if hosts and st.node_id in hosts else {}
            d["layers"] = [_range_text(st.start, st.end)]
            entries[name] = d
    doc = entries if cake else ({"model": model} if model else {}) | {"nodes": entries}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
