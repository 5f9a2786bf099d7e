"""The daemon: one node's services, its view of the swarm, the plan in force, and a clean shutdown.

A node serves one aiohttp application (peer websocket, shard routes, dashboard and APIs), advertises
itself over mDNS, keeps links to its peers, and runs its stage of the plan. The node that holds the
model and has the lowest id among holders coordinates: it computes the plan from the peers' budgets
(or the topology file), numbers it with an epoch, and declares the swarm ready once every node of the
plan has loaded its stage and acked. All MLX work runs on one compute thread, so the event loop (and
heartbeats) never wait on a matmul.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import mlx.core as mx
from aiohttp import web

from kernels.linear import backend, kernel_path
from swarm import auth
from swarm.discovery import Discovery, PeerAd, advertised_addresses
from swarm.membership import VERSION, Membership, Peer, PeerGone
from swarm.model.decoder import Stage, load_stage
from swarm.model.generate import TextStream, Timings
from swarm.model.grammar import Vocabulary
from swarm.model.sampling import Choice, SamplingParams
from swarm.model.tokenizer import Tokenizer
from swarm.pipeline import Admission, SwarmError, deliver_error, deliver_tokens, move_requests, request_tokens
from swarm.scheduler import Route, RowError, StageScheduler
from swarm.placement import ModelCost, NodeOffer, Plan, PlacementError, kv_bytes_per_layer, make_plan, plan_from_topology
from swarm.shards import ModelProfile, cache_root, profile_model
from swarm.shardserve import ShardServer, fetch_shard, fetch_side_file
from swarm.tls import PeerClient, config_root, load_identity, server_context
from topology import TopologyError, TopologyIssue, format_size, parse as parse_topology

log = logging.getLogger("swarm.node")

REPLAN_DELAY_S = 0.3
READY_WAIT_S = 30.0
LEAVE_WAIT_S = 30.0


@dataclass
class NodeConfig:
    model: str | None = None
    name: str = field(default_factory=socket.gethostname)
    host: str = "127.0.0.1"
    port: int = 10128
    memory_budget: int | None = None
    max_context: int = 4096
    cluster_key: str | None = None
    topology: Path | None = None
    strategy: str = "fastest"
    wire_dtype: str = "auto"
    peers: tuple[str, ...] = ()
    mdns: bool = True
    speed: float | None = None          # GB/s; None: measured at start
    cache_dir: Path | None = None
    api_key: str | None = None
    max_batch: int = 16          # sessions generating at once (this node as origin; rows per step as a stage)
    max_queue: int = 64          # requests waiting for a place in the batch before "busy"
    max_moves: int = 4           # times a request may move to a new plan before it fails
    replan_timeout: float = 30.0  # seconds a moved request waits for the next plan before it fails
    peer_port: int | None = None        # the TLS listener for peers; None: port + 1, 0: any free port
    config_dir: Path | None = None      # where the node's TLS key and certificate live; None: tls.config_root()
    tls_cert: Path | None = None        # serve the dashboard and API over HTTPS with this certificate
    tls_key: Path | None = None         # and this key (None: the key is in tls_cert)


def default_budget() -> int:
    """A safe share of the memory this machine has free now."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return int(available * 0.6)


def measure_speed(seconds: float = 0.5) -> float:
    """GB/s of weights a q4 matvec (4096 x 4096, group 64) reads on this device: the node's speed."""
    w, scales, biases = mx.quantize(mx.random.normal((4096, 4096)) * 0.02, group_size=64, bits=4)
    x = mx.random.normal((1, 4096))
    nbytes = w.nbytes + scales.nbytes + biases.nbytes
    mx.eval(w, scales, biases, x)
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mx.eval(mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4))
        runs += 1
    return round(nbytes * runs / (time.perf_counter() - t0) / 1e9, 3)


