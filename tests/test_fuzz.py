"""Fuzzing what strangers and files feed the daemon: peer frames (live), topology YAML, safetensors headers.

- A running daemon gets random and mutated CBOR frames on /peer (over TLS, on its peer port), before the
  handshake (as a stranger) and after it (as a peer holding the key): each connection is closed or the
  frame ignored, and the daemon lives on, answers /api/swarm, lists no stranger and gives the same
  answer as before.
- Its TLS port gets random bytes and mutated TLS ClientHellos, and, after TLS, random and mutated
  handshake frames (hello, auth, welcome) in answer to its hello: nothing is admitted, nothing breaks.
- A websocket frame header that declares 1 GiB is refused on the header, before any payload is read.
- topology.parse on random text, random YAML and mutated examples: only TopologyError escapes.
- tensorfile.parse_header / read_header on random bytes and random JSON headers: only TensorFileError
  escapes, and a header that parses describes tensors inside the file; a header declaring 2**60 bytes
  (or more than the file holds) is refused before it is read.
- atheris (coverage-guided, where it is installed) on the same three entry points, in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import uuid

import aiohttp
import cbor2
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from swarm import auth
from swarm.protocol import MAX_FRAME_BYTES, ROW_SCHEMAS, SCHEMAS, decode_frame, encode_frame
from swarm.tls import client_context, seen_fingerprint
from swarm.tensorfile import DTYPE_BYTES, MAX_HEADER_BYTES, TensorFileError, parse_header, read_header
from tests.swarm_harness import REPO, Daemon, chat_ws, free_port, get_json, wait_ready
from tests.test_protocol import VALID
from topology import TopologyError, parse as parse_topology

PROMPT = [1, 403, 407, 261, 378]
# what an unhandled exception in the daemon leaves in its log
ESCAPES = ("Task exception was never retrieved", "Error handling request", "Exception in callback",
           "Unhandled exception")

# ---------------------------------------------------------------------------------------------------
# strategies

scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=12)
cbor_values = st.recursive(scalars | st.binary(max_size=16),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
uint = st.integers(0, 4) | st.integers(0, 2**63 - 1)   # small ones meet the daemon's epochs and positions


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    shape = draw(st.lists(st.integers(0, 70), min_size=1, max_size=3))
    count = 1
    for n in shape:
        count *= n
    return {"dtype": dtype, "shape": shape, "data": draw(st.binary(min_size=count * (4 if dtype == "float32" else 2),
                                                                    max_size=count * (4 if dtype == "float32" else 2)))}


KIND_VALUES = {
    "str": st.text(max_size=12), "uint": uint, "float": st.floats(allow_nan=False, allow_infinity=False),
    "bool": st.booleans(), "bytes": st.binary(max_size=40),
    "map": st.dictionaries(st.text(max_size=8), cbor_values, max_size=4),
    "maps": st.lists(st.dictionaries(st.text(max_size=8), cbor_values, max_size=3), max_size=3),
    "uints": st.lists(uint, min_size=1, max_size=8), "tensor": tensors(),
    "number": st.floats(allow_nan=False), "logprobs": st.lists(st.tuples(uint, st.floats(allow_nan=False)).map(list),
                                                               max_size=4),
}


def _valid_of(t: str):
    required, optional = SCHEMAS[t]
    kinds = {**KIND_VALUES, "rows": st.lists(_valid_row(t), min_size=1, max_size=3) if t in ROW_SCHEMAS else st.nothing()}
    return st.fixed_dictionaries({"t": st.just(t), **{f: kinds[k] for f, k in required.items()}},
                                 optional={f: kinds[k] for f, k in optional.items()})


def _valid_row(t: str):
    required, optional = ROW_SCHEMAS[t]
    return st.fixed_dictionaries({f: KIND_VALUES[k] for f, k in required.items()},
                                 optional={f: KIND_VALUES[k] for f, k in optional.items()})


# frames that pass the schema, with any values of the right kinds: they reach the node's handlers
schema_valid = st.one_of([_valid_of(t) for t in sorted(SCHEMAS)]).filter(
    lambda m: m["t"] != "forward" or ("hidden" in m) != ("tokens" in m)).map(cbor2.dumps)


@st.composite
def mutated(draw, frames: list[bytes]):
    frame = bytearray(draw(st.sampled_from(frames)))
    for _ in range(draw(st.integers(1, 4))):
        op, i = draw(st.sampled_from(["flip", "set", "cut", "insert"])), draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del frame[i:]
        else:
            frame[i:i] = draw(st.binary(min_size=1, max_size=9))
    return bytes(frame)


VALID_FRAMES = [encode_frame(m) for m in VALID]
peer_frames = st.binary(max_size=300) | mutated(VALID_FRAMES) | schema_valid | st.text(max_size=50)

# pipeline frames aimed at the stage runner: a few session ids, epochs and positions the daemon may be at,
# token ids on both sides of the vocabulary's end (512), sampling maps with odd values
small_or_any = st.integers(0, 2) | uint
number = st.floats() | st.integers(-3, 3) | st.integers(-2**63, 2**64 - 1)
SANE_SAMPLING = {"temperature": st.sampled_from([0.0, 0.8]), "top_k": st.integers(0, 600), "top_p": st.floats(0.01, 1),
                 "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2), "repetition_context": st.integers(0, 99),
                 "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
                 "logit_bias": st.lists(st.tuples(st.integers(0, 600), st.floats(-100, 100)).map(list), max_size=3),
                 "seed": st.integers(-1, 2**63 - 1), "logprobs": st.integers(-1, 25)}
sampling_maps = st.one_of(
    st.fixed_dictionaries(SANE_SAMPLING),
    st.sampled_from(sorted(SANE_SAMPLING)).flatmap(  # one odd value among sane ones
        lambda odd: st.fixed_dictionaries({**SANE_SAMPLING, odd: number | cbor_values})),
    st.dictionaries(st.text(max_size=12), cbor_values, max_size=4))
SANE_OPENING = {"sampling": st.fixed_dictionaries(SANE_SAMPLING), "budget": st.integers(0, 30),
                "eos": st.lists(st.integers(0, 600), max_size=3), "context": st.lists(st.integers(0, 600), max_size=5),
                "step": st.integers(0, 5)}
opening_maps = st.one_of(
    st.fixed_dictionaries(SANE_OPENING),
    st.fixed_dictionaries({**SANE_OPENING, "sampling": sampling_maps}),
    st.sampled_from(sorted(SANE_OPENING)).flatmap(lambda odd: st.fixed_dictionaries({**SANE_OPENING, odd: number | cbor_values})),
    st.dictionaries(st.text(max_size=12), cbor_values, max_size=4))
sessions = st.sampled_from(["s1", "s2"]) | st.text(max_size=4)
token_ids = st.integers(0, 600) | uint
epochs = st.just("now") | small_or_any   # "now": the daemon's epoch when the frame is sent
forward_rows = st.lists(st.fixed_dictionaries(
    {"session": sessions, "pos": st.just(0) | small_or_any, "n": st.integers(1, 3) | small_or_any},
    optional={"origin": st.text(max_size=4), "more": st.booleans(), "open": opening_maps}), min_size=1, max_size=3)
forwards = st.fixed_dictionaries({"t": st.just("forward"), "epoch": epochs, "stage": st.just(0) | small_or_any,
                                  "rows": forward_rows})
token_rows = st.lists(st.fixed_dictionaries(
    {"session": sessions, "pos": small_or_any, "token": token_ids},
    optional={"done": st.booleans(), "step": small_or_any}), min_size=1, max_size=3)
pipeline_frames = st.one_of(
    forwards.flatmap(lambda m: (st.lists(st.integers(0, 511), max_size=6) | st.lists(token_ids, max_size=6))
                     .map(lambda ids: {**m, "tokens": ids})),
    # token rows that agree with their count: past the frame's own check, into the stage
    forwards.filter(lambda m: sum(r["n"] for r in m["rows"]) <= 64).flatmap(
        lambda m: st.lists(st.integers(0, 511), min_size=sum(r["n"] for r in m["rows"]),
                           max_size=sum(r["n"] for r in m["rows"])).map(lambda ids: {**m, "tokens": ids})),
    forwards.flatmap(lambda m: tensors().map(lambda h: {**m, "hidden": h})),
    st.fixed_dictionaries({"t": st.just("tokens"), "epoch": epochs, "rows": token_rows}),
    st.fixed_dictionaries({"t": st.just("end"), "session": sessions}),
    st.fixed_dictionaries({"t": st.just("error"), "message": st.text(max_size=8), "session": sessions}),
)

# ---------------------------------------------------------------------------------------------------
# the live daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    key = uuid.uuid4().hex
    d = Daemon("a", "127.0.0.1", free_port(), ["--model", "demo", "--memory-budget", "2MB", "--max-context", "256",
                                                "--speed", "1", "--cluster-key", key, "--no-mdns",
                                                "--cache-dir", str(tmp / "a"), "--config-dir", str(tmp / "a-config")],
               tmp, {"XDG_CACHE_HOME": str(tmp / "xdg")})
    try:
        wait_ready([d], nodes=1)
        before = chat_ws(d.url, {"prompt_ids": PROMPT, "max_tokens": 20})["done"]["token_ids"]
        yield d, key, before
    finally:
        d.stop()


async def _handshake(ws, key: str, node_id: str) -> None:
    hello = decode_frame((await ws.receive(timeout=5)).data)
    mine, seen = auth.new_challenge(), seen_fingerprint(ws)
    await ws.send_bytes(encode_frame({"t": "auth", "node_id": node_id, "challenge": mine,
                                      "response": auth.respond(key, hello["challenge"], node_id, seen),
                                      "info": {"name": "fuzzer", "addr": "127.0.0.1", "port": 9}}))
    welcome = decode_frame((await ws.receive(timeout=5)).data)
    assert welcome["t"] == "welcome" and auth.check(key, mine, hello["node_id"], welcome["response"], seen)


@functools.cache
def _peer_port(url: str) -> int:
    """The TLS port of the daemon whose dashboard is url."""
    return get_json(url + "/peer-port")["peer_port"]


def _peer_socket(http: aiohttp.ClientSession, url: str):
    return http.ws_connect(f"https://127.0.0.1:{_peer_port(url)}/peer", ssl=client_context())


def _send_to_peer_socket(url: str, frames: list[bytes | str], key: str | None) -> None:
    """One connection: (handshake,) the frames, then a moment for the daemon to act on them or close."""
    async def run():
        async with aiohttp.ClientSession() as http, _peer_socket(http, url) as ws:
            if key is None:
                await ws.receive(timeout=5)  # the hello; we answer with the fuzz frame instead of auth
            else:
                await _handshake(ws, key, "fuzz-" + uuid.uuid4().hex[:8])
            for frame in frames:
                await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
            try:
                while (await ws.receive(timeout=0.05)).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    pass
            except asyncio.TimeoutError:
                pass  # the frame was taken: the link stays up until we close it
    asyncio.run(run())


FUZZ_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                         database=None)


@FUZZ_SETTINGS
@given(frame=peer_frames)
def test_frames_before_the_handshake_never_hurt_the_daemon(daemon, frame):
    d, _, _ = daemon
    _send_to_peer_socket(d.url, [frame], None)
    assert d.proc.poll() is None


@FUZZ_SETTINGS
@given(frame=peer_frames)
def test_frames_after_the_handshake_never_hurt_the_daemon(daemon, frame):
    d, key, _ = daemon
    _send_to_peer_socket(d.url, [frame], key)
    assert d.proc.poll() is None


def _client_hello() -> bytes:
    """The first flight of the standard library's TLS 1.3 client, as it would reach the peer port."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


