"""Nothing of a peer link or a shard transfer crosses the wire in clear.

Two hosts in network namespaces with a cluster key: a holds the demo model, b finds it over mDNS, pulls
its shard and side files from it and a chat runs through both stages. A raw AF_PACKET socket on b's
interface captures every frame meanwhile. In the TCP payloads of the capture there must be no 32-byte run
of any file b pulled, no request line for /peer or /shards/ and no handshake frame, while the capture does
show b's transfer (as many bytes to and from a's peer port as the shard holds) and does show plain HTTP
where there is some (a request for /peer-port this test makes across the wire, in clear by design).
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest

from tests.netns import netns_hosts, skip_reason
from tests.swarm_harness import REPO, Daemon

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

PORT = 10128
PROMPT = [1, 403, 407, 261, 378]
RUN = 32               # bytes: a run of a file this long in the capture means the file crossed in clear
MIN_DISTINCT = 8       # a run of fewer distinct byte values (zeros, padding) says nothing about the file

# Every frame on an interface, each written as (length, bytes), until SIGTERM.
CAPTURE = r"""
import signal, socket, struct, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))   # ETH_P_ALL: both directions
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 25)
s.bind((sys.argv[1], 0))
with open(sys.argv[2], "wb") as out:
    print("capturing", flush=True)
    while True:
        frame = s.recv(1 << 16)
        out.write(struct.pack("<I", len(frame)) + frame)
"""


def tcp_streams(capture: bytes) -> dict[tuple, bytes]:
    """(src, sport, dst, dport) -> the payload bytes of that direction, in sequence order (IPv4 over Ethernet)."""
    segments: dict[tuple, dict[int, bytes]] = {}
    i = 0
    while i + 4 <= len(capture):
        (n,) = struct.unpack_from("<I", capture, i)
        frame, i = capture[i + 4:i + 4 + n], i + 4 + n
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:   # IPv4, TCP
            continue
        ip = frame[14:]
        ihl, total = (ip[0] & 15) * 4, struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            key = (".".join(map(str, ip[12:16])), sport, ".".join(map(str, ip[16:20])), dport)
            segments.setdefault(key, {})[seq] = payload   # a retransmission replaces its first copy
    return {k: b"".join(v[s] for s in sorted(v)) for k, v in segments.items()}


def file_runs(data: bytes) -> set[bytes]:
    """Every RUN-byte window of a file that has at least MIN_DISTINCT byte values."""
    return {w for w in (data[j:j + RUN] for j in range(len(data) - RUN + 1)) if len(set(w)) >= MIN_DISTINCT}


def runs_in(stream: bytes, runs: set[bytes]) -> int:
    """How many windows of `stream`, at a stride of RUN // 2, are runs of the file: any stretch of it at least
    1.5 * RUN long in the stream, wherever it starts, holds such a window."""
    return sum(stream[j:j + RUN] in runs for j in range(0, len(stream) - RUN + 1, RUN // 2))


def in_namespace(host, code: str, timeout: float = 120.0):
    out = host.run([sys.executable, "-c", code], timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise AssertionError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def get(host, url: str):
    return in_namespace(host, f"import json; from tests.swarm_harness import get_json; "
                              f"print(json.dumps(get_json({url!r})))")


def wait_ready(hosts, daemons, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = [get(h, f"http://{h.addr}:{PORT}/api/swarm") for h in hosts]
            if all(s["ready"] and len(s["nodes"]) == len(hosts) for s in states) and \
                    len({s["epoch"] for s in states}) == 1:
                return states[0]
        except AssertionError:   # not listening yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError("not ready:\n" + "\n".join(d.log()[-2000:] for d in daemons))
        time.sleep(0.5)


def test_search_finds_a_file_that_crosses_in_clear():
    data = os.urandom(5000)
    runs = file_runs(data)
    assert runs_in(b"GET / HTTP/1.1\r\n\r\n" + data[1234:1234 + 3 * RUN // 2] + b"tail", runs) >= 1
    assert runs_in(os.urandom(100_000), runs) == 0
    assert file_runs(bytes(64)) == set()


def test_no_shard_bytes_and_no_peer_request_in_clear(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    key = uuid.uuid4().hex
    capture_file = tmp_path / "b-eth0.frames"
    with netns_hosts(2) as hosts:
        a_host, b_host = hosts
        capture = b_host.popen([sys.executable, "-c", CAPTURE, "eth0", str(capture_file)], stdout=subprocess.PIPE,
                               text=True)
        assert capture.stdout.readline().strip() == "capturing"
        daemons = []
        try:
            for host, name, speed in ((a_host, "a", "2"), (b_host, "b", "1")):
                args = ["--memory-budget", "450000", "--max-context", "256", "--speed", speed, "--cluster-key", key,
                        "--cache-dir", str(tmp_path / name), "--config-dir", str(tmp_path / f"{name}-config")]
                daemons.append(Daemon(name, host.addr, PORT, args + (["--model", "demo"] if name == "a" else []),
                                      tmp_path, env, popen=host.popen))
            state = wait_ready(hosts, daemons)
            assert [s["name"] for s in state["plan"]] == ["a", "b"]
            peer_port_a = next(n["peer_port"] for n in state["nodes"] if n["name"] == "a")

            expected = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "demo", "--prompt-ids",
                                       ",".join(map(str, PROMPT)), "--max-tokens", "40", "--output", "ids"],
                                      capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, check=True)
            body = {"prompt_ids": PROMPT, "max_tokens": 40}
            chat = in_namespace(b_host, f"import json; from tests.swarm_harness import chat_ws; "
                                        f"print(json.dumps(chat_ws('http://{b_host.addr}:{PORT}', {body!r})))")
            assert chat.get("done", {}).get("token_ids") == [int(t) for t in expected.stdout.split(",")], chat
            # the control: a plain request across the wire, which the capture must show
            assert get(b_host, f"http://{a_host.addr}:{PORT}/peer-port") == {"peer_port": peer_port_a}
        finally:
            capture.send_signal(signal.SIGTERM)
            capture.wait(10)
            for d in daemons:
                d.stop()

    streams = tcp_streams(capture_file.read_bytes())
    plain = b"".join(streams.values())
    assert b"GET /peer-port HTTP/1.1" in plain   # plain HTTP is there to be seen

    pulled = [p for p in (tmp_path / "b").rglob("*") if p.is_file() and p.name != "shard.json"]
    shard = next(p for p in pulled if p.name == "model.safetensors")
    tls_bytes = sum(len(s) for (src, sport, dst, dport), s in streams.items() if peer_port_a in (sport, dport))
    assert tls_bytes > shard.stat().st_size, (tls_bytes, shard.stat().st_size)   # the transfer was captured

    assert {p.name for p in pulled} >= {"model.safetensors", "config.json", "tokenizer.json"}
    for path in pulled:
        runs = file_runs(path.read_bytes())
        leaks = {k: n for k, s in streams.items() if (n := runs_in(s, runs))}
        assert not leaks, f"{path.name} crossed in clear: {leaks}"
    for pattern in (rb"(GET|HEAD|POST) /(peer|shards)[ /?]", rb"(?i)x-cake-(auth|nonce|time)",
                    rb"(?i)upgrade: websocket", rb"challenge", rb"model\.layers\."):
        found = {k: m.group(0) for k, s in streams.items() if (m := re.search(pattern, s))}
        assert not found, f"{pattern!r} in clear: {found}"