def load_tokenizer(folder: Path) -> Tokenizer | None:
    return Tokenizer.load(folder) if (Path(folder) / "tokenizer.json").exists() else None


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.id = uuid.uuid4().hex[:12]
        self.name = config.name
        self.budget = config.memory_budget or default_budget()
        self.speed = config.speed or 0.0
        self.backend = backend()
        self.kernels: dict = {}                     # which kernels the linears run, and why (kernel_path)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else cache_root()
        self.wire_dtype = None if config.wire_dtype == "auto" else config.wire_dtype
        self.started = time.time()
        # the model (source nodes only)
        self.model_dir: Path | None = None
        self.profile: ModelProfile | None = None
        self.topology_text: str | None = None
        self.topology_error: str | None = None     # the last edit of the file that was refused
        self.topology_fallback: list[str] | None = None  # pinned nodes missing, while placed automatically
        # the plan in force, as every node sees it
        self.plan: Plan | None = None
        self.plan_meta: dict = {}
        self.epoch = 0
        self.ready = False
        self.plan_error: str | None = None
        self.acks: set[str] = set()
        # this node's stages (usually one) and their schedulers for the plan in force
        self.stages: dict[tuple, Stage] = {}        # loaded, by (model, start, end, first, last)
        self.schedulers: dict[int, StageScheduler] = {}   # by the stage's index in the plan
        self.stage_state = "idle"            # idle | fetching | loading | loaded | failed
        self.downloads: dict[str, dict] = {}
        self.tokenizer: Tokenizer | None = None     # None for a checkpoint without tokenizer.json: ids only
        self.side_files_ready = False
        # requests this node took (as their origin)
        self.attempts: dict = {}                    # session id of the attempt in flight -> its Request
        self.admission = Admission(config.max_batch, config.max_queue)
        self.leaving: set[str] = set()              # nodes handing their part over before they go (self.id too)
        self.stats = {"requests": 0, "tokens": 0, "last_tps": 0.0, "last_ttft_s": 0.0, "moves": 0,
                      "longest_pause_s": 0.0}
        self.shard_server = ShardServer(self.cache_dir, config.cluster_key)
        self.members = Membership(self.id, config.cluster_key, self.info, self._on_join, self._on_leave, self._on_frame)
        self.discovery: Discovery | None = None
        self.listeners: set[asyncio.Queue] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx")
        self._tasks: set[asyncio.Task] = set()
        self.exit_requested = asyncio.Event()       # set by a signal or `cake-swarm down`: leave, then stop
        self._handover: asyncio.Future | None = None  # the coordinator's answer to this node's leave
        self._replan_task: asyncio.Task | None = None
        self._apply_task: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._http: PeerClient | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        """Start the node's services; `app` is what it serves people on --port (web.app.make_app composes it)."""
        if not self.speed:
            self.speed = await self.compute(measure_speed)
        self.kernels = await self.compute(kernel_path)  # runs the kernels' start-up self-check once
        log.info("kernels: %s (%s)", self.kernels.get("linear"), self.kernels.get("why"))
        if self.config.model:
            from swarm.model.source import resolve_model
            self.model_dir = await asyncio.to_thread(resolve_model, self.config.model)
            self.profile = await asyncio.to_thread(profile_model, self.model_dir)
            self.shard_server.add_model(self.profile)
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.model_dir)
            self.side_files_ready = True
        if self.config.topology:
            self.topology_text = Path(self.config.topology).read_text()
            parse_topology(self.topology_text, str(self.config.topology))  # a bad file stops the start
        if not self.config.cluster_key:
            log.warning("NO CLUSTER KEY: this swarm is open. Its links are encrypted (TLS) but unauthenticated: any "
                        "machine on the network can join it and read its shards, and a man in the middle can read "
                        "its links. Start every node with --cluster-key to close it.")
        identity = await asyncio.to_thread(load_identity, self.config.config_dir or config_root())
        self.shard_server.fingerprint = identity.fingerprint
        peer_port = self.config.peer_port
        if peer_port is None:
            peer_port = self.config.port + 1 if self.config.port else 0
        await self.members.start(self.config.host, peer_port, identity, self.shard_server.routes(),
                                 any_port_if_taken=self.config.peer_port is None)
        self._http = PeerClient(self.members.endpoint)
        # peers and shards are only served on the TLS listener; --port says where it is (for --peer HOST:PORT)
        app.router.add_get("/peer-port", self.members.tell_peer_port)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        web_tls = None
        if self.config.tls_cert:   # browsers and API clients: TLS 1.2 too
            web_tls = server_context(self.config.tls_cert, self.config.tls_key, minimum=ssl.TLSVersion.TLSv1_2)
        await web.TCPSite(self._runner, self.config.host, self.config.port, ssl_context=web_tls).start()
        self._spawn(self._sweep_sessions())
        if self.config.topology:
            self._spawn(self._watch_topology())
        if self.config.mdns:
            self.discovery = Discovery(self.advertisement(), self.config.host, self.config.port,
                                       self._on_ad, lambda node_id: None)
            await self.discovery.start()
        for peer in self.config.peers:
            host, _, port = peer.rpartition(":")
            self.members.keep(host, int(port))
        log.info("node %s (%s) up on %s://%s:%d: %s, budget %s, %.2f GB/s%s; peers over TLS on port %d, certificate "
                 "sha256 %s", self.id, self.name, "https" if web_tls else "http", self.config.host, self.config.port,
                 self.backend, format_size(self.budget), self.speed,
                 f", model {self.model_dir}" if self.model_dir else ", no model", self.members.peer_port,
                 identity.fingerprint)
        self.schedule_replan()

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        await self.members.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        log.info("node %s stopped", self.id)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def compute(self, fn):
        """Run fn on the compute thread (every MLX call of the daemon goes there)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # --- what this node tells others -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """What people call the model: the repo id or folder name they gave, not the hash."""
        spec = self.config.model or ""
        return spec if spec == "demo" or ("/" in spec and not Path(spec).exists()) else Path(spec).name

    @property
    def model_hash(self) -> str:
        return self.profile.model_hash if self.profile else ""

    @property
    def addr(self) -> str:
        return advertised_addresses(self.config.host)[0]

    def advertisement(self) -> dict:
        return {"id": self.id, "name": self.name, "backend": self.backend, "budget": self.budget,
                "speed": self.speed, "cluster": auth.cluster_id(self.config.cluster_key), "version": VERSION,
                "model": self.model_hash, "peer_port": self.members.peer_port}

    def my_stages(self) -> tuple:
        """This node's stages of the plan in force (a topology may give a node several)."""
        return self.plan.stages_of(self.id) if self.plan else ()

    def info(self) -> dict:
        stages, schedulers = self.my_stages(), list(self.schedulers.values())
        return {**self.advertisement(), "addr": self.addr, "port": self.config.port, "state": self.stage_state,
                "epoch": self.epoch, "layers": [stages[0].start, stages[0].end] if stages else [],
                "stages": [[s.start, s.end] for s in stages],
                "used": sum(s.nbytes for s in self.stages.values()), "downloads": self.downloads,
                "sessions": sum(len(s.sessions) for s in schedulers),
                "batch": max((s.last_batch for s in schedulers), default=0),
                "batch_peak": max((s.peak_batch for s in schedulers), default=0),
                "queued": sum(len(s.queue) for s in schedulers),
                "requests": self.admission.active, "waiting": self.admission.waiting,
                "leaving": self.id in self.leaving, "plan_error": self.plan_error, "kernels": self.kernels,
                "coordinator": self.is_coordinator,
                "open": not self.config.cluster_key, "https": bool(self.config.tls_cert),
                "cert": self.members.identity.fingerprint if self.members.identity else ""}

    # --- membership ----------------------------------------------------------------------------------

    def _on_ad(self, ad: PeerAd) -> None:
        if ad.node_id not in self.members.peers:
            self.members.dial_soon(ad.addr, ad.port, ad.peer_port)

    def _on_join(self, peer: Peer) -> None:
        self.schedule_replan()
        self.notify()

    def _on_leave(self, peer: Peer, why: str) -> None:
        self.leaving.discard(peer.node_id)
        if self.plan and peer.node_id in self.plan.node_ids():
            self.ready = False
            move_requests(self, f"node {peer.name} left the swarm ({why})", gone=peer.node_id)
        self.schedule_replan()
        self.notify()

    async def send(self, node_id: str, frame: dict) -> None:
        if node_id == self.id:
            await self._on_frame(self.id, frame)
        else:
            await self.members.send(node_id, frame)

    async def send_quietly(self, node_id: str, frame: dict) -> None:
        try:
            await self.send(node_id, frame)
        except PeerGone:
            pass

    async def _on_frame(self, peer_id: str, frame: dict) -> None:
        t = frame["t"]
        if t == "forward":
            await self._take_forward(frame)
        elif t == "tokens":
            # the next step first: its forward starts on the compute thread before the stream's writes run
            first = self.schedulers.get(0)
            if first is not None and frame["epoch"] == first.route.epoch:
                first.take_tokens(frame["rows"])
            deliver_tokens(self, frame["rows"])
        elif t == "end":
            for scheduler in self.schedulers.values():
                scheduler.end(frame["session"])
        elif t == "error":
            deliver_error(self, frame)
        elif t == "plan":
            self._adopt_plan(frame["epoch"], frame["plan"])
        elif t == "plan_ack":
            self._on_ack(frame)
        elif t == "leave":
            self._on_peer_leaving(frame["node_id"])
        elif t == "handover":
            if frame["node_id"] == self.id and self._handover is not None and not self._handover.done():
                self._handover.set_result((frame["ok"], frame.get("error")))

    async def _take_forward(self, frame: dict) -> None:
        scheduler = self.schedulers.get(frame["stage"])
        try:
            if scheduler is None:
                raise RowError(f"{self.name} runs no stage {frame['stage']} of plan epoch {frame['epoch']} "
                               f"(epoch {self.epoch} is in force here)", "stale")
            refused = scheduler.take_forward(frame)
        except ValueError as e:  # RowError, or rows that do not fit the stage
            refused = [(str(r.get("origin", "")), r["session"], e) for r in frame["rows"]]
        for origin, session, e in refused:
            await self.send_quietly(origin, {"t": "error", "session": session, "code": getattr(e, "code", "bad_request"),
                                             "message": f"stage on {self.name}: {e}"})

    async def _sweep_sessions(self) -> None:
        while True:
            await asyncio.sleep(30)
            for scheduler in self.schedulers.values():
                scheduler.sweep()

    # --- planning (the coordinator) ------------------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        if not self.profile:
            return False
        holders = [p.node_id for p in self.members.peers.values() if p.info.get("model") == self.model_hash]
        return self.id == min([self.id, *holders])

    def schedule_replan(self) -> None:
        if self._replan_task is not None and not self._replan_task.done():
            self._replan_task.cancel()
        self._replan_task = self._spawn(self._replan_later())

    async def _replan_later(self) -> None:
        await asyncio.sleep(REPLAN_DELAY_S)
        if self.is_coordinator:
            await self.replan()

    @property
    def max_context(self) -> int:
        """Tokens a session may hold: --max-context, cut to the model's positions."""
        return min(self.config.max_context, int(self.profile.config.get("max_position_embeddings") or 1 << 30))

    def model_cost(self) -> ModelCost:
        cfg = self.profile.config
        heads = cfg.get("num_attention_heads", 1)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        kv = kv_bytes_per_layer(cfg.get("num_key_value_heads") or heads, head_dim, self.max_context, 4)
        head = self.profile.norm_bytes + (self.profile.embed_bytes if self.profile.tied else self.profile.head_bytes)
        return ModelCost(tuple(self.profile.layer_bytes(i) for i in range(self.profile.num_layers)),
                         self.profile.embed_bytes, head, kv, self.max_context)

    def offers(self) -> list[NodeOffer]:
        """The nodes a plan may use: this one and its peers, less those handing their part over to leave."""
        mine = [NodeOffer(self.id, self.name, self.budget, self.speed)] if self.id not in self.leaving else []
        return mine + [NodeOffer(p.node_id, p.name, int(p.info.get("budget", 0)), float(p.info.get("speed", 0.0)))
                       for p in self.members.peers.values() if p.node_id not in self.leaving]

    def compute_plan(self, topology_text: str | None = None) -> Plan:
        """The plan for the current peers: from the topology when there is one, else by strategy.

        A file being applied (topology_text) must name only nodes present. The topology in force whose
        nodes are not all here (one died, or has not joined yet) gives way to the strategy over the nodes
        present, and comes back when they are (self.topology_fallback says which are missing)."""
        cost, offers = self.model_cost(), self.offers()
        text = topology_text if topology_text is not None else self.topology_text
        self.topology_fallback = None
        if text is None:
            return make_plan(cost, offers, self.config.strategy)
        topo = parse_topology(text, str(self.config.topology or "<topology>"))
        by_name = {o.name: o for o in offers}
        missing = [n for n in topo.nodes if n not in by_name]
        if missing and topology_text is not None:
            raise TopologyError([TopologyIssue(topo.nodes[n].line, f"node {n!r} has not joined the swarm (yet)") for n in missing],
                                topo.source)
        if missing:
            plan = make_plan(cost, offers, self.config.strategy)
            self.topology_fallback = missing
            return plan
        return plan_from_topology(topo, cost, by_name, source=self.name, strategy=self.config.strategy)

    def topology_state(self) -> dict:
        """Whether the plan is pinned by a topology and, when pinned nodes are missing, which."""
        state = {"pinned": self.topology_text is not None, "missing": self.topology_fallback or []}
        if self.topology_fallback:
            state["message"] = (f"pinned node(s) {', '.join(self.topology_fallback)} missing: placed automatically "
                                f"over the nodes present until they are back")
        return state

    async def replan(self, topology_text: str | None = None) -> Plan | None:
        try:
            plan = self.compute_plan(topology_text)
        except (PlacementError, TopologyError) as e:
            self.plan_error = str(e)
            log.warning("no plan yet: %s", e)
            self.notify()
            return None
        if topology_text is not None:
            self.topology_text = topology_text
        self.plan_error = None
        epoch = max(self.epoch, max((int(p.info.get("epoch", 0)) for p in self.members.peers.values()), default=0)) + 1
        eos = self.profile.config.get("eos_token_id")
        meta = {**plan.to_dict(), "coordinator": self.id, "model": self.model_hash, "ready": False,
                "eos": eos if isinstance(eos, list) else [] if eos is None else [eos],
                "max_context": self.max_context,
                "model_name": self.model_name, "topology": self.topology_state(),
                "vocab_size": int(self.profile.config.get("vocab_size") or 0),
                "sources": [{"node_id": self.id, "addr": self.addr, "port": self.config.port}]
                + [{"node_id": p.node_id, "addr": p.addr, "port": p.port}
                   for p in self.members.peers.values() if p.info.get("model") == self.model_hash]}
        if (topology_text is None and self.ready and self.plan is not None and plan.stages == self.plan.stages
                and self.plan_meta.get("coordinator") == self.id):
            # nothing moves (a spare came or went): a new epoch would end every session in flight, so the
            # epoch in force stays and is only told again, to newcomers
            meta = {**meta, "ready": True}
            self._adopt_plan(self.epoch, meta)
            await self.members.broadcast({"t": "plan", "epoch": self.epoch, "plan": meta})
            return plan
        log.info("plan epoch %d: %s", epoch, ", ".join(f"{self._name_of(s.node_id)} [{s.start}, {s.end})" for s in plan.stages))
        self.acks = set()
        self._adopt_plan(epoch, meta)  # first: acks may come back while the broadcast is still going
        await self.members.broadcast({"t": "plan", "epoch": epoch, "plan": meta})
        return plan

    def _on_ack(self, frame: dict) -> None:
        if frame["epoch"] != self.epoch or not self.is_coordinator:
            return
        if not frame.get("ok", True):
            self.plan_error = f"{self._name_of(frame['node_id'])} could not load its stage: {frame.get('error')}"
            log.warning(self.plan_error)
            self.notify()
            return
        self.acks.add(frame["node_id"])
        if set(self.plan.node_ids()) <= self.acks and not self.ready:
            meta = {**self.plan_meta, "ready": True}
            log.info("swarm ready at epoch %d", self.epoch)
            self._spawn(self.members.broadcast({"t": "plan", "epoch": self.epoch, "plan": meta}))
            self._adopt_plan(self.epoch, meta)

    # --- adopting a plan (every node) ----------------------------------------------------------------

    def _adopt_plan(self, epoch: int, meta: dict) -> None:
        if epoch < self.epoch:
            return
        try:
            plan = Plan.from_dict(meta)
        except ValueError as e:
            log.warning("ignoring plan %d: %s", epoch, e)
            return
        new_epoch = epoch != self.epoch or self.plan is None
        self.plan, self.plan_meta, self.epoch, self.ready = plan, dict(meta), epoch, bool(meta.get("ready"))
        if new_epoch:
            self._stop_schedulers()
            move_requests(self, f"the swarm changed its plan (epoch {epoch})", epoch=epoch)
            if self._apply_task is not None and not self._apply_task.done():
                self._apply_task.cancel()
            self._apply_task = self._spawn(self._apply_plan(epoch))
        self.notify()

    def _stop_schedulers(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.task.cancel()
        self.schedulers = {}

    async def _apply_plan(self, epoch: int) -> None:
        plan, meta = self.plan, self.plan_meta
        try:
            if not self.side_files_ready:
                self.tokenizer = await self._fetch_tokenizer(meta)
                self.side_files_ready = True
            loaded = {}
            for stage in self.my_stages():
                key = (meta["model"], stage.start, stage.end, stage.first, stage.last)
                loaded[key] = self.stages.get(key) or await self._load_stage(meta, stage)
            self.stages = loaded  # stages of older plans go
            self.stage_state = "loaded" if loaded else "idle"
            for index, stage in enumerate(plan.stages):
                if stage.node_id == self.id:
                    self._start_scheduler(epoch, plan, index, loaded[(meta["model"], stage.start, stage.end,
                                                                      stage.first, stage.last)])
            ack = {"t": "plan_ack", "epoch": epoch, "node_id": self.id, "ok": True}
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("cannot take my part of plan %d", epoch)
            self.stage_state = "failed"
            ack = {"t": "plan_ack", "epoch": epoch, "node_id": self.id, "ok": False, "error": str(e)[:400]}
        self.notify()
        self.members.beat()  # every peer's view of this node's stage, now rather than at the next heartbeat
        await self.send_quietly(meta["coordinator"], ack)

    async def _load_stage(self, meta: dict, stage) -> Stage:
        folder = self.model_dir or await self._fetch_shard(meta, stage)
        self.stage_state = "loading"
        self.notify()
        loaded = await self.compute(lambda: load_stage(folder, stage.start, stage.end, stage.first, stage.last))
        log.info("loaded layers %d-%d (%s)", stage.start, stage.end - 1, format_size(loaded.nbytes))
        return loaded

    def _constraint(self, spec: dict, tokens: list[int]):
        """A session's grammar state (swarm/model/grammar.py), from the model's own tokenizer.json."""
        folder = self.model_dir or self.cache_dir / "models" / self.plan_meta["model"]
        if not (folder / "tokenizer.json").exists():
            raise ValueError("the model has no tokenizer.json")
        vocab_size = next(iter(self.stages.values())).cfg.vocab_size
        return Vocabulary.of(folder / "tokenizer.json", vocab_size, self.eos_ids).constraint(spec, tokens)

    def _start_scheduler(self, epoch: int, plan: Plan, index: int, stage: Stage) -> None:
        stages = plan.stages
        machines = {self.addr if s.node_id == self.id else getattr(self.members.peers.get(s.node_id), "addr", s.node_id)
                    for s in stages}
        route = Route(epoch, index, len(stages), stages[index + 1].node_id if index + 1 < len(stages) else None,
                      stages[0].node_id, micro_batches=len(machines))
        scheduler = StageScheduler(stage, route, self.send, self.compute, max_batch=self.config.max_batch,
                                   wire_dtype=self.wire_dtype, constrain=self._constraint if stage.spec.last else None)
        scheduler.task = self._spawn(scheduler.run())
        self.schedulers[index] = scheduler

    async def _fetch_shard(self, meta: dict, stage) -> Path:
        self.stage_state = "fetching"
        name = f"{stage.start}-{stage.end}"

        def progress(done: int, total: int, rate: float) -> None:
            self.downloads[name] = {"done": done, "total": total, "rate": rate}
            self.notify()

        errors = []
        for source in meta["sources"]:
            try:
                return await fetch_shard(self._http, f"http://{source['addr']}:{source['port']}", meta["model"],
                                         stage.start, stage.end, stage.first, stage.last, self.cache_dir,
                                         self.config.cluster_key, progress)
            except Exception as e:  # try the next holder
                errors.append(f"{source['addr']}:{source['port']}: {e}")
        raise RuntimeError("no source could send the shard: " + "; ".join(errors))

    async def _fetch_tokenizer(self, meta: dict) -> Tokenizer | None:
        folder = self.cache_dir / "models" / meta["model"]
        folder.mkdir(parents=True, exist_ok=True)
        timeout = aiohttp.ClientTimeout(total=60, sock_connect=10)
        for source in meta["sources"]:
            base = f"http://{source['addr']}:{source['port']}"
            try:
                for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                    if not (folder / name).exists():
                        await fetch_side_file(self._http, base, f"/shards/{meta['model']}/files/{name}",
                                               folder / name, self.config.cluster_key, timeout)
                return await asyncio.to_thread(load_tokenizer, folder)
            except Exception as e:
                log.warning("no tokenizer from %s: %s", base, e)
        raise RuntimeError("no source could send the tokenizer")

    def _name_of(self, node_id: str) -> str:
        if node_id == self.id:
            return self.name
        peer = self.members.peers.get(node_id)
        return peer.name if peer else node_id

    async def _watch_topology(self) -> None:
        """Edits of the --topology file make a new plan; a file that fails validation changes nothing."""
        path = Path(self.config.topology)
        seen = path.stat().st_mtime_ns
        while True:
            await asyncio.sleep(1.0)
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime != seen:
                seen = mtime
                try:
                    await self.apply_topology(path.read_text())
                    self.topology_error = None
                except (TopologyError, PlacementError, SwarmError) as e:
                    self.topology_error = f"{path} not applied: {e}"
                    log.warning(self.topology_error)
                self.notify()

    async def apply_topology(self, text: str) -> Plan:
        """Validate a topology against the swarm and make it the plan; raises and changes nothing when wrong."""
        if not self.is_coordinator:
            raise SwarmError("only the coordinator (a node holding the model) applies a topology", 409)
        plan = self.compute_plan(text)  # raises on a bad file
        await self.replan(text)
        return plan

    def note_move(self, paused_s: float) -> None:
        """A request of this origin moved to a new plan after waiting paused_s for it."""
        self.stats["moves"] += 1
        self.stats["longest_pause_s"] = round(max(self.stats["longest_pause_s"], paused_s), 3)

    # --- leaving gracefully ---------------------------------------------------------------------------

    def _on_peer_leaving(self, node_id: str) -> None:
        """A peer hands its part over before it goes: the coordinator plans without it now and tells it
        whether that worked (a "handover" frame)."""
        if node_id in self.members.peers:
            log.info("%s is leaving: planning without it", self._name_of(node_id))
            self.leaving.add(node_id)
            if self.is_coordinator:
                self._spawn(self._hand_over(node_id))
            self.notify()

    async def _hand_over(self, node_id: str) -> None:
        plan = await self.replan()
        await self.send_quietly(node_id, {"t": "handover", "node_id": node_id, "ok": plan is not None,
                                          "error": (self.plan_error or "")[:400]})

    async def leave(self, timeout: float = LEAVE_WAIT_S) -> None:
        """Hand this node's part over before it goes: the swarm plans without it, the sessions through it
        move to that plan, and the requests this node took (their clients are connected here) finish on
        it. Bounded by `timeout`; new requests are refused meanwhile."""
        self.leaving.add(self.id)
        self.notify()
        deadline, in_plan = time.monotonic() + timeout, self.plan is not None and self.id in self.plan.node_ids()
        handed_over = in_plan and bool(self.members.peers)
        if in_plan and not handed_over:
            log.info("leaving: no other node to hand layers over to")
        elif in_plan:
            log.info("leaving: handing layers %s over", ", ".join(f"{s.start}-{s.end - 1}" for s in self.my_stages()))
            self._handover = asyncio.get_running_loop().create_future()
            if self.is_coordinator:
                plan = await self.replan()
                self._handover.set_result((plan is not None, self.plan_error))
            else:
                await self.members.broadcast({"t": "leave", "node_id": self.id})
            while (self.plan is not None and self.id in self.plan.node_ids() or not self.ready) \
                    and time.monotonic() < deadline:
                ok, why = self._handover.result() if self._handover.done() else (True, None)
                why = why if not ok else self._no_plan_why()
                if why:
                    log.warning("leaving without a handover: %s", why)
                    handed_over = False
                    break
                await asyncio.sleep(0.05)
        while self.admission.active + self.admission.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.admission.active:
            log.warning("leaving with %d requests still generating (waited %.0f s)", self.admission.active, timeout)
        log.info("handed over: leaving" if handed_over else "leaving: nothing handed over")

    # --- serving requests ----------------------------------------------------------------------------

    @property
    def source_present(self) -> bool:
        """Whether this node or a peer holds the model (the plan's model, once there is a plan)."""
        model = self.plan_meta.get("model")
        holders = [self.model_hash] + [str(p.info.get("model") or "") for p in self.members.peers.values()]
        return any(h and (not model or h == model) for h in holders)

    def _no_plan_why(self) -> str | None:
        """Why no plan can hold the model now, when that is known: waiting cannot help then."""
        if self.plan is not None and not self.source_present:
            # no holder: nobody can replan or serve shards
            return ("the model's source left the swarm: no node holding the model is connected "
                    "(start a node with --model to bring the swarm back)")
        if self.ready:
            return None  # a plan holds the model (a peer's word on the coordinator may be a heartbeat old)
        why = self._coordinator_error()
        return None if why == "no coordinator" else why

    def _coordinator_error(self) -> str | None:
        """The coordinator's word that no plan holds the model (its last heartbeat's, or this node's own)."""
        coordinator = self.coordinator_id()
        if coordinator == self.id:
            return self.plan_error
        peer = self.members.peers.get(coordinator or "")
        return peer.info.get("plan_error") if peer is not None else "no coordinator"

    def coordinator_id(self) -> str | None:
        """The node that plans: the lowest id among the nodes holding the model."""
        model = self.plan_meta.get("model")
        holders = ([self.id] if self.model_hash and (not model or self.model_hash == model) else []) + [
            p.node_id for p in self.members.peers.values() if p.info.get("model") and (not model or p.info["model"] == model)]
        return min(holders, default=None)

    async def plan_ready(self, after_epoch: int | None = None, timeout: float = READY_WAIT_S) -> tuple[Plan, int]:
        """(plan, epoch) once a plan (newer than after_epoch, when given) is ready with all its nodes here;
        SwarmError at once when no plan can hold the model, or after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            why = self._no_plan_why()
            if why:
                raise SwarmError(why)
            if (self.ready and self.plan and self.side_files_ready and (after_epoch is None or self.epoch > after_epoch)
                    and all(n == self.id or n in self.members.peers for n in self.plan.node_ids())):
                return self.plan, self.epoch
            if time.monotonic() > deadline:
                what = "a new plan" if after_epoch is not None else "the swarm to be ready"
                why = "no node holding the model is reachable" if not self.plan else "stages loading"
                raise SwarmError(f"waited {timeout:.0f} s for {what}: {why}")
            await asyncio.sleep(0.05)

    async def wait_ready(self, timeout: float = READY_WAIT_S) -> None:
        await self.plan_ready(None, timeout)

    @property
    def eos_ids(self) -> set[int]:
        if self.tokenizer is not None:
            return set(self.tokenizer.eos_token_ids)
        eos = self.plan_meta.get("eos") or []
        return set(eos)

    def token_budget(self, prompt_len: int, max_tokens: int) -> int:
        context = min(self.config.max_context, int(self.plan_meta.get("max_context") or 1 << 30))
        if prompt_len >= context:
            raise SwarmError(f"the prompt has {prompt_len} tokens; the context holds {context}", 400)
        return min(max_tokens, context - prompt_len)

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[tuple[Choice, str, str | None]]:
        """(choice, new text, finish reason or None) for each generated token; timings in self.stats.

        The request waits for a place in the batch (Admission); its tokens keep coming when the plan
        changes under it (swarm/pipeline.py moves it)."""
        if self.id in self.leaving:
            raise SwarmError(f"{self.name} is leaving the swarm: send requests to another node")
        await self.wait_ready()
        budget = self.token_budget(len(prompt), params.max_tokens)
        async with self.admission.slot():
            stream = TextStream(self.tokenizer, params, len(prompt), len(prompt) + budget, self.eos_ids)
            timings = Timings(prompt_tokens=len(prompt))
            t0 = time.perf_counter()
            self.stats["requests"] += 1
            self.notify()
            tokens = request_tokens(self, prompt, params, budget, frozenset(self.eos_ids), self.config.max_moves,
                                    self.config.replan_timeout)
            async with contextlib.aclosing(tokens):
                async for choice, done in tokens:
                    now = time.perf_counter()
                    if timings.generated_tokens == 0:
                        timings.prefill_s, t1 = now - t0, now
                    timings.generated_tokens += 1
                    timings.decode_s = now - t1
                    text, reason = stream.feed(choice.token)
                    if done and not reason:  # the grammar is complete
                        text, reason = text + stream.finish("stop"), "stop"
                    yield choice, text, reason
                    if reason:
                        break
        self.stats.update(tokens=self.stats["tokens"] + timings.generated_tokens, last_tps=timings.decode_tps,
                          last_ttft_s=timings.prefill_s, last_timings=timings.as_dict())
        self.notify()

    # --- state for people ----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The whole swarm as this node sees it: what /api/swarm and the dashboard show."""
        nodes = [self.info()] + [{**p.info, "id": p.node_id, "addr": p.addr, "port": p.port,
                                  "seen_s_ago": round(time.monotonic() - p.last_seen, 2)}
                                 for p in self.members.peers.values()]
        return {
            "node": {"id": self.id, "name": self.name},
            "cluster": {"id": auth.cluster_id(self.config.cluster_key), "open": not self.config.cluster_key,
                        "links": "TLS, unauthenticated" if not self.config.cluster_key else "TLS, cluster key"},
            "ready": self.ready, "epoch": self.epoch, "plan_error": self.plan_error, "topology_error": self.topology_error,
            "source_present": self.source_present,
            "plan": [{**s.__dict__, "name": self._name_of(s.node_id)} for s in self.plan.stages] if self.plan else [],
            "nodes": nodes, "refused": self.members.refused,
            "topology": self.topology_state() if self.is_coordinator else self.plan_meta.get("topology", {}),
            "sessions": self.admission.active, "waiting": self.admission.waiting,
            "max_batch": self.config.max_batch, "max_queue": self.config.max_queue, "stats": self.stats,
        }

    def notify(self) -> None:
        """Wake the dashboards' live sockets (each gets the next snapshot)."""
        for queue in list(self.listeners):
            if queue.empty():
                queue.put_nowait(True)