tls_bytes = st.binary(max_size=600) | mutated([_client_hello() for _ in range(3)])


@FUZZ_SETTINGS
@given(data=tls_bytes)
def test_bytes_into_the_tls_port_never_hurt_the_daemon(daemon, data):
    """Random bytes and mutated ClientHellos where a TLS handshake should start."""
    d, _, _ = daemon
    try:
        with socket.create_connection((d.host, _peer_port(d.url)), timeout=5) as s:
            s.sendall(data)
            s.settimeout(0.1)
            while s.recv(65536):   # whatever the daemon answers, until it closes or goes quiet
                pass
    except (TimeoutError, ConnectionError):
        pass
    assert d.proc.poll() is None


HANDSHAKE = [{"t": "hello", "node_id": "a", "cluster": "open", "version": "2", "challenge": bytes(32)},
             {"t": "auth", "node_id": "x", "response": b"\x01" * 32, "challenge": b"\x02" * 32,
              "info": {"addr": "127.0.0.1", "port": 9, "peer_port": 10}},
             {"t": "welcome", "node_id": "b", "response": b"\x03" * 32, "peers": [{"node_id": "c", "port": 1}]}]
handshake_frames = (st.sampled_from(["hello", "auth", "welcome"]).flatmap(_valid_of).map(cbor2.dumps)
                    | mutated([encode_frame(m) for m in HANDSHAKE]))


