"""Manual placement: topology YAML files (cake's format plus memory budgets and a model)."""
from topology.topofile import (NodeSpec, Topology, TopologyError, TopologyIssue, format_size, parse,
                               parse_range, parse_size, render, validate)

__all__ = ["NodeSpec", "Topology", "TopologyError", "TopologyIssue", "format_size", "parse",
           "parse_range", "parse_size", "render", "validate"]
