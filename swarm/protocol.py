"""Peer protocol: CBOR frames on aiohttp websockets, their schemas, and tensor encoding.

Every websocket message between peers is one binary frame holding a CBOR map {"t": type, ...}.
decode_frame is the only way in: it refuses oversized frames before touching them, walks the CBOR
structure before cbor2 builds anything (no tags, no indefinite lengths, map keys are text, every declared
length fits in the bytes actually received, bounded nesting), then checks the frame against the schema of
its type. Whatever a peer sends, the only exception that leaves decode_frame is ProtocolError.
"""
from __future__ import annotations

import math

import cbor2
import mlx.core as mx
import numpy as np
from aiohttp import WSCloseCode, WSMsgType

MAX_FRAME_BYTES = 64 * 1024 * 1024  # also pass as max_msg_size to aiohttp websockets
MAX_DEPTH = 16
MAX_TENSOR_DIMS = 8

WIRE_DTYPES = {"float32": (mx.float32, np.float32), "float16": (mx.float16, np.float16),
               "bfloat16": (mx.bfloat16, np.uint16)}  # bfloat16 travels as its raw 16 bits
_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


class ProtocolError(ValueError):
    """A frame that breaks the protocol; the connection it came from should be closed."""


# Field kinds: a predicate and the words an error message uses for it.
def _uint(v):
    return type(v) is int and 0 <= v < 2**63


KINDS = {
    "str": (lambda v: type(v) is str, "a string"),
    "uint": (_uint, "a non-negative int"),
    "float": (lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number"),
    "number": (lambda v: type(v) in (int, float) and not math.isnan(v), "a number"),  # -inf: a masked token
    "bool": (lambda v: type(v) is bool, "a bool"),
    "bytes": (lambda v: type(v) is bytes, "bytes"),
    "map": (lambda v: type(v) is dict, "a map"),
    "maps": (lambda v: type(v) is list and all(type(x) is dict for x in v), "a list of maps"),
    "uints": (lambda v: type(v) is list and all(_uint(x) for x in v), "a list of non-negative ints"),
    "logprobs": (lambda v: type(v) is list and len(v) <= 64 and all(
        type(x) is list and len(x) == 2 and _uint(x[0]) and type(x[1]) in (int, float) and not math.isnan(x[1])
        for x in v), "a list of [token, logprob] pairs"),
    "tensor": (lambda v: _tensor_problem(v) is None, "a tensor {dtype, shape, data}"),
    "rows": (lambda v: type(v) is list, "a list of rows"),
}

# type -> (required fields, optional fields). Unknown extra fields are allowed and ignored.
# Handshake, dialer A and listener B (swarm/auth.py makes and checks the challenges):
#   B->A hello(challenge cB); A->B auth(response to cB, challenge cA); B->A welcome(response to cA).
#   A refuses a B of another cluster or with its own node_id; B answers cA only once A has answered cB.
#   It runs over TLS to B's peer port, and both responses also cover B's certificate as each side saw it.
SCHEMAS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "hello": ({"node_id": "str", "cluster": "str", "version": "str", "challenge": "bytes"},
              {"name": "str", "info": "map"}),
    "auth": ({"node_id": "str", "response": "bytes"}, {"challenge": "bytes", "info": "map"}),
    "welcome": ({"node_id": "str"}, {"response": "bytes", "peers": "maps", "info": "map", "epoch": "uint"}),
    "heartbeat": ({"node_id": "str", "seq": "uint"}, {"epoch": "uint", "info": "map"}),
    "peers": ({"peers": "maps"}, {}),
    "plan": ({"epoch": "uint", "plan": "map"}, {}),
    "plan_ack": ({"epoch": "uint", "node_id": "str"}, {"ok": "bool", "error": "str"}),
    # pipeline frames carry rows of several sessions (swarm/scheduler.py): a forward frame's rows cut its
    # tokens or hidden states (T, hidden) into consecutive pieces of n rows; see ROW_SCHEMAS
    "forward": ({"epoch": "uint", "stage": "uint", "rows": "rows"}, {"hidden": "tensor", "tokens": "uints"}),
    "tokens": ({"epoch": "uint", "rows": "rows"}, {}),
    "end": ({"session": "str"}, {"reason": "str"}),
    "leave": ({"node_id": "str"}, {}),
    "handover": ({"node_id": "str", "ok": "bool"}, {"error": "str"}),
    "error": ({"message": "str"}, {"session": "str", "code": "str"}),
}


MAX_ROWS = 4096
ROW_SCHEMAS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "forward": ({"session": "str", "pos": "uint", "n": "uint"}, {"more": "bool", "origin": "str", "open": "map"}),
    "tokens": ({"session": "str", "pos": "uint", "token": "uint"},
               {"done": "bool", "step": "uint", "logprob": "number", "top": "logprobs"}),
}


