"""Topology YAML files: parse, validate and render manual placements; sizes like `6GiB`.

The format is cake's (node name -> host, description, layers as `model.layers.A-B` inclusive ranges
or single `model.layers.N`) plus an optional `memory_budget` per node and a top-level `model`.
Two layouts are read: cake's, where node names are top-level keys, and ours, with the nodes under a
`nodes:` key beside `model:`. `render` writes ours (or cake's with cake=True).

cake's meaning is kept:
- a file may list only the workers: the source node (the one started with `--model`, cake's master)
  takes the layers nobody names, when the file does not list it;
- every node with `layers: []` means "assign automatically" (cake's auto-sharding);
- a layer is `<prefix>layers.N`, whatever the checkpoint's prefix (`model.`, `model.language_model.`);
  the prefix is kept as written and written back;
- `model.embed_tokens`, `model.norm` and `lm_head` are accepted and place nothing: the embedding stays
  with layer 0's stage and the norm and head with the last, as cake's master keeps them;
- a node may hold blocks that do not join up: it runs each block as its own pipeline stage.
Names of image, video or audio models' parts (`unet`, `vae`, `ltx2-transformer.A-B`) are refused.

Layer ranges are kept half-open, [start, end), inside the program and written inclusive in files.
Every error names its line (1-based).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterable, Mapping

import yaml

__all__ = [
    "NodeSpec", "Topology", "TopologyIssue", "TopologyError", "DEFAULT_PREFIX",
    "parse", "parse_range", "validate", "pipeline", "render", "parse_size", "format_size",
]

DEFAULT_PREFIX = "model.layers."

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
    parts: tuple[str, ...] = ()  # model.embed_tokens, model.norm, lm_head as written: they place nothing
    # How and where things were written; not part of the placement, so left out of ==.
    line: int = field(default=0, compare=False)
    layer_lines: tuple[int, ...] = field(default=(), compare=False)
    layer_prefixes: tuple[str, ...] = field(default=(), compare=False)  # per range, e.g. "model.layers."


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

    @property
    def automatic(self) -> bool:
        """Every node has `layers: []`: the layers are assigned automatically (cake's auto-sharding)."""
        return bool(self.nodes) and not any(n.layers or n.parts for n in self.nodes.values())

    @property
    def layer_prefix(self) -> str:
        """The prefix its layers are written with (the first range's), DEFAULT_PREFIX when it has none."""
        return next((p for n in self.nodes.values() for p in n.layer_prefixes), DEFAULT_PREFIX)


# ---------------------------------------------------------------- parse

_RANGE = re.compile(r"^((?:.*\.)?layers\.)(\d+)(?:-(\d+))?$")
# What a text model has outside its layers; cake's master always keeps these.
_PART = re.compile(r"^(?:.*\.)?(?:embed_tokens|norm|lm_head)$")
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
    _, start, end = _layer_range(text)
    return start, end


def _layer_range(text: str) -> tuple[str, int, int]:
    """'model.language_model.layers.0-15' -> ('model.language_model.layers.', 0, 16). Raises ValueError."""
    m = _RANGE.match(text.strip())
    if not m:
        if "layers." not in text and not text.strip().endswith("layers"):
            raise ValueError(f"{text!r} is not a layer of a text model: this swarm runs text models (llama, qwen2, "
                             f"qwen3, mistral) whose layers are written model.layers.A-B; image, video and audio "
                             f"models' parts (unet, vae, ltx2-transformer, ...) cannot be placed here")
        raise ValueError(f"malformed layer range {text!r}: write model.layers.A-B (inclusive) or model.layers.N")
    a = int(m.group(2))
    b = int(m.group(3)) if m.group(3) is not None else a
    if b < a:
        raise ValueError(f"malformed layer range {text!r}: ends ({b}) before it starts ({a})")
    return m.group(1), a, b + 1


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
    prefixes: list[str] = []
    parts: list[str] = []
    seq = fields.get("layers")
    if seq is None:
        issues.append(TopologyIssue(_line(key), f"node {name!r} has no 'layers' (write layers: [] for none; "
                                                f"on every node, to have them all placed automatically)"))
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
            if _PART.match(item.value.strip()):
                parts.append(item.value.strip())
                continue
            prefix, start, end = _layer_range(item.value)
            layers.append((start, end))
            prefixes.append(prefix)
            lines.append(_line(item))
        except ValueError as e:
            issues.append(TopologyIssue(_line(item), f"node {name!r}: {e}"))
    return NodeSpec(name, host, desc, tuple(layers), budget, tuple(parts), _line(key), tuple(lines), tuple(prefixes))


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


def _takes_the_rest(topo: Topology, source: str | None) -> bool:
    """Whether `source` takes the layers nobody names: it is given and the file does not list it (cake's master)."""
    return source is not None and source not in topo.nodes and not topo.automatic


def validate(topo: Topology, num_layers: int, *, known_nodes: set[str] | None = None,
             budgets: Mapping[str, int] | None = None,
             layer_cost: LayerCost | None = None, source: str | None = None) -> list[TopologyIssue]:
    """Everything wrong with `topo` for a model of `num_layers` layers, sorted by line; [] when usable.

    layer_cost(node, start, end, first, last) gives a stage's bytes; a node's budget is the smaller
    of its memory_budget in the file and budgets[node] (what it offers), whichever are given; a node
    holding several blocks needs them all. Nodes not in known_nodes are unknown. source is the node
    that runs --model: when the file does not list it, it takes the layers the file gives no one.
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

    if not topo.automatic and not _takes_the_rest(topo, source):
        for s, e in _gaps([(s, e) for _, s, e, _ in entries], num_layers):
            # say so next to the range before the gap, else the one after it
            near = [ln for _, _, end, ln in entries if end == s] + [ln for _, start, _, ln in entries if start == e]
            add((near or [topo.line])[0], f"{_span(s, e)} not placed on any node ({every})")

    if source is not None and known_nodes is not None and _takes_the_rest(topo, source) and source not in known_nodes:
        add(topo.line, f"the source node {source!r} is not in the swarm")
    for node in topo.nodes.values():
        if known_nodes is not None and node.name not in known_nodes:
            host = f" ({node.host})" if node.host else ""
            known = ", ".join(sorted(known_nodes)) or "none"
            add(node.line, f"node {node.name!r}{host} is not in the swarm (known: {known})")
    if layer_cost is None or topo.automatic or issues:
        return sorted(issues, key=lambda i: i.line or 0)

    # The file's memory_budget caps what the node offers; neither may be exceeded.
    lines = {n.name: n.line for n in topo.nodes.values()}
    blocks: dict[str, list[tuple[int, int]]] = {}
    for name, s, e in pipeline(topo, num_layers, source):
        blocks.setdefault(name, []).append((s, e))
    for name, held in blocks.items():
        spec = topo.nodes.get(name)
        limits = [b for b in ((spec.memory_budget if spec else None), (budgets or {}).get(name)) if b is not None]
        if not limits:
            continue
        need = sum(layer_cost(name, s, e, s == 0, e == num_layers) for s, e in held)
        if need > min(limits):
            parts = ", ".join(_span(s, e) for s, e in held)
            parts += " + embedding" * any(s == 0 for s, _ in held) + " + head" * any(e == num_layers for _, e in held)
            add(lines.get(name, topo.line), f"node {name!r} needs {format_size(need)} for {parts} (incl. KV cache) "
                                            f"but its budget is {format_size(min(limits))}")
    return sorted(issues, key=lambda i: i.line or 0)


def _gaps(ranges: Iterable[tuple[int, int]], num_layers: int) -> list[tuple[int, int]]:
    """The layers of [0, num_layers) that no range covers, as ranges."""
    gaps, pos = [], 0
    for s, e in sorted((s, min(e, num_layers)) for s, e in ranges) + [(num_layers, num_layers)]:
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    return gaps


def pipeline(topo: Topology, num_layers: int, source: str | None = None) -> tuple[tuple[str, int, int], ...]:
    """The stages a valid, not automatic topology makes, in pipeline order: (node name, start, end).

    A node's ranges that join up are one stage; blocks that do not join are stages of their own. When
    the file does not list `source`, the layers it gives no one are `source`'s stages.
    """
    ranges = [(s, e, name) for name, s, e in topo.placement()]
    if _takes_the_rest(topo, source):
        ranges += [(s, e, source) for s, e in _gaps([(s, e) for s, e, _ in ranges], num_layers)]
    stages: list[tuple[str, int, int]] = []
    for s, e, name in sorted(ranges):
        if stages and stages[-1][0] == name and stages[-1][2] == s:
            s = stages.pop()[1]
        stages.append((name, s, e))
    return tuple(stages)


# ---------------------------------------------------------------- render

def _range_text(prefix: str, start: int, end: int) -> str:
    return f"{prefix}{start}" if end - start == 1 else f"{prefix}{start}-{end - 1}"


def render(x, *, model: str | None = None, names: Mapping[str, str] | None = None,
           hosts: Mapping[str, str] | None = None, cake: bool = False, prefix: str | None = None,
           master: str | None = None) -> str:
    """A Topology, or a Plan (anything with .stages of node_id/start/end), as topology YAML.

    A Topology's ranges keep the prefix they were written with; a Plan's are written with `prefix`
    (default model.layers.). For a Plan, names and hosts map node ids to the names and addresses to
    write (default: the id), and the stages of node id `master` are left out: cake's master runs the
    layers no one names. cake=True writes cake's layout (node names at the top level, no model).
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
            prefixes = n.layer_prefixes or (DEFAULT_PREFIX,) * len(n.layers)
            d["layers"] = [_range_text(prefix or p, s, e) for (s, e), p in zip(n.layers, prefixes)] + list(n.parts)
            entries[n.name] = d
    else:
        for st in x.stages:
            if st.node_id == master:
                continue
            name = (names or {}).get(st.node_id, st.node_id)
            if name not in entries:
                entries[name] = {"host": hosts[st.node_id]} if hosts and st.node_id in hosts else {}
                entries[name]["layers"] = []
            entries[name]["layers"].append(_range_text(prefix or DEFAULT_PREFIX, st.start, st.end))
    doc = entries if cake else ({"model": model} if model else {}) | {"nodes": entries}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
