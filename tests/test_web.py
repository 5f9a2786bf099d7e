"""The web side of a two-node demo swarm started with --api-key: who gets in, the chat socket, the
dashboard's live state socket, and /api/topology (read, refuse with line numbers, apply through any node).

The second node pulls its shard from the first while both have an API key: the peer and shard routes
answer to the cluster key only."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import yaml

from tests.swarm_harness import demo_pair, own_sessions, ready_swarm, wait_idle, wait_ready

KEY = "web-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with ready_swarm(demo_pair(tmp_path_factory.mktemp("web-swarm"), api_key=KEY), nodes=2) as daemons:
        yield daemons




async def test_the_api_key_guards_api_sockets_and_dashboard_but_not_peers(swarm):
    a, b = swarm
    assert b.state()["nodes"][0]["downloads"]["3-5"]["done"] > 0  # b pulled its shard through a's shard routes
    async with aiohttp.ClientSession() as http:
        for path in ("/api/swarm", "/api/topology", "/v1/models"):
            async with http.get(a.url + path) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key", path
            async with http.get(a.url + path, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401, path
            async with http.get(a.url + path, headers=AUTH) as r:
                assert r.status == 200, path
        for path in ("/ws/chat", "/ws/state"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(a.url + path)
            assert e.value.status == 401
        async with http.post(a.url + "/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 401
        async with http.get(a.url + "/", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"].startswith("/login?next=/")
        async with http.get(f"{a.url}/peer-port") as r:  # peers and shards: the cluster key's business, on that port
            assert r.status == 200 and (await r.json())["peer_port"] > 0
        async with http.get(a.url + "/static/dashboard.js") as r:
            assert r.status == 200


async def test_login_form_and_key_in_the_address_set_a_cookie(swarm):
    a, _ = swarm
    jar = lambda: aiohttp.CookieJar(unsafe=True)  # noqa: E731 - keeps cookies of an IP address
    async with aiohttp.ClientSession(cookie_jar=jar()) as http:
        async with http.get(a.url + "/login") as r:
            assert r.status == 200 and 'name="key"' in await r.text()
        async with http.post(a.url + "/login", data={"key": "wrong", "next": "/"}, allow_redirects=False) as r:
            assert r.status == 401 and "not this node" in await r.text()
        async with http.post(a.url + "/login", data={"key": KEY, "next": "//evil.example/"}, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/"  # never off this node
        async with http.get(a.url + "/api/swarm") as r:  # the cookie now opens everything
            assert r.status == 200
        async with http.ws_connect(a.url + "/ws/state") as ws:
            assert (await ws.receive_json(timeout=10))["node"]["name"] == "a"
    async with aiohttp.ClientSession(cookie_jar=jar()) as http:
        async with http.get(f"{a.url}/?key={KEY}", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/"  # the key leaves the address bar
        async with http.get(a.url + "/") as r:
            page = await r.text()
            assert r.status == 200 and 'name="viewport"' in page
        async with http.post(a.url + "/logout", allow_redirects=False) as r:
            assert r.status == 302
        async with http.get(a.url + "/api/swarm") as r:
            assert r.status == 401


async def test_dashboard_page_carries_the_state(swarm):
    _, b = swarm
    async with aiohttp.ClientSession(headers=AUTH) as http, http.get(b.url + "/") as r:
        page = await r.text()
    start = page.index('<script id="initial-state" type="application/json">') + len('<script id="initial-state" type="application/json">')
    state = json.loads(page[start:page.index("</script>", start)])
    assert sorted(n["name"] for n in state["nodes"]) == ["a", "b"]
    assert [s["name"] for s in state["plan"]] == ["a", "b"]
    assert state["cluster"]["open"] is True and state["web"]["login"] is True
    assert "model.layers.0-2" in state["web"]["topology"]


async def _chat(ws, body: dict) -> dict:
    await ws.send_json(body)
    text, ids = "", []
    while True:
        frame = await ws.receive_json(timeout=60)
        if frame["type"] != "token":
            return {"text": text, "ids": ids, **frame}
        text += frame["text"]
        ids.append(frame["id"])


async def test_ws_chat_streams_tokens_then_done_and_survives_a_bad_request(swarm):
    a, b = swarm
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(a.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 24}) as r:
            expected = (await r.json())["choices"][0]["text"]
        async with http.ws_connect(b.url + "/ws/chat") as ws:
            bad = await _chat(ws, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3})
            assert bad["type"] == "error" and bad["status"] == 400 and "max_tokens" in bad["message"]
            done = await _chat(ws, {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 24})
            assert done["type"] == "done" and done["text"] == expected
            assert done["finish_reason"] == "length" and done["token_ids"][:len(done["ids"])] == done["ids"]
            assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29}
            assert done["timings"]["generated_tokens"] == 24 and done["timings"]["ttft_s"] > 0
            too_long = await _chat(ws, {"prompt": "story " * 5000})
            assert too_long["type"] == "error" and too_long["status"] == 400


async def test_closing_the_chat_socket_mid_answer_frees_every_stage(swarm):
    a, b = swarm
    async with aiohttp.ClientSession(headers=AUTH) as http:
        ws = await http.ws_connect(a.url + "/ws/chat")
        await ws.send_json({"prompt": "Once upon a time", "max_tokens": 400})
        for _ in range(3):
            assert (await ws.receive_json(timeout=60))["type"] == "token"
        assert own_sessions(a) == {"requests": 1, "stage_sessions": 1} and own_sessions(b)["stage_sessions"] == 1
        await ws.close()
    await asyncio.to_thread(wait_idle, swarm)


async def test_state_socket_pushes_a_snapshot_then_each_change(swarm):
    a, b = swarm
    async with aiohttp.ClientSession(headers=AUTH) as http, http.ws_connect(b.url + "/ws/state") as ws:
        first = await ws.receive_json(timeout=10)
        assert {n["name"] for n in first["nodes"]} == {"a", "b"} and first["ready"]
        assert set(first["web"]) >= {"model", "topology", "live", "max_batch", "max_queue"}
        before = first["stats"]["requests"]
        async with http.post(b.url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 16}) as r:
            assert r.status == 200
        while True:  # no request from us: the server pushes when the node's state changes (the request's
            state = await ws.receive_json(timeout=20)  # start, then its end with its timings)
            if state["stats"]["requests"] == before + 1 and state["stats"]["last_timings"]["generated_tokens"] == 16:
                break


async def test_topology_read_refused_with_lines_and_applied_through_any_node(swarm):
    a, b = swarm
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(b.url + "/api/topology") as r:
            assert r.status == 200
            current = yaml.safe_load(await r.text())
        assert current["nodes"]["a"]["layers"] == ["model.layers.0-2"]
        assert current["nodes"]["b"] == {"host": b.url.removeprefix("http://"), "layers": ["model.layers.3-4"]}

        async with http.put(b.url + "/api/topology", data="nodes: [a, b") as r:
            body = await r.json()
            assert r.status == 400 and body["errors"] and body["errors"][0]["line"] >= 1
        overlapping = "nodes:\n  a:\n    layers: [model.layers.0-3]\n  b:\n    layers: [model.layers.3-4]\n"
        async with http.put(b.url + "/api/topology", data=overlapping) as r:
            body = await r.json()
            assert r.status == 422 and any(e["line"] == 5 and "twice" in e["message"] for e in body["errors"]), body
        stranger = "nodes:\n  a:\n    layers: [model.layers.0-2]\n  c:\n    layers: [model.layers.3-4]\n"
        async with http.put(a.url + "/api/topology", data=stranger) as r:
            body = await r.json()
            assert r.status == 422 and any(e["line"] == 4 for e in body["errors"]), body
        epoch = a.state()["epoch"]
        assert epoch == b.state()["epoch"]  # refused edits changed nothing

        moved = "nodes:\n  a:\n    layers: [model.layers.0-1]\n  b:\n    layers: [model.layers.2-4]\n"
        async with http.put(b.url + "/api/topology", data=moved) as r:  # b is no coordinator: it passes it on
            body = await r.json()
            assert r.status == 200 and body["epoch"] > epoch, body
        states = await asyncio.to_thread(wait_ready, swarm, 60.0, 2)
        assert [(s["name"], s["start"], s["end"]) for s in states[1]["plan"]] == [("a", 0, 2), ("b", 2, 5)]
        async with http.get(a.url + "/api/topology") as r:
            assert yaml.safe_load(await r.text())["nodes"]["b"]["layers"] == ["model.layers.2-4"]


async def test_health_is_open_and_metrics_count_what_was_served(swarm):
    a, b = swarm
    async with aiohttp.ClientSession() as http:
        async with http.get(b.url + "/health") as r:  # no key: load balancers ask this
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(b.url + "/metrics") as r:
            assert r.status == 401
        async with http.get(b.url + "/v1/models", headers={"x-api-key": KEY}) as r:  # Anthropic's clients' header
            assert r.status == 200
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async def scrape() -> dict[str, float]:
            async with http.get(b.url + "/metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                        for line in (await r.text()).splitlines() if line and not line.startswith("#")}
        before = await scrape()
        async with http.post(b.url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 9}) as r:
            assert r.status == 200
        async with http.post(b.url + "/v1/completions", json={"prompt": "The cat", "max_tokens": 0}) as r:
            assert r.status == 400
        after = await scrape()
    served = 'cake_swarm_api_requests_total{route="/v1/completions",status="200"}'
    refused = 'cake_swarm_api_requests_total{route="/v1/completions",status="400"}'
    assert after[served] == before.get(served, 0) + 1 and after[refused] == before.get(refused, 0) + 1
    assert after["cake_swarm_generated_tokens_total"] == before["cake_swarm_generated_tokens_total"] + 9
    assert after["cake_swarm_time_to_first_token_seconds_count"] == before["cake_swarm_time_to_first_token_seconds_count"] + 1
    assert after["cake_swarm_time_per_output_token_seconds_count"] == before["cake_swarm_time_per_output_token_seconds_count"] + 8
    assert after["cake_swarm_swarm_ready"] == 1 and after["cake_swarm_requests_waiting"] == 0
    layers = {k.split('name="')[1].split('"')[0]: v for k, v in after.items() if k.startswith("cake_swarm_node_layers")}
    (own,) = [s["end"] - s["start"] for s in b.state()["plan"] if s["name"] == "b"]
    assert set(layers) == {"a", "b"} and layers["b"] == own  # (a's figure is as old as its last heartbeat)
    assert sum(v for k, v in after.items() if k.startswith("cake_swarm_node_state") and 'state="loaded"' in k) == 2


async def test_a_stopping_node_closes_its_dashboards_and_chats_and_exits_cleanly(swarm):
    a, b = swarm
    async with aiohttp.ClientSession(headers=AUTH) as http:
        state = await http.ws_connect(b.url + "/ws/state")
        chat = await http.ws_connect(b.url + "/ws/chat")
        await chat.send_json({"prompt": "Once upon a time", "max_tokens": 400})
        assert (await chat.receive_json(timeout=60))["type"] == "token"

        async def until_closed(ws):
            while not ws.closed:  # reading answers the server's close
                await ws.receive(timeout=20)
            return ws.close_code
        # SIGTERM; killed (a non-zero code) if it does not exit within 10 s
        code, *closes = await asyncio.gather(asyncio.to_thread(b.stop), until_closed(state), until_closed(chat))
        assert code == 0, b.log()[-2000:]
        assert closes == [aiohttp.WSCloseCode.GOING_AWAY] * 2

