"""Cluster-key authentication: cluster ids, signed HTTP requests, peer challenge-response.

A swarm with no key (key None) is open: every check passes. With a key, every MAC also covers the
fingerprint of the listener's TLS certificate (swarm.tls) as the signer saw it on its connection, so a
man in the middle that relays with a certificate of its own makes every MAC fail.

- HTTP requests to a peer's listener (shards, side files) carry an HMAC-SHA256 over method, path, time,
  a nonce and the fingerprint. The listener refuses a nonce it accepted before (Nonces), and a time more
  than MAX_SKEW_S from its clock with a Refusal that says by how much the clocks differ.
- The peer websocket runs a mutual challenge-response: each side sends 32 random bytes and the other
  answers HMAC-SHA256(key, "cake-swarm-peer" | node_id | challenge | fingerprint). The node id inside the
  MAC stops a peer from reflecting a challenge back at its sender; callers must also refuse a peer that
  claims their own id.
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from typing import Mapping

TIME_HEADER = "X-Cake-Time"
NONCE_HEADER = "X-Cake-Nonce"
AUTH_HEADER = "X-Cake-Auth"
SKEW_HEADER = "X-Cake-Skew"     # on a refusal for the time: request time - listener time, in seconds
MAX_SKEW_S = 300
CHALLENGE_BYTES = 32


def cluster_id(key: str | None) -> str:
    """Public name of a cluster: first 16 hex of sha256("cake-swarm:" + key), or "open" without a key."""
    if key is None:
        return "open"
    return hashlib.sha256(("cake-swarm:" + key).encode()).hexdigest()[:16]


def _mac(key: str, *parts: bytes) -> bytes:
    return hmac.new(key.encode(), b"|".join(parts), hashlib.sha256).digest()


def _request_mac(key: str, method: str, path: str, ts: str, nonce: str, fingerprint: str) -> str:
    return _mac(key, method.upper().encode(), path.encode(), ts.encode(), nonce.encode(), fingerprint.encode()).hex()


def sign_request(key: str | None, method: str, path: str, fingerprint: str) -> dict[str, str]:
    """Headers that authenticate one HTTP request to the listener showing certificate `fingerprint`; {} for
    an open swarm.

    `path` is the request path with its query string, exactly as the server will see it
    (aiohttp: `request.path_qs`)."""
    if key is None:
        return {}
    ts = str(int(time.time()))
    nonce = secrets.token_hex(16)
    return {TIME_HEADER: ts, NONCE_HEADER: nonce, AUTH_HEADER: _request_mac(key, method, path, ts, nonce, fingerprint)}


class Nonces:
    """The nonces of accepted requests, each kept while its time is inside the window: a second use is a replay."""

    def __init__(self):
        self._until: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []   # a heap of (until, nonce)

    def first_use(self, nonce: str, ts: float, now: float) -> bool:
        """Record a nonce signed at time ts; False when it was recorded before (a replay)."""
        while self._expiry and self._expiry[0][0] < now:
            self._until.pop(heapq.heappop(self._expiry)[1], None)
        if nonce in self._until:
            return False
        self._until[nonce] = ts + MAX_SKEW_S   # after that the time check refuses it anyway
        heapq.heappush(self._expiry, (ts + MAX_SKEW_S, nonce))
        return True

    def __len__(self) -> int:
        return len(self._until)


@dataclass(frozen=True)
class Refusal:
    """Why a signed request is refused; skew_s (request time - our time) when the clocks are the reason."""
    reason: str
    skew_s: int | None = None


def skew_words(skew_s: int) -> str:
    return f"{abs(skew_s)} s {'ahead of' if skew_s > 0 else 'behind'}"


def verify_request(key: str | None, method: str, path: str, headers: Mapping[str, str], fingerprint: str | None,
                   nonces: Nonces | None = None, now: float | None = None) -> Refusal | None:
    """None when `headers` sign (method, path) for the certificate `fingerprint` within MAX_SKEW_S of now,
    with a nonce not used before (when `nonces` is given); else a Refusal saying why.

    Always None for an open swarm (key None). Header names are matched case-insensitively. The MAC is
    checked first, so only a holder of the key hears about clocks and replays."""
    if key is None:
        return None
    unsigned = Refusal("not signed with this swarm's cluster key for this node's certificate")
    if not fingerprint:
        return Refusal("signed requests are only taken over TLS")
    h = {str(k).lower(): v for k, v in headers.items()}
    ts, nonce, mac = (h.get(n.lower()) for n in (TIME_HEADER, NONCE_HEADER, AUTH_HEADER))
    if not (isinstance(ts, str) and isinstance(nonce, str) and isinstance(mac, str)):
        return unsigned
    if not ts.isdigit() or len(ts) > 12 or not 0 < len(nonce) <= 64:
        return unsigned
    try:
        expected = _request_mac(key, method, path, ts, nonce, fingerprint)
    except UnicodeEncodeError:
        return unsigned
    if not hmac.compare_digest(expected.encode(), mac.encode("utf-8", "replace")):
        return unsigned
    now = time.time() if now is None else now
    skew = int(ts) - now
    if abs(skew) > MAX_SKEW_S:
        return Refusal(f"the request's clock is {skew_words(round(skew))} this node's; signatures are good for "
                       f"{MAX_SKEW_S} s: set both clocks (NTP)", round(skew))
    if nonces is not None and not nonces.first_use(nonce, int(ts), now):
        return Refusal("a replayed request: its nonce was used before")
    return None


def new_challenge() -> bytes:
    """32 random bytes for the other side to answer."""
    return os.urandom(CHALLENGE_BYTES)


def respond(key: str | None, challenge: bytes, node_id: str, fingerprint: str) -> bytes:
    """The answer of node `node_id` to `challenge` on a link whose listener showed certificate
    `fingerprint`; b"" for an open swarm."""
    if key is None:
        return b""
    return _mac(key, b"cake-swarm-peer", node_id.encode(), bytes(challenge), fingerprint.encode())


def check(key: str | None, challenge: bytes, node_id: str, response: bytes, fingerprint: str) -> bool:
    """True when `response` is node `node_id`'s answer to the `challenge` we sent, on a link whose listener
    showed us certificate `fingerprint` (always True when open)."""
    if key is None:
        return True
    if not isinstance(response, (bytes, bytearray)) or len(challenge) != CHALLENGE_BYTES:
        return False
    return hmac.compare_digest(respond(key, challenge, node_id, fingerprint), bytes(response))
