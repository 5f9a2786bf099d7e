"""What TLS costs peer links: pipeline hop latency and shard transfer rate, plain against TLS, on loopback.

    python scripts/bench_tls.py [--rounds 5] [--workdir DIR] [--dest DIR]

Server and client are separate processes (uvloop on both sides where installed), as two daemons are, and
the server listens twice: plain, and TLS with a node's own contexts (swarm.tls: TLS 1.3, its P-256
certificate; the client pins the certificate as a fetching node does).
  1. hop: an aiohttp websocket that sends every binary frame back. The client sends one frame holding a
     hidden state in the project's encoding (swarm.protocol.encode_tensor in a CBOR map: decode steps of
     the 0.5B and 7B shapes, 1 x 896 and 1 x 3584 float32, and a 128-token prefill of the 7B shape) and
     waits for it; a hop is half the round trip (median).
  2. shard: swarm.shardserve's ShardServer serves the whole-model shard of a qwen2.5-0.5b-shaped random
     4-bit checkpoint (scripts/make_model.py); fetch_shard pulls it (stream to disk, sha256, rename) into
     --dest (default: /dev/shm, so that the disk is not what is measured); MB/s.
Rounds alternate plain and TLS; figures are medians over the rounds. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2
import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swarm.protocol import encode_tensor  # noqa: E402
from swarm.shardserve import fetch_shard  # noqa: E402
from swarm.tls import Endpoint, PeerClient, client_context, load_identity  # noqa: E402

HIDDEN = {"decode 0.5B (1 x 896)": (1, 896), "decode 7B (1 x 3584)": (1, 3584), "prefill 7B (128 x 3584)": (128, 3584)}
SENDS = {"decode 0.5B (1 x 896)": 400, "decode 7B (1 x 3584)": 400, "prefill 7B (128 x 3584)": 40}

# Echo websocket and shard routes, each on a plain and a TLS port; prints the four ports and the model hash.
SERVE = """
import asyncio, sys
from aiohttp import web
from swarm.shards import profile_model
from swarm.shardserve import ShardServer
from swarm.tls import load_identity

async def echo(request):
    ws = web.WebSocketResponse(max_msg_size=1 << 26)
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_bytes(msg.data)
    return ws

async def main():
    identity = load_identity(sys.argv[3])
    profile = profile_model(sys.argv[1])
    shards = ShardServer(sys.argv[2], "bench key", [profile], identity.fingerprint)
    app = web.Application()
    app.add_routes([web.get("/echo", echo), *shards.routes()])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for tls in (None, identity.server_context()):
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    print(*[a[1] for a in runner.addresses], profile.model_hash, flush=True)
    await asyncio.Event().wait()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def frame(shape: tuple[int, int]) -> bytes:
    x = mx.random.normal(shape).astype(mx.float32)
    return cbor2.dumps({"t": "forward", "epoch": 1, "hidden": encode_tensor(x)})


async def hop_ms(session, url: str, data: bytes, sends: int, ssl) -> float:
    """Median one-way time of `data` over a websocket at url: half the round trip, in ms."""
    async with session.ws_connect(url, ssl=ssl, max_msg_size=1 << 26) as ws:
        for _ in range(5):   # warm-up
            await ws.send_bytes(data)
            await ws.receive()
        times = []
        for _ in range(sends):
            t0 = time.perf_counter()
            await ws.send_bytes(data)
            await ws.receive()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / 2 * 1000


async def fetch_mb_s(base: str, fingerprint: str, model_hash: str, layers: int, dest: Path) -> float:
    async def find(base_url):
        return Endpoint(base_url, fingerprint)

    client = PeerClient(find)
    try:
        t0 = time.perf_counter()
        folder = await fetch_shard(client, base, model_hash, 0, layers, True, True, dest, "bench key",
                                   read_timeout=120)
        seconds = time.perf_counter() - t0
    finally:
        await client.close()
    size = (folder / "model.safetensors").stat().st_size
    shutil.rmtree(dest, ignore_errors=True)
    return size / seconds / 1e6


async def bench(ports: list[int], model_hash: str, layers: int, fingerprint: str, rounds: int, dest: Path) -> dict:
    import aiohttp

    plain_port, tls_port = ports
    modes = {"plain": (f"http://127.0.0.1:{plain_port}", None),
             "TLS": (f"https://127.0.0.1:{tls_port}", aiohttp.Fingerprint(bytes.fromhex(fingerprint)))}
    frames = {name: frame(shape) for name, shape in HIDDEN.items()}
    hops = {(name, mode): [] for name in HIDDEN for mode in modes}
    rates = {mode: [] for mode in modes}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context())) as session:
        for _ in range(rounds):
            for mode, (base, pin) in modes.items():
                for name, data in frames.items():
                    hops[name, mode].append(await hop_ms(session, base.replace("http", "ws") + "/echo", data,
                                                         SENDS[name], pin))
                rates[mode].append(await fetch_mb_s(base, fingerprint, model_hash, layers, dest / mode))
    return {"hop_ms": {f"{name} | {mode}": statistics.median(v) for (name, mode), v in hops.items()},
            "hop_ms_all": {f"{name} | {mode}": v for (name, mode), v in hops.items()},
            "shard_mb_s": {mode: statistics.median(v) for mode, v in rates.items()},
            "shard_mb_s_all": rates, "frame_bytes": {name: len(d) for name, d in frames.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", type=Path, help="keeps the checkpoint between runs (default: a temporary folder)")
    ap.add_argument("--dest", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tls-"))
    dest = Path(tempfile.mkdtemp(prefix="bench-tls-", dir=args.dest))
    model = work / "qwen2.5-0.5b"
    if not (model / "config.json").exists():
        spec = importlib.util.spec_from_file_location("make_model", ROOT / "scripts" / "make_model.py")
        make_model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(make_model)
        make_model.make_model("qwen2.5-0.5b", model)
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    identity = load_identity(work / "config")
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(model), str(work / "source-cache"),
                               str(work / "config")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        *ports, model_hash = server.stdout.readline().split()
        work_out = bench([int(p) for p in ports], model_hash, layers, identity.fingerprint, args.rounds, dest)
        try:
            import uvloop
            out = uvloop.run(work_out)
        except ImportError:
            out = asyncio.run(work_out)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(dest, ignore_errors=True)
    print(f"{'hidden state':<26} {'frame':>10} {'plain hop':>10} {'TLS hop':>10} {'TLS cost':>9}")
    for name in HIDDEN:
        plain, tls = out["hop_ms"][f"{name} | plain"], out["hop_ms"][f"{name} | TLS"]
        print(f"{name:<26} {out['frame_bytes'][name]:>8} B {plain:>8.3f} ms {tls:>7.3f} ms {tls - plain:>+6.3f} ms")
    rates = {mode: f"{out['shard_mb_s'][mode]:.0f} MB/s ({min(v):.0f}-{max(v):.0f})"
             for mode, v in out["shard_mb_s_all"].items()}
    print(f"shard transfer ({layers} layers), median (range) of {args.rounds}: plain {rates['plain']}, "
          f"TLS {rates['TLS']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
