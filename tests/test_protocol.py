"""CBOR frames, their schemas, tensor encoding and the close-on-malformed pattern of swarm/protocol.py."""
import asyncio

import aiohttp
import cbor2
import mlx.core as mx
import numpy as np
import pytest
from aiohttp import web
from hypothesis import given, settings, strategies as st

from swarm import protocol as P
from swarm.protocol import ProtocolError, decode_frame, encode_frame

SMALL = {"epoch": 3, "stage": 1, "rows": [{"session": "s1", "pos": 7, "n": 1}]}
OPEN = {"sampling": {"temperature": 0.0}, "budget": 5, "eos": [2]}
VALID = [
    {"t": "hello", "node_id": "a", "cluster": "open", "version": "0.1", "challenge": bytes(32), "name": "mac"},
    {"t": "auth", "node_id": "a", "response": b"\x01" * 32, "challenge": b"\x02" * 32, "info": {"port": 1}},
    {"t": "welcome", "node_id": "b", "response": b"\x03" * 32,
     "peers": [{"node_id": "c", "addr": "10.0.0.3", "port": 10128}]},
    {"t": "heartbeat", "node_id": "a", "seq": 12, "epoch": 2, "info": {"load": 0.5}},
    {"t": "peers", "peers": []},
    {"t": "plan", "epoch": 2, "plan": {"stages": [{"node": "a", "layers": [0, 12]}]}},
    {"t": "plan_ack", "epoch": 2, "node_id": "a", "ok": False, "error": "out of memory"},
    {"t": "forward", "epoch": 3, "stage": 0, "tokens": [1, 2, 3],
     "rows": [{"session": "s1", "pos": 0, "n": 2, "origin": "a", "more": True, "open": OPEN},
              {"session": "s2", "pos": 9, "n": 1, "origin": "b"}]},
    {"t": "forward", **SMALL, "hidden": {"dtype": "float16", "shape": [1, 2], "data": b"\0" * 4}},
    {"t": "tokens", "epoch": 3, "rows": [{"session": "s1", "pos": 8, "token": 42, "done": True, "step": 1},
                                         {"session": "s2", "pos": 3, "token": 7, "logprob": -0.25,
                                          "top": [[7, -0.25], [9, -1.5]]}]},
    {"t": "leave", "node_id": "a"},
    {"t": "handover", "node_id": "a", "ok": False, "error": "the model does not fit"},
    {"t": "end", "session": "s1", "reason": "stop"},
    {"t": "error", "message": "stage failed", "session": "s1"},
]


@pytest.mark.parametrize("msg", VALID, ids=lambda m: m["t"])
def test_valid_frames_round_trip(msg):
    assert decode_frame(encode_frame(msg)) == msg


def test_every_type_has_a_valid_example():
    assert {m["t"] for m in VALID} == set(P.SCHEMAS)


@pytest.mark.parametrize("data, words", [
    ("not bytes", "must be bytes"),
    (cbor2.dumps([1, 2]), "must be a map"),
    (cbor2.dumps({"x": 1}), "unknown or missing frame type"),
    (cbor2.dumps({"t": "launch"}), "unknown or missing frame type"),
    (cbor2.dumps({"t": "tokens", "epoch": 1, "rows": [{"session": "s", "pos": 1}]}), "row 0: missing field 'token'"),
    (cbor2.dumps({"t": "tokens", "epoch": 1, "rows": [{"session": "s", "pos": -1, "token": 1}]}), "field 'pos'"),
    (cbor2.dumps({"t": "tokens", "epoch": True, "rows": [{"session": "s", "pos": 1, "token": 1}]}), "field 'epoch'"),
    (cbor2.dumps({"t": "tokens", "epoch": 1, "rows": []}), "between 1 and"),
    (cbor2.dumps({"t": "tokens", "epoch": 1, "rows": ["s"]}), "row 0 must be a map"),
    (cbor2.dumps({"t": "tokens", "epoch": 1, "rows": [{"session": "s", "pos": 1, "token": 1, "top": [[1]]}]}),
     "field 'top'"),
    (cbor2.dumps({"t": "forward", "epoch": 1, "stage": 0, "rows": [{"session": "s", "pos": 0}], "tokens": [1]}),
     "missing field 'n'"),
    (cbor2.dumps({"t": "forward", **SMALL}), "exactly one of"),
    # a huge int where bytes belong must not reach bytes(...) in a handshake
    (cbor2.dumps({"t": "welcome", "node_id": "b", "response": 2**62}), "field 'response' must be bytes"),
    (cbor2.dumps({"t": "forward", **SMALL, "tokens": [1],
                  "hidden": {"dtype": "float32", "shape": [1], "data": b"1234"}}), "exactly one of"),
    (cbor2.dumps({"t": "forward", **SMALL, "hidden": {"dtype": "float32", "shape": [2], "data": b"1234"}}),
     "needs 8 bytes"),
    (cbor2.dumps({"t": "forward", **SMALL, "hidden": {"dtype": "int64", "shape": [1], "data": b"1" * 8}}),
     "dtype must be one of"),
    (cbor2.dumps({"t": "end", "session": "s"}) + b"\x00", "trailing bytes"),
    (cbor2.dumps({1: "end"}), "map keys must be text"),
    (b"\xd8\x23\x63a+b", "tags are not allowed"),                                # tag 35: regex
    (cbor2.dumps({"t": "end", "session": "s", "x": cbor2.CBORTag(1, 0)}), "tags are not allowed"),
    (b"\xbf\x61t\x63end\xff", "indefinite lengths"),
    (b"\x5b" + (2**62).to_bytes(8, "big") + b"abc", "declares 4611686018427387904 bytes"),
    (b"\x9b" + (2**40).to_bytes(8, "big") + b"\x00", "declares 1099511627776 items"),
    (b"\xbb" + (2**40).to_bytes(8, "big") + b"\x00", "declares 1099511627776 items"),
    (b"\x81" * 10000 + b"\x00", "nested deeper"),
    (b"\xa1\x61t\xf7", "simple value 23"),                                       # undefined
    (b"\xa1\x61t\x62\xff\xfe", "bad CBOR"),                                       # invalid UTF-8
    (b"", "truncated"),
    (b"\x81\x19\x01", "truncated"),                                            # int cut short in an array
    (b"\x82\x01\x1c", "reserved values"),                                      # reserved int width
])
def test_malformed_frames_are_refused_with_a_clear_message(data, words):
    with pytest.raises(ProtocolError) as e:
        decode_frame(data)
    assert words in str(e.value)


