"""Cluster ids, signed requests (bound to a certificate, no replays) and the peer challenge-response of
swarm/auth.py, the last two also through real TLS servers."""
import time

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, strategies as st

from swarm import auth
from swarm import protocol as P
from swarm.tls import client_context, load_identity, seen_fingerprint

KEY = "correct horse battery staple"
CERT = "c0" * 32          # a listener's certificate fingerprint
OTHER_CERT = "0d" * 32    # another one: a man in the middle's


def test_cluster_id_is_stable_and_depends_on_the_key():
    assert auth.cluster_id(None) == "open"
    a = auth.cluster_id(KEY)
    assert a == auth.cluster_id(KEY)
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != auth.cluster_id(KEY + "!")


def test_signed_request_verifies_and_tampering_fails():
    h = auth.sign_request(KEY, "get", "/shards/abc?start=0", CERT)
    assert set(h) == {auth.TIME_HEADER, auth.NONCE_HEADER, auth.AUTH_HEADER}
    assert auth.verify_request(KEY, "GET", "/shards/abc?start=0", h, CERT) is None
    # header names are case-insensitive, as HTTP says
    assert auth.verify_request(KEY, "GET", "/shards/abc?start=0", {k.lower(): v for k, v in h.items()}, CERT) is None
    for refused in (auth.verify_request("other key", "GET", "/shards/abc?start=0", h, CERT),
                    auth.verify_request(KEY, "POST", "/shards/abc?start=0", h, CERT),
                    auth.verify_request(KEY, "GET", "/shards/abd?start=0", h, CERT),
                    auth.verify_request(KEY, "GET", "/shards/abc?start=0", {**h, auth.NONCE_HEADER: "x"}, CERT),
                    auth.verify_request(KEY, "GET", "/shards/abc?start=0", {}, CERT),
                    # signed for the certificate a man in the middle showed, relayed to the real listener
                    auth.verify_request(KEY, "GET", "/shards/abc?start=0", h, OTHER_CERT),
                    auth.verify_request(KEY, "GET", "/shards/abc?start=0", h, None)):   # not over TLS
        assert refused is not None and refused.skew_s is None and refused.reason


def test_signature_outside_the_time_window_fails_and_says_by_how_much():
    h = auth.sign_request(KEY, "GET", "/p", CERT)
    t = int(h[auth.TIME_HEADER])
    assert auth.verify_request(KEY, "GET", "/p", h, CERT, now=t + auth.MAX_SKEW_S - 1) is None
    late = auth.verify_request(KEY, "GET", "/p", h, CERT, now=t + auth.MAX_SKEW_S + 5)
    assert late.skew_s == -auth.MAX_SKEW_S - 5 and f"{auth.MAX_SKEW_S + 5} s behind" in late.reason
    early = auth.verify_request(KEY, "GET", "/p", h, CERT, now=t - 1000)
    assert early.skew_s == 1000 and "1000 s ahead of" in early.reason
    # only a key holder hears about clocks
    forged = auth.verify_request("guess", "GET", "/p", h, CERT, now=t + 1000)
    assert forged.skew_s is None and "cluster key" in forged.reason


def test_a_nonce_is_taken_once_within_the_window():
    nonces = auth.Nonces()
    h = auth.sign_request(KEY, "GET", "/p", CERT)
    t = int(h[auth.TIME_HEADER])
    assert auth.verify_request(KEY, "GET", "/p", h, CERT, nonces, now=t) is None
    replay = auth.verify_request(KEY, "GET", "/p", h, CERT, nonces, now=t + 10)
    assert replay is not None and "replayed" in replay.reason
    assert auth.verify_request(KEY, "GET", "/p", auth.sign_request(KEY, "GET", "/p", CERT), CERT, nonces, now=t) is None
    # a forged request never fills the memory
    assert auth.verify_request(KEY, "GET", "/p", auth.sign_request("guess", "GET", "/p", CERT), CERT, nonces,
                               now=t) is not None and len(nonces) == 2
    # past the window the time check refuses the replay, and the nonces are forgotten
    assert auth.verify_request(KEY, "GET", "/p", h, CERT, nonces, now=t + auth.MAX_SKEW_S + 1).skew_s is not None
    assert nonces.first_use("later", t + 400, now=t + auth.MAX_SKEW_S + 1) and len(nonces) == 1


def test_open_swarm_accepts_anything():
    assert auth.sign_request(None, "GET", "/p", CERT) == {}
    assert auth.verify_request(None, "GET", "/p", {}, None) is None
    assert auth.check(None, auth.new_challenge(), "a", b"", CERT)


@given(st.dictionaries(st.sampled_from([auth.TIME_HEADER, auth.NONCE_HEADER, auth.AUTH_HEADER, "X"]),
                       st.text(max_size=80)))
def test_garbage_headers_are_refused_without_raising(headers):
    assert auth.verify_request(KEY, "GET", "/p", headers, CERT) is not None


