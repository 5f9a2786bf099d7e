"""GET /metrics: the node's figures in Prometheus' text format, through prometheus_client.

What this node served (requests by route and status, prompt and generated tokens, time to first token and
time per generated token as histograms) is counted as it happens; the swarm's state (batch, queue, each
node's state, layers and memory) is read from the node at each scrape, so it is never stale.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5)


class SwarmCollector:
    """The node's live state as gauges, read at scrape time."""

    def __init__(self, node):
        self.node = node

    def collect(self):
        node = self.node
        info, snapshot = node.info(), node.snapshot()
        here = [("batch_size", "Rows in this node's last decode step", info["batch"]),
                ("batch_size_peak", "The most rows one decode step of this node held", info["batch_peak"]),
                ("stage_queue", "Session rows waiting at this node's stages", info["queued"]),
                ("requests_active", "Requests this node took that are generating", info["requests"]),
                ("requests_waiting", "Requests this node took that wait for a place in the batch", info["waiting"]),
                ("swarm_ready", "1 when the swarm's plan is loaded on every node", int(snapshot["ready"])),
                ("plan_epoch", "The epoch of the plan in force", snapshot["epoch"]),
                ("longest_pause_seconds", "The longest pause of a request moved to a new plan",
                 node.stats.get("longest_pause_s", 0.0))]
        for name, doc, value in here:
            yield GaugeMetricFamily(f"cake_swarm_{name}", doc, value=value)
        yield CounterMetricFamily("cake_swarm_requests_moved", "Requests moved to a new plan mid-stream",
                                  value=node.stats.get("moves", 0))
        labels = ["node", "name"]
        state = GaugeMetricFamily("cake_swarm_node_state", "Each node's stage state (1 for the state it is in)",
                                  labels=labels + ["state"])
        layers = GaugeMetricFamily("cake_swarm_node_layers", "Transformer layers each node holds", labels=labels)
        used = GaugeMetricFamily("cake_swarm_node_memory_used_bytes", "Bytes of weights each node holds", labels=labels)
        budget = GaugeMetricFamily("cake_swarm_node_memory_budget_bytes", "Each node's memory budget", labels=labels)
        sessions = GaugeMetricFamily("cake_swarm_node_sessions", "Stage sessions open on each node", labels=labels)
        for n in snapshot["nodes"]:
            who = [str(n.get("id", "")), str(n.get("name", ""))]
            state.add_metric(who + [str(n.get("state", "unknown"))], 1)
            layers.add_metric(who, sum(end - start for start, end in n.get("stages") or []))
            used.add_metric(who, n.get("used", 0) or 0)
            budget.add_metric(who, n.get("budget", 0) or 0)
            sessions.add_metric(who, n.get("sessions", 0) or 0)
        yield from (state, layers, used, budget, sessions)


class Metrics:
    """The node's instruments, in a registry of its own (several nodes may share a test process)."""

    def __init__(self, node):
        self.registry = CollectorRegistry()
        self.requests = Counter("cake_swarm_api_requests", "API requests by route and HTTP status", ["route", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("cake_swarm_prompt_tokens", "Prompt tokens of the requests this node took",
                                     registry=self.registry)
        self.generated_tokens = Counter("cake_swarm_generated_tokens", "Tokens generated for this node's requests",
                                        registry=self.registry)
        self.ttft = Histogram("cake_swarm_time_to_first_token_seconds", "From a request's start to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.token_time = Histogram("cake_swarm_time_per_output_token_seconds", "Time between generated tokens",
                                    buckets=TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(SwarmCollector(node))

    def count(self, request: web.Request, status: int) -> None:
        route = request.match_info.route.resource
        self.requests.labels(route.canonical if route is not None else "unmatched", str(status)).inc()


def middleware(metrics: Metrics):
    """Counts every API request (/v1/*, /ws/chat) by route and status."""

    @web.middleware
    async def count_requests(request: web.Request, handler):
        if not request.path.startswith(("/v1/", "/ws/chat")):
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as e:
            metrics.count(request, e.status)
            raise
        metrics.count(request, response.status)
        return response

    return count_requests


async def serve(request: web.Request, metrics: Metrics) -> web.Response:
    return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
