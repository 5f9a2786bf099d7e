"""The node's aiohttp application: peer websocket, shard routes, state API and the chat socket."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from swarm.model.sampling import SamplingParams
from swarm.pipeline import SwarmError

log = logging.getLogger("swarm.web")

NODE = web.AppKey("node", object)


def sampling_params(body: dict, default_max_tokens: int = 256) -> SamplingParams:
    """Request fields (OpenAI's names) -> SamplingParams; ValueError on bad values."""
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens")) or default_max_tokens
    params = SamplingParams(temperature=float(body.get("temperature", 0.0) or 0.0), top_p=float(body.get("top_p", 1.0) or 1.0),
                            top_k=int(body.get("top_k", 0) or 0), min_p=float(body.get("min_p", 0.0) or 0.0),
                            repetition_penalty=float(body.get("repetition_penalty", 1.0) or 1.0),
                            seed=None if body.get("seed") is None else int(body["seed"]),
                            max_tokens=int(max_tokens), stop=stop)
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.max_tokens < 1 or params.top_k < 0:
        raise ValueError("temperature >= 0, 0 < top_p <= 1, top_k >= 0 and max_tokens >= 1 are required")
    return params


def encode_prompt(node, body: dict) -> list[int]:
    """The prompt's token ids from "messages" (chat template), "prompt" (text) or "prompt_ids"."""
    if "prompt_ids" in body:
        ids = [int(t) for t in body["prompt_ids"]]
        if not ids:
            raise ValueError("prompt_ids is empty")
        return ids
    if node.tokenizer is None:
        raise ValueError("this model has no tokenizer: send prompt_ids")
    if "messages" in body:
        return node.tokenizer.encode_chat(body["messages"])
    return node.tokenizer.encode(str(body["prompt"]))


async def api_swarm(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].snapshot())


async def ws_chat(request: web.Request) -> web.WebSocketResponse:
    """One chat per message: {"messages", "max_tokens", ...} -> token frames, then done or error."""
    node = request.app[NODE]
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1 << 20)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            break
        try:
            body = msg.json()
            params = sampling_params(body)
            await node.wait_ready()
            prompt = encode_prompt(node, body)
        except SwarmError as e:
            await ws.send_json({"type": "error", "message": str(e)})
            continue
        except (ValueError, KeyError, TypeError) as e:
            await ws.send_json({"type": "error", "message": f"bad request: {e}"})
            continue
        reader = asyncio.ensure_future(ws.receive())  # a close while generating cancels the generation
        try:
            usage, reason, ids = {"prompt_tokens": len(prompt), "completion_tokens": 0}, None, []
            async for token, text, reason in node.generate(prompt, params):
                usage["completion_tokens"] += 1
                ids.append(token)
                if text:
                    await ws.send_json({"type": "token", "text": text, "id": token})
                if reader.done():
                    raise ConnectionResetError("client went away")
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            await ws.send_json({"type": "done", "finish_reason": reason or "length", "usage": usage, "token_ids": ids,
                                "timings": node.stats.get("last_timings", {})})
        except SwarmError as e:
            await ws.send_json({"type": "error", "message": str(e)})
        except (ConnectionResetError, RuntimeError):
            break
        finally:
            if not reader.done():
                reader.cancel()
        if reader.done() and not reader.cancelled():
            break
    return ws


def make_app(node) -> web.Application:
    app = web.Application(client_max_size=4 << 20)
    app[NODE] = node
    app.add_routes([web.get("/peer", node.members.accept), *node.shard_server.routes(),
                    web.get("/api/swarm", api_swarm), web.get("/ws/chat", ws_chat)])
    return app