def test_oversize_is_refused_before_decoding():
    frame = encode_frame({"t": "error", "message": "x" * 2000})
    assert decode_frame(frame, max_bytes=len(frame))["message"] == "x" * 2000
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_frame(frame, max_bytes=len(frame) - 1)
    # garbage over the limit fails on size, showing the size check comes first
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_frame(b"\xff" * 100, max_bytes=99)


def test_encode_refuses_messages_that_break_the_schema():
    with pytest.raises(ProtocolError, match="field 'seq'"):
        encode_frame({"t": "heartbeat", "node_id": "a", "seq": np.int64(3)})
    with pytest.raises(ProtocolError, match="unknown"):
        encode_frame({"t": "nope"})


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=5), kids, max_size=5),
    max_leaves=30)


def _depth(v):
    kids = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
    return 0 if kids is None else 1 + max(map(_depth, kids), default=-1)


@given(json_like)
def test_the_structure_walk_accepts_all_plain_cbor(value):
    data = cbor2.dumps(value)
    if _depth(value) > P.MAX_DEPTH:  # empty containers do not count as a level
        with pytest.raises(ProtocolError, match="nested deeper"):
            P._check_cbor(data)
    else:
        assert P._check_cbor(data) == len(data)


def _assert_refused_or_valid(data):
    try:
        msg = decode_frame(data)
    except ProtocolError:
        return
    assert msg["t"] in P.SCHEMAS and P.validate(msg) is msg


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_protocol_error(data):
    _assert_refused_or_valid(data)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_frames_never_raise_anything_but_protocol_error(msg, data):
    frame = bytearray(encode_frame(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        i = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del frame[i:]
        else:
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=9))
    _assert_refused_or_valid(bytes(frame))


# ---- tensors ----

@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_tensor_round_trip_is_lossless(dtype):
    x = (mx.random.normal((2, 3, 5), key=mx.random.key(0)) * 100).astype(dtype)
    d = P.encode_tensor(x)
    assert d["dtype"] == {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]
    assert d["shape"] == [2, 3, 5] and len(d["data"]) == 30 * x.itemsize
    y = P.decode_tensor(decode_frame(encode_frame({"t": "forward", **SMALL, "hidden": d}))["hidden"])
    assert y.dtype == dtype and y.shape == x.shape
    assert mx.array_equal(x, y).item()
    # bit-exact, not just equal (catches -0.0 vs 0.0 and NaN payloads)
    assert np.array_equal(np.array(x.view(mx.uint16 if x.itemsize == 2 else mx.uint32)),
                          np.array(y.view(mx.uint16 if y.itemsize == 2 else mx.uint32)))


@pytest.mark.parametrize("wire", [None, "float32", "float16", "bfloat16"])
def test_a_cpu_stages_numpy_rows_travel_as_mlx_rows_do(wire):
    """A CPU stage sends numpy float32 rows and reads what comes in without MLX: the same bytes as from
    the mx.array, and tensor_float32 widens each wire dtype to the float32 values MLX's astype gives."""
    x = (np.random.default_rng(3).standard_normal((4, 7)) * 50).astype(np.float32)
    d = P.encode_tensor(x, wire)
    assert d == P.encode_tensor(mx.array(x), wire)
    got = P.tensor_float32(P.tensor_numpy(d), d["dtype"])
    assert got.dtype == np.float32 and np.array_equal(got, np.array(P.decode_tensor(d).astype(mx.float32)))
    with pytest.raises(ProtocolError):
        P.encode_tensor(x.astype(np.float64))