def _check_fields(what: str, msg: dict, schema: tuple[dict[str, str], dict[str, str]]) -> None:
    required, optional = schema
    for name, kind in (*required.items(), *optional.items()):
        if name not in msg:
            if name in required:
                raise ProtocolError(f"{what}: missing field {name!r}")
            continue
        ok, words = KINDS[kind]
        if not ok(msg[name]):
            detail = _tensor_problem(msg[name]) if kind == "tensor" else type(msg[name]).__name__
            raise ProtocolError(f"{what}: field {name!r} must be {words} ({detail})")


def _check_rows(t: str, rows: list) -> None:
    if not rows or len(rows) > MAX_ROWS:
        raise ProtocolError(f"frame {t!r}: between 1 and {MAX_ROWS} rows are required")
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise ProtocolError(f"frame {t!r}: row {i} must be a map")
        _check_fields(f"frame {t!r} row {i}", row, ROW_SCHEMAS[t])


def _tensor_problem(d) -> str | None:
    if type(d) is not dict:
        return "a tensor must be a map"
    dtype, shape, data = d.get("dtype"), d.get("shape"), d.get("data")
    if type(dtype) is not str or dtype not in WIRE_DTYPES:
        return f"tensor dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r:.40}"
    if (type(shape) is not list or len(shape) > MAX_TENSOR_DIMS
            or not all(type(s) is int and 0 <= s < 2**31 for s in shape)):  # MLX dims are int32
        return f"tensor shape must be a list of at most {MAX_TENSOR_DIMS} ints in [0, 2**31)"
    if type(data) is not bytes:
        return "tensor data must be bytes"
    need = math.prod(shape) * np.dtype(WIRE_DTYPES[dtype][1]).itemsize
    if need != len(data):
        return f"tensor of shape {shape} and dtype {dtype} needs {need} bytes, got {len(data)}"
    return None


def validate(msg) -> dict:
    """Check a message against its schema; returns it, or raises ProtocolError saying what is wrong."""
    if type(msg) is not dict:
        raise ProtocolError(f"a frame must be a map, got {type(msg).__name__}")
    t = msg.get("t")
    if type(t) is not str or t not in SCHEMAS:
        raise ProtocolError(f"unknown or missing frame type {t!r:.40}")
    _check_fields(f"frame {t!r}", msg, SCHEMAS[t])
    if t in ROW_SCHEMAS:
        _check_rows(t, msg["rows"])
    if t == "forward" and ("hidden" in msg) == ("tokens" in msg):
        raise ProtocolError("frame 'forward': exactly one of 'hidden' and 'tokens' is required")
    return msg


def _int_size(b: int) -> int:
    """Bytes taken by an integer item with initial byte b; 0 when b does not start a valid integer."""
    info = b & 31
    if b >= 0x40 or info > 27:
        return 0
    return 1 if info < 24 else 1 + (1 << (info - 24))


_INT_HEAD = [_int_size(b) for b in range(256)]


def _check_cbor(buf: bytes) -> int:
    """Walk one CBOR item at the start of buf without building it; returns the offset after it."""
    n, i = len(buf), 0
    stack: list[tuple[int, bool]] = []  # (items left, is a map) of the enclosing containers
    left, in_map = 1, False
    while True:
        while left == 0:
            if not stack:
                if i > n:
                    raise ProtocolError("CBOR truncated")
                return i
            left, in_map = stack.pop()
        if i >= n:
            raise ProtocolError("CBOR truncated")
        if _INT_HEAD[buf[i]] and not in_map:  # fast path for integers in arrays (token lists)
            i += _INT_HEAD[buf[i]]
            left -= 1
            continue
        major, info = buf[i] >> 5, buf[i] & 31
        i += 1
        is_key = in_map and left % 2 == 0
        left -= 1
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            if i + width > n:
                raise ProtocolError("CBOR truncated")
            arg = int.from_bytes(buf[i:i + width], "big")
            i += width
        else:
            raise ProtocolError("CBOR indefinite lengths and reserved values are not allowed")
        if is_key and major != 3:
            raise ProtocolError("CBOR map keys must be text")
        if major < 2:  # integers
            continue
        if major < 4:  # byte and text strings
            if arg > n - i:
                raise ProtocolError(f"CBOR string declares {arg} bytes, {n - i} left in the frame")
            i += arg
        elif major < 6:  # arrays and maps
            items = arg * 2 if major == 5 else arg
            if items > n - i:  # every item takes at least one byte
                raise ProtocolError(f"CBOR container declares {arg} items, {n - i} bytes left in the frame")
            if items:
                if len(stack) >= MAX_DEPTH:
                    raise ProtocolError(f"CBOR nested deeper than {MAX_DEPTH}")
                stack.append((left, in_map))
                left, in_map = items, major == 5
        elif major == 6:
            raise ProtocolError("CBOR tags are not allowed")
        elif info not in (20, 21, 22, 25, 26, 27):  # false, true, null, half/single/double floats
            raise ProtocolError(f"CBOR simple value {info} is not allowed")


