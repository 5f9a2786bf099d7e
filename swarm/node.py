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
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import mlx.core as mx
from aiohttp import web

from kernels.linear import backend
from swarm import auth
from swarm.discovery import Discovery, PeerAd, advertised_addresses
from swarm.membership import VERSION, Membership, Peer, PeerGone
from swarm.model.decoder import Stage, load_stage
from swarm.model.generate import TextStream, Timings
from swarm.model.sampling import SamplingParams
from swarm.model.tokenizer import Tokenizer
from swarm.pipeline import StageRunner, SwarmError, deliver, fail_requests, fail_stale_requests, request_tokens
from swarm.placement import ModelCost, NodeOffer, Plan, PlacementError, kv_bytes_per_layer, make_plan, plan_from_topology
from swarm.shards import ModelProfile, cache_root, profile_model
from swarm.shardserve import ShardServer, fetch_shard, fetch_side_file
from topology import TopologyError, TopologyIssue, format_size, parse as parse_topology

log = logging.getLogger("swarm.node")

REPLAN_DELAY_S = 0.3
READY_WAIT_S = 30.0


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
    max_sessions: int = 16


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
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else cache_root()
        self.wire_dtype = None if config.wire_dtype == "auto" else config.wire_dtype
        self.started = time.time()
        # the model (source nodes only)
        self.model_dir: Path | None = None
        self.profile: ModelProfile | None = None
        self.topology_text: str | None = None
        self.topology_error: str | None = None     # the last edit of the file that was refused
        # the plan in force, as every node sees it
        self.plan: Plan | None = None
        self.plan_meta: dict = {}
        self.epoch = 0
        self.ready = False
        self.plan_error: str | None = None
        self.acks: set[str] = set()
        # this node's stage
        self.stage: Stage | None = None
        self.stage_key: tuple | None = None
        self.stage_state = "idle"            # idle | fetching | loading | loaded | failed
        self.downloads: dict[str, dict] = {}
        self.tokenizer: Tokenizer | None = None     # None for a checkpoint without tokenizer.json: ids only
        self.side_files_ready = False
        self.requests: dict = {}
        self.stats = {"requests": 0, "tokens": 0, "last_tps": 0.0, "last_ttft_s": 0.0}
        self.runner = StageRunner(self)
        self.shard_server = ShardServer(self.cache_dir, config.cluster_key)
        self.members = Membership(self.id, config.cluster_key, self.info, self._on_join, self._on_leave, self._on_frame)
        self.discovery: Discovery | None = None
        self.listeners: set[asyncio.Queue] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx")
        self._tasks: set[asyncio.Task] = set()
        self._replan_task: asyncio.Task | None = None
        self._apply_task: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.speed:
            self.speed = await self.compute(measure_speed)
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
            log.warning("NO CLUSTER KEY: this swarm is open; any machine on the network can join it and read "
                        "its shards. Start every node with --cluster-key to close it.")
        self._http = aiohttp.ClientSession()
        from web.app import make_app
        app = make_app(self)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.host, self.config.port).start()
        await self.members.start()
        for task in (self.runner.run(), self.runner.sweep()):
            self._spawn(task)
        if self.config.topology:
            self._spawn(self._watch_topology())
        if self.config.mdns:
            self.discovery = Discovery(self.advertisement(), self.config.host, self.config.port,
                                       self._on_ad, lambda node_id: None)
            await self.discovery.start()
        for peer in self.config.peers:
            host, _, port = peer.rpartition(":")
            self.members.keep(host, int(port))
        log.info("node %s (%s) up on http://%s:%d: %s, budget %s, %.2f GB/s%s", self.id, self.name, self.config.host,
                 self.config.port, self.backend, format_size(self.budget), self.speed,
                 f", model {self.model_dir}" if self.model_dir else ", no model")
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
    def plan_stage(self):
        return self.plan.stage_of(self.id) if self.plan else None

    @property
    def addr(self) -> str:
        return advertised_addresses(self.config.host)[0]

    def advertisement(self) -> dict:
        return {"id": self.id, "name": self.name, "backend": self.backend, "budget": self.budget,
                "speed": self.speed, "cluster": auth.cluster_id(self.config.cluster_key), "version": VERSION,
                "model": self.model_hash}

    def info(self) -> dict:
        stage = self.plan_stage
        return {**self.advertisement(), "addr": self.addr, "port": self.config.port, "state": self.stage_state,
                "epoch": self.epoch, "layers": [stage.start, stage.end] if stage else [],
                "used": self.stage.nbytes if self.stage else 0, "downloads": self.downloads,
                "sessions": len(self.runner.sessions), "coordinator": self.is_coordinator,
                "open": not self.config.cluster_key}

    # --- membership ----------------------------------------------------------------------------------

    def _on_ad(self, ad: PeerAd) -> None:
        if ad.node_id not in self.members.peers:
            self.members.dial_soon(ad.addr, ad.port)

    def _on_join(self, peer: Peer) -> None:
        self.schedule_replan()
        self.notify()

    def _on_leave(self, peer: Peer, why: str) -> None:
        fail_requests(self, peer.node_id, why)
        if self.plan and peer.node_id in self.plan.node_ids():
            self.ready = False
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
            self.runner.submit(frame)
        elif t in ("token", "end", "error"):
            deliver(self, frame)
        elif t == "plan":
            self._adopt_plan(frame["epoch"], frame["plan"])
        elif t == "plan_ack":
            self._on_ack(frame)

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
                         self.profile.embed_bytes, head, kv)

    def offers(self) -> list[NodeOffer]:
        mine = NodeOffer(self.id, self.name, self.budget, self.speed)
        return [mine] + [NodeOffer(p.node_id, p.name, int(p.info.get("budget", 0)), float(p.info.get("speed", 0.0)))
                         for p in self.members.peers.values()]

    def compute_plan(self, topology_text: str | None = None) -> Plan:
        """The plan for the current peers: from the topology when there is one, else by strategy."""
        cost, offers = self.model_cost(), self.offers()
        text = topology_text if topology_text is not None else self.topology_text
        if text is None:
            return make_plan(cost, offers, self.config.strategy)
        topo = parse_topology(text, str(self.config.topology or "<topology>"))
        by_name = {o.name: o for o in offers}
        missing = [n for n in topo.nodes if n not in by_name]
        if missing:
            raise TopologyError([TopologyIssue(topo.nodes[n].line, f"node {n!r} has not joined the swarm (yet)") for n in missing],
                                topo.source)
        return plan_from_topology(topo, cost, by_name)

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
                "model_name": self.model_name,
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
            self.runner.drop_all(f"plan epoch {epoch}")
            fail_stale_requests(self, epoch)
            if self._apply_task is not None and not self._apply_task.done():
                self._apply_task.cancel()
            self._apply_task = self._spawn(self._apply_plan(epoch))
        self.notify()

    async def _apply_plan(self, epoch: int) -> None:
        stage, meta = self.plan_stage, self.plan_meta
        try:
            if not self.side_files_ready:
                self.tokenizer = await self._fetch_tokenizer(meta)
                self.side_files_ready = True
            if stage is None:
                self.stage, self.stage_key, self.stage_state = None, None, "idle"
            elif self.stage_key != (meta["model"], stage.start, stage.end, stage.first, stage.last):
                self.stage = None
                folder = self.model_dir or await self._fetch_shard(meta, stage)
                self.stage_state = "loading"
                self.notify()
                self.stage = await self.compute(lambda: load_stage(folder, stage.start, stage.end, stage.first, stage.last))
                self.stage_key = (meta["model"], stage.start, stage.end, stage.first, stage.last)
                self.stage_state = "loaded"
                log.info("loaded layers [%d, %d) (%s)", stage.start, stage.end, format_size(self.stage.nbytes))
            ack = {"t": "plan_ack", "epoch": epoch, "node_id": self.id, "ok": True}
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("cannot take my part of plan %d", epoch)
            self.stage_state = "failed"
            ack = {"t": "plan_ack", "epoch": epoch, "node_id": self.id, "ok": False, "error": str(e)[:400]}
        self.notify()
        await self.send_quietly(meta["coordinator"], ack)

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

    # --- serving requests ----------------------------------------------------------------------------

    @property
    def source_present(self) -> bool:
        """Whether this node or a peer holds the model (the plan's model, once there is a plan)."""
        model = self.plan_meta.get("model")
        holders = [self.model_hash] + [str(p.info.get("model") or "") for p in self.members.peers.values()]
        return any(h and (not model or h == model) for h in holders)

    async def wait_ready(self, timeout: float = READY_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.plan is not None and not self.source_present:
                # no holder: nobody can replan or serve shards, so waiting cannot help
                raise SwarmError("the model's source left the swarm: no node holding the model is connected "
                                 "(start a node with --model to bring the swarm back)")
            if self.ready and self.plan and self.side_files_ready:
                break
            if time.monotonic() > deadline:
                why = self.plan_error or ("no node holding the model is reachable" if not self.plan else "stages loading")
                raise SwarmError(f"the swarm is not ready: {why}")
            await asyncio.sleep(0.05)
        missing = [n for n in self.plan.node_ids() if n != self.id and n not in self.members.peers]
        if missing:
            raise SwarmError(f"node(s) of the plan are gone: {', '.join(missing)}")

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

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[tuple[int, str, str | None]]:
        """(token id, new text, finish reason or None) for each generated token; timings in self.stats."""
        await self.wait_ready()
        if len(self.requests) >= self.config.max_sessions:
            raise SwarmError(f"busy: {len(self.requests)} sessions in progress (the limit is {self.config.max_sessions})")
        budget = self.token_budget(len(prompt), params.max_tokens)
        stream = TextStream(self.tokenizer, params, len(prompt), len(prompt) + budget, self.eos_ids)
        timings = Timings(prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        self.stats["requests"] += 1
        reason = None
        async with contextlib.aclosing(request_tokens(self, prompt, params, budget)) as tokens:
            async for token in tokens:
                now = time.perf_counter()
                if timings.generated_tokens == 0:
                    timings.prefill_s, t1 = now - t0, now
                timings.generated_tokens += 1
                timings.decode_s = now - t1
                text, reason = stream.feed(token)
                yield token, text, reason
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
            "cluster": {"id": auth.cluster_id(self.config.cluster_key), "open": not self.config.cluster_key},
            "ready": self.ready, "epoch": self.epoch, "plan_error": self.plan_error, "topology_error": self.topology_error,
            "source_present": self.source_present,
            "plan": [{**s.__dict__, "name": self._name_of(s.node_id)} for s in self.plan.stages] if self.plan else [],
            "nodes": nodes, "refused": self.members.refused,
            "sessions": len(self.requests), "stats": self.stats,
        }

    def notify(self) -> None:
        """Wake the dashboards' live sockets (each gets the next snapshot)."""
        for queue in list(self.listeners):
            if queue.empty():
                queue.put_nowait(True)
