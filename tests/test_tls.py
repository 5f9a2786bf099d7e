"""Peer links over TLS (swarm/tls.py, swarm/membership.py, swarm/shardserve.py), with real daemons on 127.0.0.1.

- Each node's key and certificate are made once in its config folder and kept; the fingerprint a node
  reports is the one the standard library's TLS client sees on its peer port.
- Peers and shards are served only on the TLS peer port (--port + 1 by default); the dashboard's port
  serves neither, and says where the peer port is. Plain HTTP and TLS 1.2 get nothing from the peer port.
- A replayed shard request is refused and a fresh one served; a fetcher whose clock is off gets an error
  that says by how much.
- A man in the middle that relays with a certificate of its own is refused, while the same relay passing
  the TLS bytes through untouched lets the node join (the refusal is the certificate's doing).
- An open swarm still encrypts and says that its links are unauthenticated; --tls-cert serves the
  dashboard over HTTPS and --peer still finds the node through it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from swarm import auth
from swarm.discovery import parse_ad
from swarm.shards import ShardError
from swarm.shardserve import fetch_shard
from swarm.tls import (IDENTITY_FILE, Endpoint, PeerClient, client_context, load_identity, make_identity_pem,
                       seen_fingerprint)
from tests.swarm_harness import REPO, Daemon, free_port, get_json, wait_for, wait_ready

# --- the identity ------------------------------------------------------------------------------------------


def test_identity_is_made_once_private_and_kept(tmp_path):
    first = load_identity(tmp_path / "cfg")
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    assert load_identity(tmp_path / "cfg") == first                     # kept, not made again
    assert load_identity(tmp_path / "other").fingerprint != first.fingerprint
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == [IDENTITY_FILE]   # no temporary left behind


def test_daemons_starting_at_once_share_one_identity(tmp_path):
    code = "import sys; from swarm.tls import load_identity; print(load_identity(sys.argv[1]).fingerprint)"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cfg")], stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(4)]
    prints = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert prints == {load_identity(tmp_path / "cfg").fingerprint}


def test_a_broken_identity_file_is_a_clear_error(tmp_path):
    (tmp_path / IDENTITY_FILE).write_bytes(make_identity_pem()[:300])
    with pytest.raises(ValueError, match="delete it"):
        load_identity(tmp_path)


def test_the_peer_port_travels_in_the_mdns_record():
    ad = parse_ad({"id": "n1", "port": "10128", "peer_port": "10129"})
    assert (ad.port, ad.peer_port) == (10128, 10129)
    assert parse_ad({"id": "n1", "port": "10128"}).peer_port == 0      # an older node: asked at /peer-port
    for bad in ("x", "70000", "-1"):
        with pytest.raises(ValueError):
            parse_ad({"id": "n1", "port": "10128", "peer_port": bad})


# --- live daemons ------------------------------------------------------------------------------------------


class Nodes:
    """Daemons on 127.0.0.1 without mDNS, each with its own cache and config folder (its own certificate)."""

    def __init__(self, tmp: Path):
        self.tmp, self.key = tmp, uuid.uuid4().hex
        self.env = {"XDG_CACHE_HOME": str(tmp / "xdg")}
        self.daemons: list[Daemon] = []

    def start(self, name: str, *extra: str, key: str | None = "same", port: int | None = None) -> Daemon:
        keyed = ["--cluster-key", self.key if key == "same" else key] if key else []
        args = ["--max-context", "256", "--no-mdns", "--cache-dir", str(self.tmp / name),
                "--config-dir", str(self.tmp / f"{name}-config"), *keyed, *extra]
        self.daemons.append(Daemon(name, "127.0.0.1", port or free_port(), args, self.tmp, self.env))
        return self.daemons[-1]

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path)
    try:
        yield n
    finally:
        n.stop()


def source(nodes: Nodes, *extra: str, key: str | None = "same") -> tuple[Daemon, dict]:
    """A node holding the demo alone, once ready; and its own entry of /api/swarm."""
    a = nodes.start("a", "--model", "demo", "--speed", "2", "--memory-budget", "2MB", *extra, key=key)
    return a, wait_ready([a], nodes=1)[0]["nodes"][0]


def run(coro):
    return asyncio.run(coro)


async def _get(url: str, headers: dict, fingerprint: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, \
            http.get(url, headers=headers, ssl=aiohttp.Fingerprint(bytes.fromhex(fingerprint))) as r:
        return r.status, (await r.read()).decode(errors="replace")


def test_peers_and_shards_are_served_only_over_tls(nodes):
    a, me = source(nodes)
    assert me["peer_port"] == a.port + 1 and not me["https"]
    # the certificate the node reports is the one the standard library's client sees on the peer port
    pem = ssl.get_server_certificate(("127.0.0.1", me["peer_port"]))
    assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest() == me["cert"]
    assert get_json(a.url + "/peer-port") == {"peer_port": me["peer_port"]}
    stage = f"/shards/{me['model']}/0-2-f1l0"
    tls_url = f"https://127.0.0.1:{me['peer_port']}"

    async def probe():
        out = {}
        async with aiohttp.ClientSession() as http:
            # the dashboard's port serves neither shards nor the peer socket, signed or not
            async with http.get(a.url + stage, headers=auth.sign_request(nodes.key, "GET", stage, me["cert"])) as r:
                out["shard on the dashboard port"] = r.status
            async with http.get(a.url + "/peer", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                          "Sec-WebSocket-Key": "x3JJHMbDL1EzLkh9GBhXDw==",
                                                          "Sec-WebSocket-Version": "13"}) as r:
                out["peer socket on the dashboard port"] = r.status
            try:   # plain HTTP to the TLS port: no answer at all
                async with http.get(f"http://127.0.0.1:{me['peer_port']}{stage}") as r:
                    out["plain http to the peer port"] = r.status
            except aiohttp.ClientError as e:
                out["plain http to the peer port"] = type(e).__name__
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode, old.maximum_version = False, ssl.CERT_NONE, ssl.TLSVersion.TLSv1_2
        try:
            await asyncio.open_connection("127.0.0.1", me["peer_port"], ssl=old)
            out["tls 1.2"] = "connected"
        except (ssl.SSLError, ConnectionError) as e:
            out["tls 1.2"] = type(e).__name__
        return out

    out = run(probe())
    assert out["shard on the dashboard port"] == 404 and out["peer socket on the dashboard port"] == 404, out
    assert out["plain http to the peer port"] in ("ServerDisconnectedError", "ClientOSError"), out
    assert out["tls 1.2"] != "connected", out

    # a signed request is served once; the very same request again is a replay; a fresh one is served
    signed = auth.sign_request(nodes.key, "GET", stage, me["cert"])
    first, again = run(_get(tls_url + stage, signed, me["cert"])), run(_get(tls_url + stage, signed, me["cert"]))
    fresh = run(_get(tls_url + stage, auth.sign_request(nodes.key, "GET", stage, me["cert"]), me["cert"]))
    assert first[0] == 200 and fresh[0] == 200 and first[1] == fresh[1]
    assert again[0] == 401 and "replayed" in again[1], again
    assert "a replayed request" in a.log()


def test_a_taken_peer_port_moves_and_the_dashboard_says_where(nodes):
    while True:   # a free port whose next one is free too, and then taken by someone else
        port, squatter = free_port(), socket.socket()
        try:
            squatter.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            squatter.close()
    with squatter:
        squatter.listen()
        a = nodes.start("a", "--speed", "1", "--memory-budget", "2MB", port=port)
        me = wait_for(lambda: a.state()["nodes"][0], 60, "a to answer", [a])
        assert me["peer_port"] not in (0, port + 1) and get_json(a.url + "/peer-port") == {"peer_port": me["peer_port"]}
        pem = ssl.get_server_certificate(("127.0.0.1", me["peer_port"]))
        assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest() == me["cert"]
        assert f"port {port + 1} is taken" in a.log()


def test_a_fetcher_whose_clock_is_off_hears_by_how_much(nodes, tmp_path, monkeypatch):
    a, me = source(nodes)

    async def fetch():
        async def find(base_url):
            return Endpoint(f"https://127.0.0.1:{me['peer_port']}", me["cert"])
        client = PeerClient(find)
        try:
            return await fetch_shard(client, a.url, me["model"], 0, 2, True, False, tmp_path / "fetched", nodes.key)
        finally:
            await client.close()

    real = auth.time.time
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(time=lambda: real() + 1000))
    with pytest.raises(ShardError, match=r"this node's clock is (999|1000) s ahead of the source's.*set both clocks"):
        run(fetch())
    assert re.search(r"clock is (999|1000) s ahead of this node's", a.log())   # signed times are whole seconds
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(time=real))
    assert (run(fetch()) / "model.safetensors").exists()


class Relay:
    """A man in the middle on 127.0.0.1, in a thread: `/peer-port` on a plain port sends dialers to its relay
    port, which either ends their TLS with a certificate of its own and opens TLS to the real peer port
    (mode "own-certificate"), or passes the bytes through untouched ("pass-through")."""

    def __init__(self, target_port: int, config_dir: Path):
        self.target_port, self.identity = target_port, load_identity(config_dir)
        self.mode = "own-certificate"
        self.loop = asyncio.new_event_loop()
        self.ports: dict[str, int] = {}
        self.relayed = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        tls = await asyncio.start_server(self._own_certificate, "127.0.0.1", 0, ssl=self.identity.server_context())
        plain = await asyncio.start_server(self._pass_through, "127.0.0.1", 0)
        self.servers = [tls, plain]
        self.ports = {"own-certificate": tls.sockets[0].getsockname()[1],
                      "pass-through": plain.sockets[0].getsockname()[1]}
        async def pointer(request):
            return web.json_response({"peer_port": self.ports[self.mode]})

        app = web.Application()
        app.router.add_get("/peer-port", pointer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.ports["pointer"] = self.runner.addresses[0][1]

    async def _own_certificate(self, reader, writer) -> None:
        await self._pipe(reader, writer, client_context())

    async def _pass_through(self, reader, writer) -> None:
        await self._pipe(reader, writer, None)

    async def _pipe(self, reader, writer, upstream_tls) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port, ssl=upstream_tls)
        except OSError:
            writer.close()
            return
        self.relayed += 1

        async def copy(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()
        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    async def _close(self) -> None:
        for server in self.servers:
            server.close()
        pipes = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await self.runner.cleanup()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_a_man_in_the_middle_with_its_own_certificate_is_refused(nodes, tmp_path):
    a, me = source(nodes)
    relay = Relay(me["peer_port"], tmp_path / "relay-config")
    try:
        b = nodes.start("b", "--peer", f"127.0.0.1:{relay.ports['pointer']}", "--speed", "1", "--memory-budget", "2MB")
        where = f"127.0.0.1:{relay.ports['pointer']}"
        refused = wait_for(lambda: b.state()["refused"].get(where), 30, "b to be refused", [a, b])
        assert "authentication failed" in refused and relay.relayed >= 1
        assert "man in the middle" in a.log()
        time.sleep(2)   # b keeps redialing through the relay: never admitted by either side
        assert [n["name"] for n in a.state()["nodes"]] == ["a"]
        assert [n["name"] for n in b.state()["nodes"]] == ["b"]

        # the same relay passing TLS through untouched: b sees a's own certificate and joins
        relay.mode = "pass-through"
        wait_for(lambda: len(b.state()["nodes"]) == 2, 30, "b to join through the pass-through relay", [a, b])
        peer_a = next(n for n in b.state()["nodes"] if n["name"] == "a")
        assert peer_a["cert"] == me["cert"]
    finally:
        relay.stop()


def test_an_open_swarm_encrypts_and_says_it_is_unauthenticated(nodes):
    a, me = source(nodes, key=None)
    b = nodes.start("b", "--peer", f"127.0.0.1:{a.port}", "--speed", "1", "--memory-budget", "2MB", key=None)
    wait_for(lambda: len(b.state()["nodes"]) == 2 and len(a.state()["nodes"]) == 2, 30, "b to join a", [a, b])
    state = a.state()
    assert state["cluster"]["open"] is True and all(n["open"] for n in state["nodes"])
    assert "links are encrypted (TLS) but unauthenticated" in a.log()

    async def plain_peer_socket():
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(f"http://127.0.0.1:{me['peer_port']}/peer"):
                    return "connected"
            except aiohttp.ClientError as e:
                return type(e).__name__

    assert run(plain_peer_socket()) != "connected"   # even open, the peer port speaks only TLS

    async def tls_peer_socket():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context())) as http, \
                http.ws_connect(f"https://127.0.0.1:{me['peer_port']}/peer") as ws:
            return seen_fingerprint(ws)

    assert run(tls_peer_socket()) == me["cert"]


def test_the_dashboard_over_https_and_a_peer_that_finds_it(nodes, tmp_path):
    pem = tmp_path / "dashboard.pem"
    pem.write_bytes(make_identity_pem())   # a certificate of the user's, key in the same file
    a = nodes.start("a", "--model", "demo", "--speed", "2", "--memory-budget", "2MB", "--tls-cert", str(pem))
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE

    def state(d: Daemon) -> dict:
        import json
        import urllib.request
        with urllib.request.urlopen(f"https://127.0.0.1:{d.port}/api/swarm", timeout=5, context=insecure) as r:
            return json.loads(r.read())

    wait_for(lambda: state(a)["ready"], 60, "a to be ready over https", [a])
    assert state(a)["nodes"][0]["https"] is True
    with pytest.raises(OSError):
        get_json(a.url + "/api/swarm")    # no plain HTTP on that port any more
    b = nodes.start("b", "--peer", f"127.0.0.1:{a.port}", "--speed", "1", "--memory-budget", "2MB")
    wait_for(lambda: len(b.state()["nodes"]) == 2, 30, "b to find a's peer port through https", [a, b])
