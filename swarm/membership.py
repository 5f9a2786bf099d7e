"""The peer table: the TLS listener peers dial, authenticated websocket links to every peer, heartbeats,
failure detection.

Peers talk only over TLS, on the node's peer port (--peer-port, by default the dashboard's port + 1),
where the node serves /peer and the routes it is given (its shards). People and --peer name a node by its
dashboard's address; that port answers GET /peer-port with where the listener is. Each node dials every
peer it learns of (mDNS, --peer, a peer's welcome or an incoming dial) and sends its own frames on the
link it dialed; frames arrive on the links peers dialed to it. A link is admitted after a mutual HMAC
challenge-response on the cluster key that also covers the listener's certificate as each side saw it
(swarm.auth); the dialer keeps that certificate's fingerprint, to which its HTTPS requests to the peer are
then pinned (endpoint()). A peer is dead when its links close, when no frame came from it for
DEAD_AFTER_S seconds, or when a frame to it could not be sent for SEND_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import aiohttp
from aiohttp import web

try:
    from asyncio import timeout as send_deadline   # Python 3.11+
except ImportError:
    from async_timeout import timeout as send_deadline  # aiohttp's own dependency before 3.11

from yarl import URL

from swarm import auth
from swarm.protocol import MAX_FRAME_BYTES, ProtocolError, close_with_error, encode_frame, recv_frame, send_frame
from swarm.tls import Endpoint, Identity, client_context, seen_fingerprint

log = logging.getLogger("swarm.membership")

HEARTBEAT_S = 1.0
DEAD_AFTER_S = 3.5
SEND_TIMEOUT_S = DEAD_AFTER_S   # a peer that takes no frame for this long is as dead as a silent one
HANDSHAKE_S = 5.0
NAMED_RETRY_S = 30.0   # how long a node named by a peer (its welcome's list) is redialed while it does not answer
VERSION = "2"   # 2: peer links over TLS


class PeerGone(ConnectionError):
    """A frame could not be sent: the peer is unknown, unreachable or dead."""


@dataclass
class Peer:
    node_id: str
    addr: str
    port: int                                                # its dashboard's
    info: dict
    peer_port: int = 0                                       # its TLS listener's
    fingerprint: str = ""                                    # its listener's certificate, once we dialed it
    last_seen: float = field(default_factory=time.monotonic)
    link: aiohttp.ClientWebSocketResponse | None = None      # ours, for sending
    inbound: set = field(default_factory=set)                # theirs, for receiving

    @property
    def name(self) -> str:
        return str(self.info.get("name", self.node_id))

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}"


class Membership:
    def __init__(self, node_id: str, key: str | None, info: Callable[[], dict],
                 on_join: Callable[[Peer], None], on_leave: Callable[[Peer, str], None],
                 on_frame: Callable[[str, dict], Awaitable[None] | None]):
        self.node_id, self.key, self.cluster = node_id, key, auth.cluster_id(key)
        self.info, self.on_join, self.on_leave, self.on_frame = info, on_join, on_leave, on_frame
        self.peers: dict[str, Peer] = {}
        self.refused: dict[str, str] = {}          # address -> why we refused it (shown in status)
        self._dialing: set[tuple[str, int]] = set()
        self._static: set[tuple[str, int]] = set()   # --peer addresses, redialed until they answer
        # nodes a peer named that did not answer yet (a link just back up can refuse the first SYN): -> until
        self._named: dict[tuple[str, int], tuple[float, int]] = {}   # (addr, port) -> (until, its peer port)
        self._peer_ports: dict[tuple[str, int], int] = {}   # (addr, dashboard port) -> its peer port
        self._tasks: set[asyncio.Task] = set()
        self._http: aiohttp.ClientSession | None = None
        self._listener: web.AppRunner | None = None
        self._seq = 0
        self.identity: Identity | None = None
        self.peer_port = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str, peer_port: int, identity: Identity, routes: Sequence[web.RouteDef] = (),
                    any_port_if_taken: bool = False) -> None:
        """Listen for peers over TLS on host:peer_port (0: any free port; with any_port_if_taken, also when
        peer_port is in use) showing `identity`, serving /peer and `routes`; then start heartbeats."""
        self.identity = identity
        try:
            sock = _listening_socket(host, peer_port)
        except OSError as e:
            if not (any_port_if_taken and e.errno == errno.EADDRINUSE):
                raise
            sock = _listening_socket(host, 0)
            log.warning("port %d is taken: peers connect on port %d instead (--peer-port chooses one)", peer_port,
                        sock.getsockname()[1])
        app = web.Application()
        app.add_routes([web.get("/peer", self.accept), *routes])
        self._listener = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._listener.setup()
        # a stopping node does not wait for a peer's download to finish
        await web.SockSite(self._listener, sock, ssl_context=identity.server_context(), shutdown_timeout=1.0).start()
        self.peer_port = sock.getsockname()[1]
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=HANDSHAKE_S),
                                           connector=aiohttp.TCPConnector(ssl=client_context()))
        self._spawn(self._heartbeats())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in list(self.peers.values()):
            for ws in [peer.link, *peer.inbound]:
                if ws is not None and not ws.closed:
                    await ws.close()
        if self._http is not None:
            await self._http.close()
        if self._listener is not None:
            await self._listener.cleanup()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- sending -----------------------------------------------------------------------------------

    async def send(self, node_id: str, frame: dict) -> None:
        peer = self.peers.get(node_id)
        if peer is None or peer.link is None or peer.link.closed:
            raise PeerGone(f"peer {node_id} is not connected")
        try:
            # a link whose cable is pulled gets no ACKs: once the socket buffers fill, send_bytes waits
            # forever, and with it whatever sends (the stage runner, the heartbeats)
            async with send_deadline(SEND_TIMEOUT_S):  # no task, no extra turn of the loop per frame
                await peer.link.send_bytes(encode_frame(frame))
        except asyncio.TimeoutError:
            self.drop(node_id, f"a frame waited {SEND_TIMEOUT_S} s to be sent")
            raise PeerGone(f"peer {node_id} takes no frames") from None
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            self.drop(node_id, f"send failed: {e}")
            raise PeerGone(f"peer {node_id}: {e}") from None

    async def _send_quietly(self, node_id: str, frame: dict) -> None:
        try:
            await self.send(node_id, frame)
        except PeerGone:
            pass

    async def broadcast(self, frame: dict) -> None:
        for node_id in list(self.peers):
            try:
                await self.send(node_id, frame)
            except PeerGone:
                pass

    # --- joining -----------------------------------------------------------------------------------

    def keep(self, addr: str, port: int) -> None:
        """A peer given by address: dialed now and again whenever it is not connected."""
        self._static.add((addr, port))
        self.dial_soon(addr, port)

    def dial_soon(self, addr: str, port: int, peer_port: int = 0) -> None:
        """Dial the node whose dashboard is addr:port (its peer port, when known, saves asking it)."""
        if 0 < peer_port < 65536:
            self._peer_ports[(addr, port)] = peer_port
        if (addr, port) not in self._dialing and not any(
                p.addr == addr and p.port == port and p.link is not None for p in self.peers.values()):
            self._spawn(self.dial(addr, port))

    async def tell_peer_port(self, request: web.Request) -> web.Response:
        """GET /peer-port on the dashboard's port: where this node listens for peers. Nothing secret: a dialer
        sent elsewhere by a forged answer fails the handshake."""
        return web.json_response({"peer_port": self.peer_port})

    async def find_peer_port(self, addr: str, port: int) -> int:
        """The peer port of the node whose dashboard is addr:port (served over HTTP, or HTTPS with
        --tls-cert); `port` itself when neither answers, for a --peer given as the peer port."""
        known = self._peer_ports.get((addr, port))
        if known:
            return known
        for scheme in ("http", "https"):
            try:
                async with self._http.get(f"{scheme}://{addr}:{port}/peer-port", ssl=False,
                                          timeout=aiohttp.ClientTimeout(total=HANDSHAKE_S)) as r:
                    if r.status == 200:
                        peer_port = (await r.json())["peer_port"]
                        if type(peer_port) is int and 0 < peer_port < 65536:
                            return peer_port
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
                continue
        return port

    async def dial(self, addr: str, port: int) -> Peer | None:
        """Connect to a peer's TLS listener, authenticate both ways, and keep reading its link until it closes."""
        where = f"{addr}:{port}"
        self._dialing.add((addr, port))
        ws = None
        try:
            peer_port = await self.find_peer_port(addr, port)
            ws = await self._http.ws_connect(f"https://{addr}:{peer_port}/peer", max_msg_size=MAX_FRAME_BYTES,
                                             heartbeat=None, timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
            seen = seen_fingerprint(ws)   # the listener's certificate, as this side sees it
            hello = await recv_frame(ws, timeout=HANDSHAKE_S)
            if hello is None or hello["t"] != "hello":
                raise ProtocolError(f"expected hello, got {hello and hello['t']}")
            peer_id = hello["node_id"]
            if peer_id == self.node_id:
                await ws.close()
                return None
            if hello["cluster"] != self.cluster:
                self.refused[where] = f"cluster {hello['cluster']} is not ours ({self.cluster})"
                log.warning("not joining %s: %s", where, self.refused[where])
                await ws.close()
                return None
            mine = auth.new_challenge()
            await send_frame(ws, {"t": "auth", "node_id": self.node_id, "challenge": mine, "info": self.info(),
                                  "response": auth.respond(self.key, hello["challenge"], self.node_id, seen)})
            welcome = await recv_frame(ws, timeout=HANDSHAKE_S)
            if welcome is None or welcome["t"] != "welcome" or not auth.check(
                    self.key, mine, peer_id, bytes(welcome.get("response") or b""), seen):
                why = (welcome["message"] if welcome and welcome["t"] == "error"
                       else "it failed authentication (another cluster key, or a man in the middle)")
                self.refused[where] = why
                log.warning("not joining %s: %s", where, why)
                await ws.close()
                return None
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, ProtocolError) as e:
            log.log(logging.DEBUG if (addr, port) in self._named else logging.INFO, "cannot join %s: %s", where, e)
            self._peer_ports.pop((addr, port), None)   # ask again next time: it may have moved
            if ws is not None:
                await ws.close()
            return None
        finally:
            self._dialing.discard((addr, port))
        self.refused.pop(where, None)
        self._named.pop((addr, port), None)
        peer = self._admit(peer_id, addr, port, welcome.get("info") or hello.get("info") or {})
        peer.peer_port, peer.fingerprint = peer_port, seen
        if peer.link is not None and not peer.link.closed:
            await ws.close()  # dialed twice (both sides found each other at once): keep the first link
            return peer
        peer.link = ws
        for other in welcome.get("peers") or []:
            if isinstance(other, dict) and other.get("node_id") not in (*self.peers, self.node_id):
                named, peer_port = (str(other.get("addr")), _int(other.get("port"))), _int(other.get("peer_port"))
                self._named.setdefault(named, (time.monotonic() + NAMED_RETRY_S, peer_port))
                self.dial_soon(*named, peer_port)
        self._spawn(self._read(peer_id, ws))
        return peer

    async def accept(self, request: web.Request) -> web.WebSocketResponse:
        """The /peer route: authenticate the dialer, then read its frames until the link closes."""
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=None)
        await ws.prepare(request)
        challenge = auth.new_challenge()
        try:
            await send_frame(ws, {"t": "hello", "node_id": self.node_id, "cluster": self.cluster, "version": VERSION,
                                  "challenge": challenge, "info": self.info()})
            frame = await recv_frame(ws, timeout=HANDSHAKE_S)
            if frame is None:
                return ws
            mine = self.identity.fingerprint
            if frame["t"] != "auth" or not auth.check(self.key, challenge, frame["node_id"], frame["response"], mine):
                log.warning("refused a peer from %s: bad cluster key (or a man in the middle with its own "
                            "certificate)", request.remote)
                await close_with_error(ws, "authentication failed: wrong cluster key, or the certificate you saw "
                                           "is not this node's", code=4401)
                return ws
            info = frame.get("info") or {}
            peer_id = frame["node_id"]
            await send_frame(ws, {"t": "welcome", "node_id": self.node_id, "info": self.info(),
                                  "response": auth.respond(self.key, bytes(frame.get("challenge") or b""),
                                                           self.node_id, mine),
                                  "peers": [{"node_id": p.node_id, "addr": p.addr, "port": p.port,
                                             "peer_port": p.peer_port} for p in self.peers.values()]})
        except (ProtocolError, asyncio.TimeoutError) as e:
            await close_with_error(ws, f"handshake failed: {e}")
            return ws
        addr, port = str(info.get("addr") or request.remote), _int(info.get("port"))
        peer = self._admit(peer_id, addr, port, info)
        peer.inbound.add(ws)
        if peer.link is None or peer.link.closed:
            self.dial_soon(addr, port, peer.peer_port)
        await self._read(peer_id, ws)
        return ws

    def _admit(self, peer_id: str, addr: str, port: int, info: dict) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = Peer(peer_id, addr, port, dict(info), _int(info.get("peer_port")))
            log.info("peer %s (%s) joined from %s:%d", peer_id, peer.name, addr, port)
            self.on_join(peer)
        else:
            peer.info.update(info)
        peer.last_seen = time.monotonic()
        return peer

    async def endpoint(self, base_url: str) -> Endpoint:
        """The TLS listener of the peer whose dashboard is base_url (http://addr:port), pinned to the certificate
        its handshake proved. That certificate is learned by dialing the peer: a peer that only dialed us is
        dialed now, and waited for up to HANDSHAKE_S."""
        url = URL(base_url)
        deadline = time.monotonic() + HANDSHAKE_S
        while True:
            peer = next((p for p in self.peers.values() if p.addr == url.host and p.port == url.port), None)
            if peer is not None and peer.fingerprint and peer.peer_port:
                return Endpoint(f"https://{peer.addr}:{peer.peer_port}", peer.fingerprint)
            if time.monotonic() > deadline:
                raise ConnectionError(f"{base_url} is not a peer this node has an authenticated link to")
            if peer is not None:
                self.dial_soon(peer.addr, peer.port, peer.peer_port)
            await asyncio.sleep(0.05)

    # --- reading and failure detection ---------------------------------------------------------------

    async def _read(self, peer_id: str, ws) -> None:
        try:
            while True:
                frame = await recv_frame(ws)
                if frame is None:
                    break
                peer = self.peers.get(peer_id)
                if peer is None:
                    break
                peer.last_seen = time.monotonic()
                if frame["t"] == "heartbeat":
                    peer.info.update(frame.get("info") or {})
                    continue
                result = self.on_frame(peer_id, frame)
                if asyncio.iscoroutine(result):
                    await result
        except ProtocolError as e:
            log.warning("malformed frame from %s: %s; closing that link", peer_id, e)
            await close_with_error(ws, str(e))
        except (ConnectionError, asyncio.CancelledError, aiohttp.ClientError):
            pass
        finally:
            peer = self.peers.get(peer_id)
            if peer is not None:
                peer.inbound.discard(ws)
                if ws is peer.link or not peer.inbound:
                    self.drop(peer_id, "link closed")

    def drop(self, node_id: str, why: str) -> None:
        peer = self.peers.pop(node_id, None)
        if peer is None:
            return
        log.warning("peer %s (%s) is gone: %s", node_id, peer.name, why)
        for ws in [peer.link, *peer.inbound]:
            if ws is not None and not ws.closed:
                self._spawn(ws.close())
        self.on_leave(peer, why)

    def beat(self) -> None:
        """A heartbeat (this node's info) to every peer now; the loop sends one each HEARTBEAT_S."""
        self._seq += 1
        frame = {"t": "heartbeat", "node_id": self.node_id, "seq": self._seq, "info": self.info()}
        for node_id in list(self.peers):
            # a task each: a peer whose link is stuck must not hold up the others' heartbeats
            self._spawn(self._send_quietly(node_id, frame))

    async def _heartbeats(self) -> None:
        while True:
            self.beat()
            now = time.monotonic()
            self._named = {where: named for where, named in self._named.items() if named[0] > now}
            for addr, port in self._static:
                self.dial_soon(addr, port)
            for (addr, port), (_, peer_port) in self._named.items():
                self.dial_soon(addr, port, peer_port)
            for _ in range(2):  # look for silent peers twice a beat: a dead one is dropped sooner
                now = time.monotonic()
                for peer in list(self.peers.values()):
                    if now - peer.last_seen > DEAD_AFTER_S:
                        self.drop(peer.node_id, f"no heartbeat for {now - peer.last_seen:.1f} s")
                await asyncio.sleep(HEARTBEAT_S / 2)


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as asyncio's servers do: restarts rebind at once
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _int(value) -> int:
    """A port number from a peer's info map, 0 when it is not one."""
    return value if type(value) is int and 0 < value < 65536 else 0
