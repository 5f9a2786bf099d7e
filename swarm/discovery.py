"""mDNS discovery: advertise this node as _cake-swarm._tcp.local. and follow peers of the same cluster.

The TXT record carries the node's capabilities (id, name, addr, port, backend, budget in bytes, speed in
GB/s, cluster id, version, model hash, plus any extra keys, among them peer_port: where its TLS listener
for peers is; port is its dashboard's). mDNS runs only on the interface of --host
(all interfaces for 0.0.0.0), IPv4 only. Peers of another cluster are logged and ignored.

mDNS says when a peer leaves cleanly (goodbye packets); a peer that dies keeps its records until their
TTL runs out, so liveness is membership's job (heartbeats), not this module's.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import ifaddr
from zeroconf import BadTypeInNameException, InterfaceChoice, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE = "_cake-swarm._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
log = logging.getLogger("swarm.discovery")


@dataclass(frozen=True)
class PeerAd:
    """What a peer advertises. `addr` is the address to connect to; `props` is the whole TXT record."""
    node_id: str
    name: str
    addr: str
    port: int
    backend: str
    budget: int
    speed: float
    cluster: str
    version: str
    model: str
    peer_port: int = 0              # 0: not advertised (the dashboard's port tells, at /peer-port)
    addresses: tuple[str, ...] = ()
    props: dict[str, str] = field(default_factory=dict, hash=False)


def parse_ad(props: dict[str, str], addresses: list[str] | tuple[str, ...] = ()) -> PeerAd:
    """TXT properties (+ A-record addresses) -> PeerAd; ValueError when a field is missing or malformed."""
    try:
        node_id, port = props["id"], int(props["port"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"advertisement without a valid id/port: {e}") from None
    if not node_id or not 0 < port < 65536:
        raise ValueError(f"advertisement with empty id or bad port {port}")
    try:
        peer_port = int(props.get("peer_port") or 0)
    except ValueError:
        raise ValueError(f"advertisement with a bad peer_port {props.get('peer_port')!r}") from None
    if not 0 <= peer_port < 65536:
        raise ValueError(f"advertisement with a bad peer_port {peer_port}")
    addr = props.get("addr") or ""
    if addresses and addr not in addresses:
        addr = addresses[0]  # the TXT address is not one the peer answers on (e.g. it serves 0.0.0.0)
    return PeerAd(node_id=node_id, name=props.get("name") or node_id, addr=addr, port=port,
                  backend=props.get("backend") or "cpu", budget=int(props.get("budget") or 0),
                  speed=float(props.get("speed") or 0.0), cluster=props.get("cluster") or "open",
                  version=props.get("version") or "", model=props.get("model") or "", peer_port=peer_port,
                  addresses=tuple(addresses), props=dict(props))


def local_ipv4_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces, loopback last (what 0.0.0.0 serves on)."""
    ips = [ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)]
    return sorted(set(ips), key=lambda a: (ipaddress.IPv4Address(a).is_loopback, a))


def advertised_addresses(host: str) -> list[str]:
    """Where peers reach a node serving on `host`: itself, or for 0.0.0.0 the non-loopback addresses."""
    if host == "0.0.0.0":
        outside = [a for a in local_ipv4_addresses() if not ipaddress.IPv4Address(a).is_loopback]
        return outside or ["127.0.0.1"]
    return [host]


async def _call(fn, *args) -> None:
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("discovery callback %s failed", getattr(fn, "__name__", fn))


class Discovery:
    """Advertise this node and report peers of the same cluster coming and going.

    node_info: id, name, backend, budget, speed, cluster, version, model (+ extras), all TXT-able.
    on_peer_added(ad) is called for a new peer and again whenever its advertisement changes;
    on_peer_removed(node_id) when it says goodbye. Both may be plain functions or coroutines.
    """

    def __init__(self, node_info: dict[str, Any], host: str, port: int,
                 on_peer_added: Callable[[PeerAd], Any], on_peer_removed: Callable[[str], Any]):
        self.node_info = dict(node_info)
        self.node_id = str(self.node_info["id"])
        if not 0 < len(self.node_id.encode()) <= 58 or "." in self.node_id:  # "cake-" + id is a DNS label
            raise ValueError(f"node id must be 1-58 bytes without dots: {self.node_id!r}")
        self.host, self.port = host, port
        ipaddress.IPv4Address(host)  # ValueError for anything but an IPv4 literal
        self.on_peer_added, self.on_peer_removed = on_peer_added, on_peer_removed
        self.peers: dict[str, PeerAd] = {}   # node_id -> latest ad, same cluster only
        self.ignored: set[str] = set()       # node ids seen with another cluster id
        self._names: dict[str, str] = {}     # service name -> node_id, for removals
        self._present: set[str] = set()      # service names currently on the network
        self._tasks: set[asyncio.Task] = set()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None

    @property
    def service_name(self) -> str:
        return f"{self.node_id}.{SERVICE_TYPE}"

    def _service_info(self) -> AsyncServiceInfo:
        addresses = advertised_addresses(self.host)
        props = {k: str(v) for k, v in self.node_info.items() if v is not None}
        props.update(addr=addresses[0], port=str(self.port))
        return AsyncServiceInfo(SERVICE_TYPE, self.service_name, port=self.port, properties=props,
                                server=f"cake-{self.node_id}.local.", parsed_addresses=addresses)

    async def start(self) -> None:
        interfaces = InterfaceChoice.All if self.host == "0.0.0.0" else [self.host]
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        try:
            self._info = self._service_info()
            await self._zc.async_register_service(self._info)
        except BaseException:
            await self.stop()
            raise
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info("advertising %s on %s:%d (cluster %s)", self.node_id, self.host, self.port,
                 self.node_info.get("cluster"))

    async def update(self, **changes: Any) -> None:
        """Change TXT properties and re-announce them."""
        self.node_info.update(changes)
        if self._zc is not None:
            self._info = self._service_info()
            await self._zc.async_update_service(self._info)

    async def stop(self) -> None:
        """Say goodbye on the network and close the sockets."""
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await zc.async_unregister_all_services()
        await zc.async_close()

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == self.service_name:
            return
        if state_change is ServiceStateChange.Removed:
            self._present.discard(name)
            node_id = self._names.pop(name, None)
            if node_id is not None and self.peers.pop(node_id, None) is not None:
                self._spawn(_call(self.on_peer_removed, node_id))
            return
        self._present.add(name)
        self._spawn(self._resolve(name))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
        except BadTypeInNameException:
            return
        if self._zc is None or not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.info("could not resolve %s", name)
            return
        if name not in self._present:
            return  # it left while we were asking
        try:
            props = {k: v or "" for k, v in info.decoded_properties.items()}
            ad = parse_ad(props, info.parsed_addresses(IPVersion.V4Only))
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("ignoring malformed advertisement %s: %s", name, e)
            return
        if ad.node_id == self.node_id:
            return
        cluster = str(self.node_info.get("cluster", "open"))
        if ad.cluster != cluster:
            if ad.node_id not in self.ignored:
                log.warning("ignoring %s (%s at %s): cluster %s is not ours (%s)",
                            ad.node_id, ad.name, ad.addr, ad.cluster, cluster)
            self.ignored.add(ad.node_id)
            return
        if self.peers.get(ad.node_id) == ad:
            return
        self._names[name] = ad.node_id
        self.peers[ad.node_id] = ad
        await _call(self.on_peer_added, ad)
