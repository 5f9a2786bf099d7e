"""The node's aiohttp application: the dashboard with its live state socket, the chat socket, /api/swarm,
/api/topology, /health, /metrics (metrics.py) and the APIs: OpenAI's (openai_api.py), Anthropic's Messages
(anthropic_api.py) and OpenAI's Responses (responses_api.py), all over one validation layer (validation.py)
and one generation path (generation.py).

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
from web import anthropic_api, auth, metrics, openai_api, responses_api
from web.common import (MAX_BODY_BYTES, METER, METRICS, NODE, SWARM_CODES, error_body, error_response, generation,
                        model_id, prepare)
from web.generation import Deltas, Meter
from web.validation import RequestError, typed

__all__ = ["make_app", "dashboard_state"]

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
                       "max_batch": node.config.max_batch, "max_queue": node.config.max_queue, "login": bool(node.config.api_key)}
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


# --- /api, /health, /metrics ---------------------------------------------------------------------------

async def api_swarm(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].snapshot())


async def health(request: web.Request) -> web.Response:
    """200 while the swarm can serve (a plan ready, the model's source present), 503 otherwise."""
    node = request.app[NODE]
    ready = node.ready and node.source_present
    body = {"status": "ok" if ready else "unavailable", "ready": ready, "node": node.name, "model": model_id(node),
            "epoch": node.epoch, "plan_error": node.plan_error}
    return web.json_response(body, status=200 if ready else 503)


async def serve_metrics(request: web.Request) -> web.Response:
    return await metrics.serve(request, request.app[METRICS])


async def leave(request: web.Request) -> web.Response:
    """`cake-swarm down`: this node hands its part over to the others, then exits."""
    node = request.app[NODE]
    node.exit_requested.set()
    return web.json_response({"node": node.name, "leaving": True}, status=202)


async def get_topology(request: web.Request) -> web.Response:
    """The plan in force as topology YAML. ?format=cake: in cake's layout, which lists the workers only
    (cake's master, here the node holding the model, runs the layers no one names), with the layer
    prefix of the topology applied last; PUT back, it makes the same plan."""
    node, layout = request.app[NODE], request.query.get("format", "yaml")
    if layout not in ("yaml", "cake"):
        return error_response(400, f"unknown format {layout!r}: yaml (ours) or cake")
    snapshot = node.snapshot()
    if layout == "yaml" or node.plan is None:
        text = topology_yaml(node, snapshot)
    else:
        try:
            prefix = parse_topology(node.topology_text).layer_prefix if node.topology_text else None
        except TopologyError:
            prefix = None
        text = render_topology(node.plan, names={s["node_id"]: s["name"] for s in snapshot["plan"]},
                               hosts={n["id"]: f"{n['addr']}:{n['port']}" for n in snapshot["nodes"]},
                               cake=True, master=node.plan_meta.get("coordinator"), prefix=prefix)
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
    ws = await _open_socket(request, max_msg_size=1 << 20)
    incoming = asyncio.ensure_future(ws.receive())
    try:
        while (msg := await incoming).type == WSMsgType.TEXT:
            incoming = asyncio.ensure_future(ws.receive())  # watches for the close while we answer
            await _answer(ws, request, msg, incoming)
    except ConnectionResetError:
        pass
    finally:
        incoming.cancel()
    return ws


WS_CHAT_FIELDS = (openai_api.CHAT_FIELDS - {"stream", "stream_options", "logprobs", "top_logprobs", "return_token_ids"}
                  | {"prompt", "prompt_ids"})


def chat_socket_request(msg) -> tuple:
    """A chat socket message -> (Prompt, SamplingParams, the API's names); RequestError when it is wrong."""
    try:
        body = msg.json()
    except ValueError as e:
        raise RequestError(f"the message is not JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the message must be a JSON object", None, "invalid_json")
    prompt, params = openai_api.chat_request(body, WS_CHAT_FIELDS, needs_messages=False)
    if prompt.messages is not None:
        return prompt, params, {}
    if body.get("prompt_ids") is not None:
        prompt.ids = body["prompt_ids"]
        return prompt, params, {"prompt": "prompt_ids"}
    if body.get("prompt") is None:
        raise RequestError("send messages, prompt or prompt_ids", "messages", "missing_required_parameter")
    prompt.text = typed(body, "prompt", str)
    return prompt, params, {}


def error_frame(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"type": "error", "message": message, "status": status, **error_body(status, message, param, code)}


async def _answer(ws, request: web.Request, msg, incoming: asyncio.Future) -> None:
    node = request.app[NODE]
    try:
        prompt, params, names = chat_socket_request(msg)
        await node.wait_ready()
        job = prepare(node, prompt, params, names)
    except RequestError as e:
        return await ws.send_json(error_frame(e.status, str(e), e.param, e.code))
    except SwarmError as e:
        return await ws.send_json(error_frame(e.status, str(e), None, SWARM_CODES.get(e.status)))
    try:
        async with generation(request, job) as gen:
            answer = Deltas(job)
            async for choice, text, _ in gen:
                if _gone(incoming):
                    return  # the client went away: leaving the `async with` ends the session on every stage
                if (delta := answer.feed(choice, text)) is not None and delta.text:
                    await ws.send_json({"type": "token", "text": delta.text, "id": delta.choices[-1].token})
            if (last := answer.close()) is not None and last.text:
                await ws.send_json({"type": "token", "text": last.text, "id": last.choices[-1].token})
        done = {"type": "done", "finish_reason": answer.finish_reason(gen), "usage": gen.usage(),
                "timings": gen.timings.as_dict(), "token_ids": gen.token_ids}
        await ws.send_json({**done, "tool_calls": answer.calls} if answer.calls else done)
    except SwarmError as e:
        await ws.send_json(error_frame(e.status, str(e), None, SWARM_CODES.get(e.status)))


def _gone(incoming: asyncio.Future) -> bool:
    """Whether the chat socket's pending read says the client closed (a text frame is the next request)."""
    if not incoming.done():
        return False
    return incoming.cancelled() or incoming.exception() is not None or incoming.result().type != WSMsgType.TEXT


# --- the application -----------------------------------------------------------------------------------

def make_app(node) -> web.Application:
    def unauthorized(request: web.Request) -> web.Response:
        return error_response(401, "this node needs its API key: Authorization: Bearer KEY", "invalid_api_key")

    app_metrics = metrics.Metrics(node)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[auth.make_middleware(node, unauthorized),
                                                                metrics.middleware(app_metrics)])
    app[NODE] = node
    app[METER] = Meter()
    app[METRICS] = app_metrics
    app[SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(close_sockets)
    app.add_routes([
        web.get("/", dashboard), web.get("/login", login_form), web.post("/login", login), web.post("/logout", logout),
        web.static("/static", HERE / "static"),
        web.get("/api/swarm", api_swarm), web.post("/api/leave", leave), web.get("/api/topology", get_topology), web.put("/api/topology", put_topology),
        web.get("/ws/state", ws_state), web.get("/ws/chat", ws_chat),
        web.get("/health", health), web.get("/metrics", serve_metrics),
        web.get("/v1/models", openai_api.models), web.get("/v1/models/{model:.+}", openai_api.model),
        web.post("/v1/completions", openai_api.completions), web.post("/v1/chat/completions", openai_api.chat_completions),
        web.post("/v1/messages", anthropic_api.messages), web.post("/v1/responses", responses_api.responses),
    ])
    return app
