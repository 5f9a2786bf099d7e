"""`--api-key`: who may use this node's API, sockets and dashboard.

With a key set, a request needs `Authorization: Bearer KEY` (or `x-api-key: KEY`, as Anthropic's clients
send it), the dashboard cookie (set by the /login form or by opening any page with ?key=KEY once), or
?key=KEY itself (handy for websockets). The peer socket and the shard routes stay open here: they check
the cluster key on their own; /health tells load balancers whether to send requests here, and no more. The cookie holds
an HMAC of the key, not the key, and is SameSite=Strict, so other sites cannot ride on it.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web
from yarl import URL

OPEN_PREFIXES = ("/peer", "/shards/", "/static/", "/login", "/health")
COOKIE_DAYS = 30


def cookie_name(node) -> str:
    # nodes on one host share the browser's cookie jar: one cookie per port
    return f"cake_swarm_{node.config.port}"


def cookie_value(key: str) -> str:
    return hmac.new(key.encode(), b"cake-swarm dashboard", hashlib.sha256).hexdigest()


def authorized(request: web.Request, key: str, cookie: str) -> bool:
    given = request.headers.get("Authorization", "")
    return (hmac.compare_digest(given.encode(), f"Bearer {key}".encode())
            or hmac.compare_digest(request.headers.get("x-api-key", "").encode(), key.encode())
            or hmac.compare_digest(request.query.get("key", "").encode(), key.encode())
            or hmac.compare_digest(request.cookies.get(cookie, "").encode(), cookie_value(key).encode()))


def set_login_cookie(response: web.StreamResponse, node) -> None:
    response.set_cookie(cookie_name(node), cookie_value(node.config.api_key), max_age=COOKIE_DAYS * 86400,
                        httponly=True, samesite="Strict", path="/")


def safe_next(target: str | None) -> str:
    """Only a path on this node: never an open redirect to another site."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


def make_middleware(node, unauthorized):
    """The middleware; unauthorized(request) is the answer for an API client without the key."""

    @web.middleware
    async def require_api_key(request: web.Request, handler):
        key = node.config.api_key
        if not key or request.path.startswith(OPEN_PREFIXES):
            return await handler(request)
        if authorized(request, key, cookie_name(node)):
            if "key" in request.query and request.method == "GET" and request.path == "/":
                # trade the key in the address bar for the cookie, and drop it from the address
                response = web.HTTPFound(request.rel_url.without_query_params("key"))
                set_login_cookie(response, node)
                raise response
            return await handler(request)
        if request.method == "GET" and request.path == "/":
            raise web.HTTPFound(URL("/login").with_query(next=str(request.rel_url)))
        return unauthorized(request)

    return require_api_key