def test_challenge_response_is_mutual_and_bound_to_node_id_and_certificate():
    c1, c2 = auth.new_challenge(), auth.new_challenge()
    assert len(c1) == 32 and c1 != c2
    r = auth.respond(KEY, c1, "node-b", CERT)
    assert auth.check(KEY, c1, "node-b", r, CERT)
    assert not auth.check(KEY, c2, "node-b", r, CERT)          # another challenge
    assert not auth.check(KEY, c1, "node-a", r, CERT)          # reflected as another node's answer
    assert not auth.check(KEY + "x", c1, "node-b", r, CERT)    # another key
    assert not auth.check(KEY, c1, "node-b", r, OTHER_CERT)    # seen on a connection with another certificate
    assert not auth.check(KEY, c1, "node-b", auth.respond(KEY + "x", c1, "node-b", CERT), CERT)
    assert not auth.check(KEY, c1, "node-b", "not bytes", CERT)


@pytest.fixture
def identity(tmp_path):
    return load_identity(tmp_path / "config")


async def _serve_tls(app: web.Application, identity) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=identity.server_context()).start()
    return runner, f"https://127.0.0.1:{runner.addresses[0][1]}"


async def test_signed_request_through_a_real_tls_server(identity):
    nonces = auth.Nonces()

    async def handler(request):
        refusal = auth.verify_request(KEY, request.method, request.path_qs, request.headers, identity.fingerprint,
                                      nonces)
        return web.Response(status=200 if refusal is None else 401, text=refusal.reason if refusal else "ok")

    app = web.Application()
    app.router.add_get("/shard/{name}", handler)
    runner, base = await _serve_tls(app, identity)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context())) as s:
            path = "/shard/x?a=1&b=2"
            signed = auth.sign_request(KEY, "GET", path, identity.fingerprint)
            # aiohttp's own pinning agrees that the listener shows the certificate of identity.fingerprint
            pin = aiohttp.Fingerprint(bytes.fromhex(identity.fingerprint))
            async with s.get(base + path, headers=signed, ssl=pin) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ServerFingerprintMismatch):
                await s.get(base + path, ssl=aiohttp.Fingerprint(bytes.fromhex(OTHER_CERT)))
            async with s.get(base + path, headers=signed) as r:
                assert r.status == 401 and "replayed" in await r.text()
            async with s.get(base + path) as r:
                assert r.status == 401
            stale = auth.sign_request(KEY, "GET", path, identity.fingerprint)
            stale[auth.TIME_HEADER] = str(int(time.time()) - 10_000)
            async with s.get(base + path, headers=stale) as r:
                assert r.status == 401
    finally:
        await runner.cleanup()


async def test_mutual_challenge_response_over_a_real_websocket(identity):
    """The handshake of swarm/protocol.py's comment, over TLS: only a dialer holding the key is welcomed, and
    a dialer tells a listener holding the key from one that only claims its cluster id."""
    admitted = []
    mine_cert = identity.fingerprint

    def listener(key, checks=True):
        async def handler(request):
            ws = web.WebSocketResponse(max_msg_size=P.MAX_FRAME_BYTES)
            await ws.prepare(request)
            mine = auth.new_challenge()
            await P.send_frame(ws, {"t": "hello", "node_id": "B", "cluster": auth.cluster_id(KEY),
                                    "version": "0.1", "challenge": mine})
            try:
                frame = await P.recv_frame(ws)
                if (frame is None or frame["t"] != "auth" or frame["node_id"] == "B"
                        or checks and not auth.check(key, mine, frame["node_id"], frame["response"], mine_cert)):
                    raise P.ProtocolError("authentication failed")
                await P.send_frame(ws, {"t": "welcome", "node_id": "B",
                                        "response": auth.respond(key, frame["challenge"], "B", mine_cert)})
                admitted.append(frame["node_id"])
            except P.ProtocolError as e:
                await P.close_with_error(ws, str(e), code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            await ws.close()
            return ws
        return handler

    async def dial(session, url, node_id, key, check_cluster=True):
        async with session.ws_connect(url) as ws:
            seen = seen_fingerprint(ws)
            hello = await P.recv_frame(ws)
            if check_cluster and hello["cluster"] != auth.cluster_id(key):
                return "other cluster"
            mine = auth.new_challenge()
            await P.send_frame(ws, {"t": "auth", "node_id": node_id, "challenge": mine,
                                    "response": auth.respond(key, hello["challenge"], node_id, seen)})
            answer = await P.recv_frame(ws)
            if answer is None or answer["t"] != "welcome":
                return "refused"
            return "welcome" if auth.check(key, mine, hello["node_id"], answer["response"], seen) else "impostor"

    app = web.Application()
    app.router.add_get("/peer", listener(KEY))
    app.router.add_get("/fake", listener("not the key", checks=False))  # claims KEY's cluster, lacks the key
    runner, base = await _serve_tls(app, identity)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context())) as s:
            assert await dial(s, base + "/peer", "A", KEY) == "welcome"
            assert await dial(s, base + "/peer", "M", "wrong key") == "other cluster"
            assert await dial(s, base + "/peer", "M", "wrong key", check_cluster=False) == "refused"
            assert await dial(s, base + "/peer", "B", KEY) == "refused"          # claims the listener's id
            assert await dial(s, base + "/fake", "A", KEY) == "impostor"
        assert admitted == ["A", "A"]  # the real listener once, the impostor once
    finally:
        await runner.cleanup()