@FUZZ_SETTINGS
@given(frames=st.lists(handshake_frames, min_size=1, max_size=3))
def test_handshake_frames_after_tls_never_hurt_the_daemon(daemon, frames):
    """After TLS and the daemon's hello: random and mutated hello/auth/welcome frames instead of a true auth."""
    d, _, _ = daemon
    _send_to_peer_socket(d.url, frames, None)
    assert d.proc.poll() is None


# a well-formed session opening whose tokens go to the daemon itself ("self"), so that it generates on its own
# and the frames after it meet a live session with its KV cache
openings = st.lists(st.integers(0, 511), min_size=1, max_size=6).flatmap(lambda ids: st.fixed_dictionaries({
    "t": st.just("forward"), "epoch": st.just("now"), "stage": st.just(0), "tokens": st.just(ids),
    "rows": st.fixed_dictionaries({"session": st.just("s1"), "pos": st.just(0), "n": st.just(len(ids)),
                                   "origin": st.just("self"), "more": st.booleans(),
                                   "open": st.fixed_dictionaries(SANE_OPENING)}).map(lambda r: [r])}))


def _live(frame: dict, run: str, now: dict) -> dict:
    """The frame with this example's session ids, and the daemon's own epoch and id where it says now/self."""
    out = {**frame, **{k: now[k] for k in ("epoch",) if frame.get(k) == "now"}}
    if "session" in frame:
        out["session"] = run + frame["session"]
    if "rows" in frame:
        out["rows"] = [{**r, "session": run + r["session"], **({"origin": now["origin"]} if r.get("origin") == "self" else {})}
                       for r in frame["rows"]]
    return out