def decode_frame(data, max_bytes: int = MAX_FRAME_BYTES) -> dict:
    """bytes from the wire -> a validated message dict, or ProtocolError."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"a frame must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    data = bytes(data)
    if _check_cbor(data) != len(data):
        raise ProtocolError("trailing bytes after the CBOR map")
    try:
        msg = cbor2.loads(data)
    except Exception as e:  # the walk above makes this unlikely; never let cbor2's errors escape
        raise ProtocolError(f"bad CBOR: {e}") from None
    return validate(msg)


def encode_frame(msg: dict, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """A message dict -> one binary frame; raises ProtocolError if it breaks its own schema."""
    data = cbor2.dumps(validate(msg))
    if len(data) > max_bytes:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    return data


def encode_tensor(x: mx.array | np.ndarray, wire_dtype: str | None = None) -> dict:
    """mx.array (or a float32 numpy array) -> {"dtype", "shape", "data"} (little-endian, row-major), cast to
    wire_dtype if given.

    wire_dtype None or "auto" keeps the array's dtype, which must be float32, float16 or bfloat16."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise ProtocolError(f"cannot send a numpy tensor of dtype {x.dtype}")
        if wire_dtype in (None, "auto", "float32"):  # a CPU stage's rows: no MLX op on the way out
            return {"dtype": "float32", "shape": list(x.shape), "data": np.ascontiguousarray(x).tobytes()}
        x = mx.array(x)
    if wire_dtype not in (None, "auto"):
        if wire_dtype not in WIRE_DTYPES:
            raise ProtocolError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        x = x.astype(WIRE_DTYPES[wire_dtype][0])
    name = _DTYPE_NAMES.get(x.dtype)
    if name is None:
        raise ProtocolError(f"cannot send a tensor of dtype {x.dtype}")
    # the buffer protocol exposes strides; bytes() of it is the row-major copy
    return {"dtype": name, "shape": list(x.shape), "data": bytes(memoryview(x))}


def decode_tensor(d: dict) -> mx.array:
    """{"dtype", "shape", "data"} -> mx.array of that dtype and shape; ProtocolError if inconsistent."""
    return tensor_to_mx(tensor_numpy(d), d["dtype"])


def tensor_numpy(d: dict) -> np.ndarray:
    """{"dtype", "shape", "data"} -> a numpy view of the bytes (bfloat16 as its raw uint16); no MLX op, so any
    thread may call it. ProtocolError if inconsistent."""
    problem = _tensor_problem(d)
    if problem:
        raise ProtocolError(problem)
    return np.frombuffer(d["data"], dtype=np.dtype(WIRE_DTYPES[d["dtype"]][1]).newbyteorder("<")).reshape(d["shape"])


def tensor_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A numpy array from tensor_numpy (or rows of them) -> float32 numpy, without MLX (bfloat16 widened by
    its bits)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(a, np.float32)


def tensor_to_mx(a: np.ndarray, dtype: str) -> mx.array:
    """A numpy array from tensor_numpy (or rows of them) -> mx.array of the wire dtype (an MLX op for bfloat16:
    call it on the thread that computes)."""
    arr = mx.array(a)
    return arr.view(mx.bfloat16) if dtype == "bfloat16" else arr


async def send_frame(ws, msg: dict) -> None:
    """Send one message on an aiohttp websocket (client or server side)."""
    await ws.send_bytes(encode_frame(msg))


async def recv_frame(ws, max_bytes: int = MAX_FRAME_BYTES, timeout: float | None = None) -> dict | None:
    """Next message from an aiohttp websocket; None once the peer closed.

    Raises ProtocolError for anything malformed: the caller then calls close_with_error on this one
    connection. Raises asyncio.TimeoutError when `timeout` passes with nothing received."""
    msg = await ws.receive(timeout=timeout)
    if msg.type == WSMsgType.BINARY:
        return decode_frame(msg.data, max_bytes)
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
        return None
    if msg.type == WSMsgType.ERROR:  # e.g. aiohttp refused a frame over max_msg_size
        raise ProtocolError(f"websocket error: {ws.exception() or msg.data}")
    raise ProtocolError(f"expected a binary frame, got {msg.type.name}")


async def close_with_error(ws, message: str, code: int = WSCloseCode.PROTOCOL_ERROR,
                           session: str | None = None) -> None:
    """Tell the peer why (an error frame, best effort) and close this connection."""
    frame = {"t": "error", "message": message[:500]}
    if session is not None:
        frame["session"] = session
    if not ws.closed:
        try:
            await ws.send_bytes(encode_frame(frame))
        except (ConnectionError, RuntimeError):
            pass  # the peer may already be gone
    await ws.close(code=code, message=message.encode("ascii", "replace")[:120])