def test_bfloat16_bits_on_the_wire_are_the_top_half_of_float32():
    x = mx.array([1.0, -2.5, 3.140625], dtype=mx.float32)
    d = P.encode_tensor(x, "bfloat16")
    top = (np.array(x).view(np.uint32) >> 16).astype("<u2").tobytes()
    assert d["dtype"] == "bfloat16" and d["data"] == top


def test_wire_dtype_casts_and_strided_arrays_travel_in_logical_order():
    x = mx.arange(6, dtype=mx.float32).reshape(2, 3).T
    d = P.encode_tensor(x, "float16")
    assert d["dtype"] == "float16" and d["shape"] == [3, 2]
    assert P.decode_tensor(d).tolist() == [[0, 3], [1, 4], [2, 5]]
    assert P.decode_tensor(P.encode_tensor(x, "auto")).dtype == mx.float32
    with pytest.raises(ProtocolError):
        P.encode_tensor(x, "int8")
    with pytest.raises(ProtocolError):
        P.encode_tensor(mx.array([1, 2]))


@pytest.mark.parametrize("d", [
    {"dtype": "float32", "shape": [3], "data": b"\0" * 8},
    {"dtype": "float64", "shape": [1], "data": b"\0" * 8},
    {"dtype": "float32", "shape": [-1], "data": b""},
    {"dtype": "float32", "shape": [1] * 9, "data": b"\0" * 4},
    {"dtype": "float32", "shape": [0, 2**40], "data": b""},
    {"dtype": "float32", "shape": "4", "data": b"\0" * 16},
    {"dtype": ["float32"], "shape": [1], "data": b"\0" * 4},
    "not a map",
])
def test_decode_tensor_refuses_inconsistent_tensors(d):
    with pytest.raises(ProtocolError):
        P.decode_tensor(d)


# ---- on a real websocket ----

async def _echo_server(max_msg_size):
    async def handler(request):
        ws = web.WebSocketResponse(max_msg_size=max_msg_size)
        await ws.prepare(request)
        while True:
            try:
                msg = await P.recv_frame(ws, max_bytes=max_msg_size)
            except ProtocolError as e:
                await P.close_with_error(ws, str(e))
                break
            if msg is None:
                break
            await P.send_frame(ws, {"t": "heartbeat", "node_id": "server", "seq": msg["seq"] + 1})
        return ws

    app = web.Application()
    app.router.add_get("/peer", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/peer"


async def test_a_malformed_frame_closes_only_that_connection():
    runner, url = await _echo_server(max_msg_size=4096)
    try:
        async with aiohttp.ClientSession() as s:
            good = await s.ws_connect(url)
            await P.send_frame(good, {"t": "heartbeat", "node_id": "c", "seq": 1})
            assert (await P.recv_frame(good))["seq"] == 2

            for bad_payload in (b"\xd8\x23\x63a+b", b"\xa1\x61t\x64nope", "text, not binary"):
                bad = await s.ws_connect(url)
                if isinstance(bad_payload, str):
                    await bad.send_str(bad_payload)
                else:
                    await bad.send_bytes(bad_payload)
                err = await P.recv_frame(bad)
                assert err["t"] == "error" and err["message"]
                assert await P.recv_frame(bad) is None
                assert bad.close_code == aiohttp.WSCloseCode.PROTOCOL_ERROR

            # over aiohttp's max_msg_size: refused by the reader before the payload is buffered
            big = await s.ws_connect(url)
            await big.send_bytes(encode_frame({"t": "error", "message": "x" * 5000}))
            while await P.recv_frame(big) is not None:
                pass
            assert big.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

            # the first connection and new ones still work
            await P.send_frame(good, {"t": "heartbeat", "node_id": "c", "seq": 10})
            assert (await P.recv_frame(good))["seq"] == 11
            again = await s.ws_connect(url)
            await P.send_frame(again, {"t": "heartbeat", "node_id": "d", "seq": 20})
            assert (await P.recv_frame(again, timeout=10))["seq"] == 21
            for ws in (good, again):
                await ws.close()
    finally:
        await runner.cleanup()


async def test_recv_frame_times_out_when_nothing_arrives():
    runner, url = await _echo_server(max_msg_size=4096)
    try:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(url)
            with pytest.raises(asyncio.TimeoutError):
                await P.recv_frame(ws, timeout=0.2)
            await ws.close()
    finally:
        await runner.cleanup()
