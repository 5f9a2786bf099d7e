"""Shard benchmarks: build time of a 7B-shaped checkpoint's shards, loopback transfer beside `cp`, serving RSS.

    python scripts/bench_shards.py [--model DIR] [--workdir DIR] [--dest DIR] [--keep]

Without --model, writes a qwen2.5-7b-shaped random 4-bit checkpoint with scripts/make_model.py into the
work folder first. Shards, caches and the `cp` copy go to --dest (default: the work folder; a tmpfs such as
/dev/shm takes the disk's write speed out of the figures). `sync` runs before each timed step. In one run:
  1. profile the checkpoint (headers only) and build the shards of a three-node split (thirds);
  2. start a serving process (swarm.shardserve on 127.0.0.1; uvloop on both sides where installed) and have it build the
     whole-model shard (one HEAD), then fetch that shard over loopback with fetch_shard (stream, sha256
     check, rename), and `cp` the same file on the same disk; two rounds, the best of each;
  3. read the serving process's peak RSS (VmHWM) after all of it.
Prints the figures as a table and as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swarm.shards import profile_model, shard_dir, write_shard_folder  # noqa: E402
from swarm.shardserve import fetch_shard  # noqa: E402

SERVE = """
import asyncio, sys
from aiohttp import web
from swarm.shards import profile_model
from swarm.shardserve import ShardServer, shard_app

async def main():
    profile = profile_model(sys.argv[1])
    runner = web.AppRunner(shard_app(ShardServer(sys.argv[2], None, [profile])))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], profile.model_hash, flush=True)
    await asyncio.Event().wait()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def make_7b(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_model", ROOT / "scripts" / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_model("qwen2.5-7b", out)


async def transfer(url: str, model_hash: str, layers: int, cache: Path) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{url}/shards/{model_hash}/0-{layers}-f1l1") as r:   # the source builds it
            r.raise_for_status()
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        await fetch_shard(session, url, model_hash, 0, layers, True, True, cache)
        return time.perf_counter() - t


def cp(src: Path, dst: Path) -> float:
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    return time.perf_counter() - t


def run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a 7B-shaped checkpoint (default: write one with make_model.py)")
    ap.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    ap.add_argument("--dest", type=Path, help="where shards and copies go (default: the work folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work and dest folders")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.dest)) if args.dest else work
    results: dict = {}
    proc = None
    try:
        model = args.model
        if model is None:
            t = time.perf_counter()
            model = make_7b(work / "qwen2.5-7b-shaped")
            results["make_model_s"] = round(time.perf_counter() - t, 1)

        t = time.perf_counter()
        profile = profile_model(model)
        results["profile_s"] = round(time.perf_counter() - t, 3)
        n = profile.num_layers
        thirds = [(0, n // 3), (n // 3, 2 * n // 3), (2 * n // 3, n)]
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        built = sum(write_shard_folder(profile, a, b, a == 0, b == n, dest / "split" / f"{a}-{b}")["size"]
                    for a, b in thirds)
        results["build_thirds_s"] = round(time.perf_counter() - t, 2)
        shutil.rmtree(dest / "split")
        results["build_thirds_bytes"] = built
        results["build_thirds_GBps"] = round(built / results["build_thirds_s"] / 1e9, 2)

        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(model), str(dest / "source-cache")],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        port, model_hash = proc.stdout.readline().split()
        # Two rounds, best of each: a VM is slow to touch memory it never used before, and whichever
        # ran first would pay for it.
        fetch_s, cp_s = [], []
        for _ in range(2):
            fetch_s.append(run(transfer(f"http://127.0.0.1:{port}", model_hash, n, dest / "node-cache")))
            shutil.rmtree(dest / "node-cache")
            served = shard_dir(dest / "source-cache", model_hash, 0, n, True, True) / "model.safetensors"
            cp_s.append(cp(served, dest / "cp-copy"))
            (dest / "cp-copy").unlink()
        size = served.stat().st_size
        results["shard_bytes"] = size
        results["fetch_GBps"] = [round(size / s / 1e9, 2) for s in fetch_s]
        results["cp_GBps"] = [round(size / s / 1e9, 2) for s in cp_s]
        results["serving_peak_rss_MB"] = round(peak_rss(proc.pid) / 1e6, 1)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if not args.keep:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)

    rows = [("7B-shaped checkpoint, tensor bytes", f"{profile.total_bytes / 1e9:.2f} GB, {n} layers"),
            ("profile (headers only)", f"{results['profile_s']} s"),
            ("build the shards of a 3-way split", f"{results['build_thirds_s']} s ({results['build_thirds_GBps']} GB/s)"),
            ("fetch the whole-model shard over loopback", f"{max(results['fetch_GBps'])} GB/s (stream + sha256 + rename)"),
            ("cp of the same file", f"{max(results['cp_GBps'])} GB/s"),
            ("peak RSS of the serving process", f"{results['serving_peak_rss_MB']} MB")]
    for what, figure in rows:
        print(f"{what:45s} {figure}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
