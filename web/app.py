"""The node's aiohttp application: the swarm's own routes (peer socket, shards), the dashboard with its
live state socket, the chat socket, /api/swarm, /api/topology and the OpenAI endpoints (openai_api.py).

The dashboard renders the same snapshot the node decides from (node.snapshot()), plus what only this
web layer knows: the live token rate, the model's id, the plan as topology YAML. It is pushed over
/ws/state whenever the node says its state changed, and twice a second while tokens flow.
"""

from __future__ import annotations

import asyncio
import hmac
import weakref
from pathlib import Path

import aiohttp
import jinja2
from aiohttp import WSCloseCode, WSMsgType, web

from swarm.pipeline import SwarmError
from topology import TopologyError, parse as parse_topology, render as render_topology
from web import auth, openai_api
from web.common import METER, NODE, encode_prompt, error_response, model_id, sampling_params
from web.generation import Generation, Meter

__all__ = ["make_app", "sampling_params", "encode_prompt", "dashboard_state"]

HERE = Path(__file__).parent
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
PUSH_GAP_S = 0.2     # bursts of changes (download progress) coalesce into one push
LIVE_PUSH_S = 0.5    # how often the dashboard hears while tokens flow
FORWARDED = "X-Cake-Swarm-Forwarded"

templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)


def page(name: str, status: int = 200, **context) -> web.Response:
    return web.Response(text=templates.get_template(name).render(**context), status=status, content_type="text/html")


# --- state ---------------------------------------------------------------------------------------------

def topology_yaml(node, snapshot: dict) -> str:
    """The plan in force as topology YAML, with node names and addresses ("" before the first plan)."""
    if node.plan is None:
        return ""
    names = {s["node_id"]: s["name"] for s in snapshot["plan"]}
    hosts = {n["id"]: f"{n['addr']}:{n['port']}" for n in snapshot["nodes"]}
    return render_topology(node.plan, names=names, hosts=hosts)


def dashboard_state(node, meter: Meter) -> dict:
    snapshot = node.snapshot()
    snapshot["web"] = {"model": model_id(node), "topology": topology_yaml(node, snapshot), "live": meter.as_dict(),
                       "max_sessions": node.config.max_sessions, "login": bool(node.config.api_key)}
    return snapshot


# --- pages ---------------------------------------------------------------------------------------------

async def dashboard(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return page("dashboard.html", state=dashboard_state(node, request.app[METER]), node=node)


async def login_form(request: web.Request) -> web.Response:
    return page("login.html", next=auth.safe_next(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.Response:
    node, form = request.app[NODE], await request.post()
    target = auth.safe_next(str(form.get("next", "/")))
    if not node.config.api_key or not hmac.compare_digest(str(form.get("key", "")).encode(), node.config.api_key.encode()):
        return page("login.html", status=401, next=target, error="That is not this node's API key.")
    response = web.HTTPFound(target)
    auth.set_login_cookie(response, node)
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPFound("/login")
    response.del_cookie(auth.cookie_name(request.app[NODE]), path="/")
    raise response


# --- /api ----------------------------------------------------------------------------------------------

async def api_swarm(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].snapshot())


async def get_topology(request: web.Request) -> web.Response:
    node = request.app[NODE]
    text = topology_yaml(node, node.snapshot())
    if not text:
        return error_response(404, f"no plan yet{': ' + node.plan_error if node.plan_error else ''}")
    return web.Response(text=text, content_type="application/yaml")


def topology_errors(status: int, e: TopologyError) -> web.Response:
    body = {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": "invalid_topology"},
            "errors": [{"line": i.line, "message": i.message} for i in e.errors]}
    return web.json_response(body, status=status)


async def put_topology(request: web.Request) -> web.Response:
    """Apply a manual placement: 400 when the YAML does not parse, 422 when it does not fit this swarm."""
    node = request.app[NODE]
    text = await request.text()
    try:
        parse_topology(text, "<request>")
    except TopologyError as e:
        return topology_errors(400, e)
    if not node.is_coordinator and FORWARDED not in request.headers:
        forwarded = await forward_to_coordinator(node, text)
        if forwarded is not None:
            return forwarded
    try:
        await node.apply_topology(text)
    except TopologyError as e:
        return topology_errors(422, e)
    except SwarmError as e:
        return error_response(e.status, str(e))
    except ValueError as e:  # a placement that does not fit
        return error_response(422, str(e), "invalid_topology")
    snapshot = node.snapshot()
    return web.json_response({"epoch": node.epoch, "plan": snapshot["plan"], "yaml": topology_yaml(node, snapshot)})


async def forward_to_coordinator(node, text: str) -> web.Response | None:
    """Only the coordinator applies a topology; any node's dashboard may send one, so pass it on."""
    coordinator = node.plan_meta.get("coordinator")
    peer = next((n for n in node.snapshot()["nodes"] if n["id"] == coordinator), None)
    if peer is None or coordinator == node.id:
        return None
    headers = {FORWARDED: node.id, "Content-Type": "application/yaml"}
    if node.config.api_key:
        headers["Authorization"] = f"Bearer {node.config.api_key}"
    url = f"http://{peer['addr']}:{peer['port']}/api/topology"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
                http.put(url, data=text.encode(), headers=headers) as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return error_response(502, f"the coordinator ({peer['name']}) did not answer: {e}")


# --- sockets -------------------------------------------------------------------------------------------

async def _open_socket(request: web.Request, max_msg_size: int) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=max_msg_size)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    return ws


async def close_sockets(app: web.Application) -> None:
    """On shutdown: open dashboards and chats would otherwise hold the node's exit for half a minute."""
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"node shutting down")
                           for ws in list(app[SOCKETS])), return_exceptions=True)


