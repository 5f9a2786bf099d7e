"""Cluster-key authentication: cluster ids, signed HTTP requests, peer challenge-response.

A swarm with no key (key None) is open: every check passes. With a key, HTTP requests (shards, peer
websocket upgrade) carry an HMAC-SHA256 over method, path, time and a nonce, and the peer websocket runs a
mutual challenge-response: each side sends 32 random bytes and the other answers
HMAC-SHA256(key, "cake-swarm-peer" | node_id | challenge). The node id inside the MAC stops a peer from
reflecting a challenge back at its sender; callers must also refuse a peer that claims their own id.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from typing import Mapping

TIME_HEADER = "X-Cake-Time"
NONCE_HEADER = "X-Cake-Nonce"
AUTH_HEADER = "X-Cake-Auth"
MAX_SKEW_S = 300
CHALLENGE_BYTES = 32


def cluster_id(key: str | None) -> str:
    """Public name of a cluster: first 16 hex of sha256("cake-swarm:" + key), or "open" without a key."""
    if key is None:
        return "open"
    return hashlib.sha256(("cake-swarm:" + key).encode()).hexdigest()[:16]


def _mac(key: str, *parts: bytes) -> bytes:
    return hmac.new(key.encode(), b"|".join(parts), hashlib.sha256).digest()


def _request_mac(key: str, method: str, path: str, ts: str, nonce: str) -> str:
    return _mac(key, method.upper().encode(), path.encode(), ts.encode(), nonce.encode()).hex()


def sign_request(key: str | None, method: str, path: str) -> dict[str, str]:
    """Headers that authenticate one HTTP request; {} for an open swarm.

    `path` is the request path with its query string, exactly as the server will see it
    (aiohttp: `request.path_qs`)."""
    if key is None:
        return {}
    ts = str(int(time.time()))
    nonce = secrets.token_hex(16)
    return {TIME_HEADER: ts, NONCE_HEADER: nonce, AUTH_HEADER: _request_mac(key, method, path, ts, nonce)}


def verify_request(key: str | None, method: str, path: str, headers: Mapping[str, str],
                   now: float | None = None) -> bool:
    """True when `headers` carry a valid signature for (method, path) within MAX_SKEW_S of now.

    Always True for an open swarm (key None). Header names are matched case-insensitively."""
    if key is None:
        return True
    h = {str(k).lower(): v for k, v in headers.items()}
    ts, nonce, mac = (h.get(n.lower()) for n in (TIME_HEADER, NONCE_HEADER, AUTH_HEADER))
    if not (isinstance(ts, str) and isinstance(nonce, str) and isinstance(mac, str)):
        return False
    if not ts.isdigit() or len(ts) > 12 or not 0 < len(nonce) <= 64:
        return False
    now = time.time() if now is None else now
    if abs(now - int(ts)) > MAX_SKEW_S:
        return False
    try:
        expected = _request_mac(key, method, path, ts, nonce)
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected.encode(), mac.encode("utf-8", "replace"))


def new_challenge() -> bytes:
    """32 random bytes for the other side to answer."""
    return os.urandom(CHALLENGE_BYTES)


def respond(key: str | None, challenge: bytes, node_id: str) -> bytes:
    """The answer of node `node_id` to `challenge`; b"" for an open swarm."""
    if key is None:
        return b""
    return _mac(key, b"cake-swarm-peer", node_id.encode(), bytes(challenge))


def check(key: str | None, challenge: bytes, node_id: str, response: bytes) -> bool:
    """True when `response` is node `node_id`'s answer to the `challenge` we sent (always True when open)."""
    if key is None:
        return True
    if not isinstance(response, (bytes, bytearray)) or len(challenge) != CHALLENGE_BYTES:
        return False
    return hmac.compare_digest(respond(key, challenge, node_id), bytes(response))
