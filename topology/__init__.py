"""Manual placement: topology YAML files (cake's format plus memory budgets and a model)."""
from topology.topofile import (DEFAULT_PREFIX, NodeSpec, Topology, TopologyError, TopologyIssue, format_size, parse,
                               parse_range, parse_size, pipeline, render, validate)

__all__ = ["DEFAULT_PREFIX", "NodeSpec", "Topology", "TopologyError", "TopologyIssue", "format_size", "parse",
           "parse_range", "parse_size", "pipeline", "render", "validate"]