async def ws_state(request: web.Request) -> web.WebSocketResponse:
    """The dashboard's live feed: a snapshot now, then one after each change of the node's state."""
    node, meter = request.app[NODE], request.app[METER]
    ws = await _open_socket(request, max_msg_size=1 << 16)
    wake: asyncio.Queue = asyncio.Queue()
    node.listeners.add(wake)
    closed = asyncio.ensure_future(_until_closed(ws))
    try:
        while not closed.done():
            state = dashboard_state(node, meter)
            await ws.send_json(state)
            await asyncio.sleep(PUSH_GAP_S)
            flowing = meter.flowing() or any(n.get("sessions") for n in state["nodes"])
            woken = asyncio.ensure_future(wake.get())
            await asyncio.wait({woken, closed}, timeout=LIVE_PUSH_S if flowing else None,
                               return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
    except ConnectionResetError:
        pass
    finally:
        node.listeners.discard(wake)
        closed.cancel()
    return ws


async def _until_closed(ws: web.WebSocketResponse) -> None:
    async for _ in ws:  # the dashboard sends nothing; this returns when it goes
        pass


async def ws_chat(request: web.Request) -> web.WebSocketResponse:
    """One answer per message {"messages"|"prompt"|"prompt_ids", "max_tokens", ...}: token frames, then
    done or error. Messages sent while an answer streams wait their turn; a close cancels the answer."""
    node, meter = request.app[NODE], request.app[METER]
    ws = await _open_socket(request, max_msg_size=1 << 20)
    incoming = asyncio.ensure_future(ws.receive())
    try:
        while (msg := await incoming).type == WSMsgType.TEXT:
            incoming = asyncio.ensure_future(ws.receive())  # watches for the close while we answer
            await _answer(ws, node, meter, msg, incoming)
    except ConnectionResetError:
        pass
    finally:
        incoming.cancel()
    return ws


async def _answer(ws, node, meter: Meter, msg, incoming: asyncio.Future) -> None:
    try:
        body = msg.json()
        params = sampling_params(body)
        await node.wait_ready()
        prompt = encode_prompt(node, body)
    except SwarmError as e:
        return await ws.send_json({"type": "error", "message": str(e), "status": e.status})
    except (ValueError, KeyError, TypeError) as e:
        return await ws.send_json({"type": "error", "message": f"bad request: {e}", "status": 400})
    try:
        async with Generation(node, meter, prompt, params) as gen:
            async for token, text, _ in gen:
                if _gone(incoming):
                    return  # the client went away: leaving the `async with` ends the session on every stage
                if text:
                    await ws.send_json({"type": "token", "text": text, "id": token})
        await ws.send_json({"type": "done", "finish_reason": gen.finish_reason or "length", "usage": gen.usage(),
                            "timings": gen.timings.as_dict(), "token_ids": gen.token_ids})
    except SwarmError as e:
        await ws.send_json({"type": "error", "message": str(e), "status": e.status})


def _gone(incoming: asyncio.Future) -> bool:
    """Whether the chat socket's pending read says the client closed (a text frame is the next request)."""
    if not incoming.done():
        return False
    return incoming.cancelled() or incoming.exception() is not None or incoming.result().type != WSMsgType.TEXT


# --- the application -----------------------------------------------------------------------------------

def make_app(node) -> web.Application:
    def unauthorized(request: web.Request) -> web.Response:
        return error_response(401, "this node needs its API key: Authorization: Bearer KEY", "invalid_api_key")

    app = web.Application(client_max_size=4 << 20, middlewares=[auth.make_middleware(node, unauthorized)])
    app[NODE] = node
    app[METER] = Meter()
    app[SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(close_sockets)
    app.add_routes([
        web.get("/peer", node.members.accept), *node.shard_server.routes(),
        web.get("/", dashboard), web.get("/login", login_form), web.post("/login", login), web.post("/logout", logout),
        web.static("/static", HERE / "static"),
        web.get("/api/swarm", api_swarm), web.get("/api/topology", get_topology), web.put("/api/topology", put_topology),
        web.get("/ws/state", ws_state), web.get("/ws/chat", ws_chat),
        web.get("/v1/models", openai_api.models), web.post("/v1/completions", openai_api.completions),
        web.post("/v1/chat/completions", openai_api.chat_completions),
    ])
    return app