@FUZZ_SETTINGS
@given(frames=st.tuples(openings, st.lists(pipeline_frames, max_size=4)).map(lambda t: [t[0], *t[1]]))
def test_pipeline_frames_from_a_peer_never_hurt_the_daemon(daemon, frames):
    d, key, _ = daemon
    run = uuid.uuid4().hex[:6]  # sessions of this example only: the daemon ignores ended ones for good
    state = d.state()
    now = {"epoch": state["epoch"], "origin": state["node"]["id"]}
    _send_to_peer_socket(d.url, [encode_frame(_live(f, run, now)) for f in frames], key)
    assert d.proc.poll() is None


def test_an_oversized_frame_is_refused_on_its_header(daemon):
    """A binary frame declaring 1 GiB, of which no byte is sent: the daemon closes with 1009 at once."""
    d, _, _ = daemon
    port = _peer_port(d.url)
    with client_context().wrap_socket(socket.create_connection((d.host, port), timeout=10)) as s:
        nonce = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /peer HTTP/1.1\r\nHost: {d.host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        s.sendall(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 1 << 30) + os.urandom(4))  # FIN|binary, masked
        rest, got = head.split(b"\r\n\r\n", 1)[1], b""
        while True:  # the hello, then the close frame (opcode 8) with code 1009 (message too big)
            try:
                chunk = s.recv(65536)
            except (ssl.SSLError, ConnectionError):   # closed without TLS's close_notify
                break
            if not chunk:
                break
            got += chunk
    close = got[got.rfind(b"\x88"):] if b"\x88" in got else b""
    assert close[:1] == b"\x88" and struct.unpack(">H", close[2:4])[0] == 1009, (rest + got)[-200:]
    assert 1 << 30 > MAX_FRAME_BYTES
    assert d.proc.poll() is None


def test_the_daemon_still_serves_after_the_fuzzing(daemon):
    d, _, before = daemon
    assert d.proc.poll() is None
    state = wait_ready([d], nodes=1, timeout=30)[0]  # every fuzzing peer is gone
    assert [n["name"] for n in state["nodes"]] == ["a"] and state["source_present"]
    assert chat_ws(d.url, {"prompt_ids": PROMPT, "max_tokens": 20})["done"]["token_ids"] == before
    log = d.log()
    assert "refused a peer" in log and "malformed frame" in log  # the fuzzing reached both stages
    assert not [line for line in log.splitlines() if line.startswith(ESCAPES)], log[-3000:]


# ---------------------------------------------------------------------------------------------------
# topology YAML

EXAMPLES = [p.read_text() for p in sorted((REPO / "topology" / "examples").glob("*.yaml"))]
yaml_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                           max_leaves=15)
layer_text = st.builds(lambda a, b, sep: f"model.layers.{a}{sep}{b}", st.integers(-3, 10**6), st.integers(-3, 10**6),
                       st.sampled_from(["-", "--", "", ".."]))
topology_like = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.fixed_dictionaries({}, optional={"host": yaml_values, "layers": st.lists(layer_text | yaml_values, max_size=3),
                                        "memory_budget": st.text(max_size=8) | st.integers(), "extra": yaml_values})
    | yaml_values, max_size=4)


def _parse_or_refuse(text: str) -> None:
    try:
        topo = parse_topology(text)
    except TopologyError:
        return
    for node in topo.nodes.values():
        assert all(0 <= a < b for a, b in node.layers), node


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_text_is_a_topology_or_a_topology_error(text):
    _parse_or_refuse(text)


