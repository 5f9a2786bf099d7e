"""Cluster ids, signed requests and the peer challenge-response of swarm/auth.py."""
import time

import aiohttp
from aiohttp import web
from hypothesis import given, strategies as st

from swarm import auth
from swarm import protocol as P

KEY = "correct horse battery staple"


def test_cluster_id_is_stable_and_depends_on_the_key():
    assert auth.cluster_id(None) == "open"
    a = auth.cluster_id(KEY)
    assert a == auth.cluster_id(KEY)
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != auth.cluster_id(KEY + "!")


def test_signed_request_verifies_and_tampering_fails():
    h = auth.sign_request(KEY, "get", "/shards/abc?start=0")
    assert set(h) == {auth.TIME_HEADER, auth.NONCE_HEADER, auth.AUTH_HEADER}
    assert auth.verify_request(KEY, "GET", "/shards/abc?start=0", h)
    # header names are case-insensitive, as HTTP says
    assert auth.verify_request(KEY, "GET", "/shards/abc?start=0", {k.lower(): v for k, v in h.items()})
    assert not auth.verify_request("other key", "GET", "/shards/abc?start=0", h)
    assert not auth.verify_request(KEY, "POST", "/shards/abc?start=0", h)
    assert not auth.verify_request(KEY, "GET", "/shards/abd?start=0", h)
    assert not auth.verify_request(KEY, "GET", "/shards/abc?start=0", {**h, auth.NONCE_HEADER: "x"})
    assert not auth.verify_request(KEY, "GET", "/shards/abc?start=0", {})


def test_signature_outside_the_time_window_fails():
    h = auth.sign_request(KEY, "GET", "/p")
    t = int(h[auth.TIME_HEADER])
    assert auth.verify_request(KEY, "GET", "/p", h, now=t + auth.MAX_SKEW_S - 1)
    assert not auth.verify_request(KEY, "GET", "/p", h, now=t + auth.MAX_SKEW_S + 5)
    assert not auth.verify_request(KEY, "GET", "/p", h, now=t - auth.MAX_SKEW_S - 5)


def test_open_swarm_accepts_anything():
    assert auth.sign_request(None, "GET", "/p") == {}
    assert auth.verify_request(None, "GET", "/p", {})
    assert auth.check(None, auth.new_challenge(), "a", b"")


@given(st.dictionaries(st.sampled_from([auth.TIME_HEADER, auth.NONCE_HEADER, auth.AUTH_HEADER, "X"]),
                       st.text(max_size=80)))
def test_garbage_headers_are_refused_without_raising(headers):
    assert auth.verify_request(KEY, "GET", "/p", headers) is False


def test_challenge_response_is_mutual_and_bound_to_node_id():
    c1, c2 = auth.new_challenge(), auth.new_challenge()
    assert len(c1) == 32 and c1 != c2
    r = auth.respond(KEY, c1, "node-b")
    assert auth.check(KEY, c1, "node-b", r)
    assert not auth.check(KEY, c2, "node-b", r)          # another challenge
    assert not auth.check(KEY, c1, "node-a", r)          # reflected as another node's answer
    assert not auth.check(KEY + "x", c1, "node-b", r)    # another key
    assert not auth.check(KEY, c1, "node-b", auth.respond(KEY + "x", c1, "node-b"))
    assert not auth.check(KEY, c1, "node-b", "not bytes")


async def test_signed_request_through_a_real_aiohttp_server():
    async def handler(request):
        ok = auth.verify_request(KEY, request.method, request.path_qs, request.headers)
        return web.Response(status=200 if ok else 401)

    app = web.Application()
    app.router.add_get("/shard/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s:
            path = "/shard/x?a=1&b=2"
            signed = auth.sign_request(KEY, "GET", path)
            async with s.get(f"http://127.0.0.1:{port}{path}", headers=signed) as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status == 401
            stale = auth.sign_request(KEY, "GET", path)
            stale[auth.TIME_HEADER] = str(int(time.time()) - 10_000)
            async with s.get(f"http://127.0.0.1:{port}{path}", headers=stale) as r:
                assert r.status == 401
    finally:
        await runner.cleanup()


async def test_mutual_challenge_response_over_a_real_websocket():
    """The handshake of swarm/protocol.py's comment: only a dialer holding the key is welcomed, and a
    dialer tells a listener holding the key from one that only claims its cluster id."""
    admitted = []

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
                        or checks and not auth.check(key, mine, frame["node_id"], frame["response"])):
                    raise P.ProtocolError("authentication failed")
                await P.send_frame(ws, {"t": "welcome", "node_id": "B",
                                        "response": auth.respond(key, frame["challenge"], "B")})
                admitted.append(frame["node_id"])
            except P.ProtocolError as e:
                await P.close_with_error(ws, str(e), code=aiohttp.WSCloseCode.POLICY_VIOLATION)
            await ws.close()
            return ws
        return handler

    async def dial(session, url, node_id, key, check_cluster=True):
        async with session.ws_connect(url) as ws:
            hello = await P.recv_frame(ws)
            if check_cluster and hello["cluster"] != auth.cluster_id(key):
                return "other cluster"
            mine = auth.new_challenge()
            await P.send_frame(ws, {"t": "auth", "node_id": node_id, "challenge": mine,
                                    "response": auth.respond(key, hello["challenge"], node_id)})
            answer = await P.recv_frame(ws)
            if answer is None or answer["t"] != "welcome":
                return "refused"
            return "welcome" if auth.check(key, mine, hello["node_id"], answer["response"]) else "impostor"

    app = web.Application()
    app.router.add_get("/peer", listener(KEY))
    app.router.add_get("/fake", listener("not the key", checks=False))  # claims KEY's cluster, lacks the key
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as s:
            assert await dial(s, base + "/peer", "A", KEY) == "welcome"
            assert await dial(s, base + "/peer", "M", "wrong key") == "other cluster"
            assert await dial(s, base + "/peer", "M", "wrong key", check_cluster=False) == "refused"
            assert await dial(s, base + "/peer", "B", KEY) == "refused"          # claims the listener's id
            assert await dial(s, base + "/fake", "A", KEY) == "impostor"
        assert admitted == ["A", "A"]  # the real listener once, the impostor once
    finally:
        await runner.cleanup()