@settings(max_examples=300, deadline=None)
@given(yaml_values | topology_like | st.fixed_dictionaries({"nodes": topology_like}, optional={"model": yaml_values}))
def test_random_yaml_is_a_topology_or_a_topology_error(value):
    _parse_or_refuse(yaml.safe_dump(value))


@settings(max_examples=300, deadline=None)
@given(mutated([e.encode() for e in EXAMPLES]))
def test_mutated_examples_are_topologies_or_topology_errors(data):
    _parse_or_refuse(data.decode("utf-8", "replace"))


@pytest.mark.parametrize("text", ["[" * 5000, "a: " + "[" * 3000, "{a: " * 3000, "- " * 3000,
                                  "a: &x [1]\nb: *x\n", "a: !!python/object:os.system {}\n", "\x00\x01"])
def test_hostile_yaml_is_a_topology_error(text):
    with pytest.raises(TopologyError):
        parse_topology(text)


# ---------------------------------------------------------------------------------------------------
# safetensors headers

entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(sorted(DTYPE_BYTES)) | yaml_values,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | yaml_values,
    "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | yaml_values})
headers = st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), entries | yaml_values, max_size=4)


def _header_or_refusal(raw: bytes, file_size: int) -> None:
    try:
        tensors, metadata = parse_header(raw, "f.safetensors", 8 + len(raw), file_size)
    except TensorFileError:
        return
    assert isinstance(metadata, dict)
    for t in tensors.values():
        assert 8 + len(raw) <= t.start <= t.end <= file_size
        count = 1
        for n in t.shape:
            count *= n
        assert t.nbytes == count * DTYPE_BYTES[t.dtype]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_header_bytes_give_only_tensor_file_error(raw):
    _header_or_refusal(raw, 1 << 20)


@settings(max_examples=400, deadline=None)
@given(headers, st.integers(0, 1 << 41))
def test_random_json_headers_give_only_tensor_file_error(header, size):
    raw = json.dumps(header).encode()
    _header_or_refusal(raw, 8 + len(raw) + size)


@pytest.mark.parametrize("raw", [b"[" * 100000, b'{"a": ' + b"1" * 5000 + b"}",
                                 b'{"a": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}',
                                 b'{"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}'])
def test_hostile_json_headers_are_tensor_file_errors(raw):
    with pytest.raises(TensorFileError):
        parse_header(raw, "f.safetensors", 8 + len(raw), 1 << 20)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_files_give_only_tensor_file_error(data):
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        try:
            read_header(f.name)
        except TensorFileError:
            pass


@pytest.mark.parametrize("declared, file_size", [(2**60, 100), (2**64 - 1, 100), (MAX_HEADER_BYTES + 1, 200 << 20),
                                                 (50 << 20, 1024)])
def test_impossible_header_lengths_are_refused_before_reading(tmp_path, declared, file_size):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", declared) + b"{}")
        f.truncate(file_size)  # sparse: a large file costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(TensorFileError, match="header length"):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated: the header was read"


# ---------------------------------------------------------------------------------------------------
# atheris: coverage-guided, on the same entry points

ATHERIS = """
import sys, atheris
import aiohttp, mlx.core, numpy  # imported before instrumenting: not ours, and slow to instrument
with atheris.instrument_imports():
    from swarm.protocol import ProtocolError, decode_frame
    from swarm.tensorfile import TensorFileError, parse_header
    from topology import TopologyError, parse

def one(data):
    for call, allowed in ((lambda: decode_frame(data), ProtocolError),
                          (lambda: parse_header(data, "f", 8 + len(data), 1 << 20), TensorFileError),
                          (lambda: parse(data.decode("utf-8", "replace")), TopologyError)):
        try:
            call()
        except allowed:
            pass

atheris.Setup([sys.argv[0], "-runs=%d", "-seed=1", "-max_len=512", sys.argv[1]], one)
atheris.Fuzz()
"""

RUNS = 6000


def test_atheris_finds_nothing(tmp_path, tiny_qwen2):
    """RUNS coverage-guided runs (about 15 s) from a corpus of valid frames, example topologies and a
    real safetensors header; libFuzzer stops with a non-zero status on the first escaped exception."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    model = tiny_qwen2.folder / "model.safetensors"
    with open(model, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        seeds = VALID_FRAMES + [e.encode()[:512] for e in EXAMPLES] + [f.read(min(n, 512))]
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    out = subprocess.run([sys.executable, "-c", ATHERIS % RUNS, str(corpus)], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Done {RUNS} runs" in out.stderr, out.stderr[-2000:]
