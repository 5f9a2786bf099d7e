"""Shards over HTTPS on 127.0.0.1 (swarm.shardserve): Range/ETag serving, refusals, resumed and verified fetches.

The source serves over TLS with an identity of its own (swarm.tls), as a node's peer listener does; the
fetches pin its certificate and sign for it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from swarm.auth import sign_request
from swarm.shardserve import ShardServer, fetch_shard, parse_range, shard_app
from swarm.shards import (MANIFEST_FILE, SHARD_FILE, ShardError, ensure_shard, profile_model, shard_dir,
                          shard_layout)
from swarm.tls import Endpoint, PeerClient, load_identity

KEY = "test cluster key"


@pytest.fixture
def model(tmp_path, tiny_qwen2) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_qwen2.folder / name, folder / name)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [{"id": 1, "content": "x"}]}))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    return folder


@pytest.fixture
def identity(tmp_path):
    """The source's key and certificate."""
    return load_identity(tmp_path / "source-config")


async def serve(app: web.Application, identity):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=identity.server_context())
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"https://{host}:{port}"


@pytest.fixture
async def source(model, tmp_path, identity):
    """A shard source on 127.0.0.1 with the cluster key, over TLS; yields (server, base_url)."""
    server = ShardServer(cache_dir=tmp_path / "source-cache", key=KEY, profiles=[profile_model(model)],
                         fingerprint=identity.fingerprint)
    runner, url = await serve(shard_app(server), identity)
    yield server, url
    await runner.cleanup()


@pytest.fixture
async def session(identity):
    """A peer client that takes every base URL as the source's TLS listener, pinned to its certificate."""
    async def find(base_url):
        return Endpoint(base_url, identity.fingerprint)

    client = PeerClient(find)
    yield client
    await client.close()


class Proxy:
    """A test-only hop in front of the source: passes requests through and records them, and on the first
    request for a shard file cuts the body at `cut` bytes (mode "close" or "stall") or flips one byte ("flip").
    It shows the source's own certificate (it has its key), so the fetch's pin and signature hold through it."""

    def __init__(self, upstream: str, fingerprint: str, mode: str | None, cut: int = 0):
        self.upstream, self.fingerprint, self.mode, self.cut = upstream, fingerprint, mode, cut
        self.requests: list[dict] = []
        self.stalled, self.release = asyncio.Event(), asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"path": request.path, **{k.lower(): v for k, v in request.headers.items()}})
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with aiohttp.ClientSession() as s:
            async with s.get(URL(self.upstream + request.path_qs, encoded=True), headers=headers,
                             ssl=Endpoint(self.upstream, self.fingerprint).pin) as up:
                body = await up.read()
                keep = ("ETag", "Content-Range", "Accept-Ranges", "Content-Type")
                response = web.StreamResponse(status=up.status, headers={k: up.headers[k] for k in keep if k in up.headers})
        response.content_length = len(body)
        mode = self.mode if "/files/" not in request.path and up.status in (200, 206) else None
        if mode:
            self.mode = None
        await response.prepare(request)
        if mode == "flip":
            body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 1]) + body[len(body) // 2 + 1:]
        if mode in ("close", "stall"):
            await response.write(body[:self.cut])
            if mode == "stall":
                self.stalled.set()
                await self.release.wait()
            request.transport.close()
            return response
        await response.write(body)
        await response.write_eof()
        return response


@pytest.fixture
async def proxy_factory(source, identity):
    made = []

    async def make(mode, cut=0):
        proxy = Proxy(source[1], identity.fingerprint, mode, cut)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy.handle)
        runner, url = await serve(app, identity)
        made.append((proxy, runner))
        return proxy, url

    yield make
    for proxy, runner in made:
        proxy.release.set()
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def get(client, url, path, key=KEY, headers=None, method="GET"):
    source = await client.find(url)
    h = dict(sign_request(key, method, path, source.fingerprint)) if key else {}
    h.update(headers or {})
    async with client.session.request(method, URL(url + path, encoded=True), headers=h, ssl=source.pin) as r:
        return r.status, r.headers.copy(), await r.read()


# -- serving -------------------------------------------------------------------------------------------------

def test_parse_range():
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 10)
    assert parse_range("bytes=95-200", 100) == (95, 5)
    assert parse_range("bytes=-5", 100) == (95, 5)
    for bad in ("bytes=100-", "bytes=5-4", "bytes=-0", "bytes=-", "bytes=0-1,3-4", "items=0-1", "bytes=a-b"):
        assert parse_range(bad, 100) is None, bad


async def test_serves_ranges_with_sha256_etag(source, session, model, tmp_path):
    server, url = source
    p = profile_model(model)
    path = f"/shards/{p.model_hash}/0-3-f1l0"
    status, headers, body = await get(session, url, path)
    _, manifest = ensure_shard(p, 0, 3, True, False, tmp_path / "source-cache")
    assert status == 200 and hashlib.sha256(body).hexdigest() == manifest["sha256"]
    assert headers["ETag"] == f'"{manifest["sha256"]}"' and headers["Accept-Ranges"] == "bytes"
    assert headers["X-Cake-Side-Files"] == "config.json,tokenizer.json,tokenizer_config.json"
    assert body == (shard_dir(tmp_path / "source-cache", p.model_hash, 0, 3, True, False) / SHARD_FILE).read_bytes()

    status, headers, part = await get(session, url, path, headers={"Range": "bytes=100-199"})
    assert status == 206 and part == body[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(body)}"
    status, _, part = await get(session, url, path, headers={"Range": "bytes=-7"})
    assert status == 206 and part == body[-7:]
    status, _, part = await get(session, url, path, headers={"Range": "bytes=100-", "If-Range": headers["ETag"]})
    assert status == 206 and part == body[100:]
    status, _, part = await get(session, url, path, headers={"Range": "bytes=100-", "If-Range": '"other"'})
    assert status == 200 and part == body
    status, headers, part = await get(session, url, path, method="HEAD")
    assert status == 200 and part == b"" and int(headers["Content-Length"]) == len(body)

    status, _, part = await get(session, url, f"/shards/{p.model_hash}/files/tokenizer.json")
    assert status == 200 and part == (model / "tokenizer.json").read_bytes()


async def test_refusals_are_4xx_with_a_log_line_and_serve_nothing(source, session, model, caplog):
    server, url = source
    h = profile_model(model).model_hash
    stage = f"/shards/{h}/0-3-f1l0"
    cases = [
        (stage, "no key", None, {}, 401),
        (stage, "wrong key", "another key", {}, 401),
        (stage, "signed for another certificate", None, sign_request(KEY, "GET", stage, "ab" * 32), 401),
        (f"/shards/{'0' * 32}/0-3-f1l0", "unknown model", KEY, {}, 404),
        (f"/shards/{h}/0-7-f1l0", "layers past the model", KEY, {}, 404),
        (f"/shards/{h}/3-3-f0l0", "empty stage", KEY, {}, 404),
        (f"/shards/{h}/model.safetensors", "not a stage name", KEY, {}, 404),
        (stage, "bad byte range", KEY, {"Range": "bytes=99999999-"}, 416),
        (stage, "malformed byte range", KEY, {"Range": "bytes=1-2,5-6"}, 416),
        (f"/shards/{h}/files/..%2Fmodel.safetensors", "encoded ..", KEY, {}, 400),
        (f"/shards/{h}/files/../model.safetensors", "raw ..", KEY, {}, 400),
        (f"/shards/{h}/files/model.safetensors", "not a side file", KEY, {}, 404),
        (f"/shards/{h}/0-3-f1l0/extra", "no such path", KEY, {}, 404),
    ]
    for path, why, key, headers, expected in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="swarm.shards"):
            status, _, body = await get(session, url, path, key=key, headers=headers)
        assert status == expected, why
        assert len(body) < 300 and b"model.layers" not in body and b"__metadata__" not in body, why
        assert any("refused" in r.getMessage() and path.split("?")[0] in r.getMessage() for r in caplog.records), why
    assert not (server.cache_dir / "shards" / ("0" * 32)).exists()
    # a side file this model has not is an answer (fetchers ask for it), not a refusal
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="swarm.shards"):
        status, _, _ = await get(session, url, f"/shards/{h}/files/generation_config.json")
    assert status == 404 and not caplog.records


async def test_concurrent_requests_build_once(source, session, model, tmp_path):
    server, url = source
    h = profile_model(model).model_hash
    results = await asyncio.gather(*(get(session, url, f"/shards/{h}/2-6-f0l1") for _ in range(4)))
    assert len({hashlib.sha256(body).hexdigest() for _, _, body in results}) == 1
    assert [status for status, _, _ in results] == [200] * 4
    assert [p.name for p in (tmp_path / "source-cache" / "shards" / h).iterdir()] == ["2-6-f0l1"]


# -- fetching ------------------------------------------------------------------------------------------------

async def test_fetch_verifies_caches_and_reuses(source, session, model, tmp_path):
    _, url = source
    p = profile_model(model)
    reports = []
    folder = await fetch_shard(session, url, p.model_hash, 3, 6, False, True, tmp_path / "node", KEY,
                               progress=lambda *a: reports.append(a))
    assert folder == tmp_path / "node" / "shards" / p.model_hash / "3-6-f0l1"
    assert sorted(x.name for x in folder.iterdir()) == sorted(
        [SHARD_FILE, MANIFEST_FILE, "config.json", "tokenizer.json", "tokenizer_config.json"])
    local, manifest = ensure_shard(p, 3, 6, False, True, tmp_path / "local")
    assert (folder / SHARD_FILE).read_bytes() == (local / SHARD_FILE).read_bytes()
    assert json.loads((folder / MANIFEST_FILE).read_text()) == manifest
    assert reports and reports[-1][0] == reports[-1][1] == manifest["size"]
    assert not list((tmp_path / "node" / "shards" / p.model_hash).glob(".*"))   # no partial left behind

    # reused with no request: the source is gone
    again = await fetch_shard(session, f"http://127.0.0.1:{free_port()}", p.model_hash, 3, 6, False, True,
                              tmp_path / "node", KEY)
    assert again == folder


async def test_fetch_resumes_after_the_source_cuts_the_connection(source, proxy_factory, session, model, tmp_path):
    p = profile_model(model)
    _, manifest = ensure_shard(p, 0, 6, True, True, tmp_path / "local")
    proxy, url = await proxy_factory("close", cut=manifest["size"] // 2)
    folder = await fetch_shard(session, url, p.model_hash, 0, 6, True, True, tmp_path / "node", KEY)
    shard_requests = [r for r in proxy.requests if "/files/" not in r["path"]]
    assert len(shard_requests) == 2 and "range" not in shard_requests[0]
    assert shard_requests[1]["range"] == f"bytes={manifest['size'] // 2}-"
    assert shard_requests[1]["if-range"] == f'"{manifest["sha256"]}"'
    assert hashlib.sha256((folder / SHARD_FILE).read_bytes()).hexdigest() == manifest["sha256"]


async def test_fetch_resumes_after_the_receiver_was_killed(source, proxy_factory, session, model, tmp_path):
    p = profile_model(model)
    _, manifest = ensure_shard(p, 1, 4, False, False, tmp_path / "local")
    proxy, url = await proxy_factory("stall", cut=manifest["size"] // 3)
    task = asyncio.create_task(fetch_shard(session, url, p.model_hash, 1, 4, False, False, tmp_path / "node", KEY))
    await asyncio.wait_for(proxy.stalled.wait(), 30)
    await asyncio.sleep(0.2)   # let the client take in what was sent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    part = next((tmp_path / "node" / "shards" / p.model_hash).glob(".*/model.safetensors.part"))
    kept = part.stat().st_size
    assert 0 < kept <= manifest["size"] // 3

    folder = await fetch_shard(session, url, p.model_hash, 1, 4, False, False, tmp_path / "node", KEY)
    assert proxy.requests[1]["range"] == f"bytes={kept}-"
    assert hashlib.sha256((folder / SHARD_FILE).read_bytes()).hexdigest() == manifest["sha256"]


async def test_a_partial_of_another_file_is_restarted_not_spliced(source, proxy_factory, session, model, tmp_path):
    p = profile_model(model)
    _, manifest = ensure_shard(p, 0, 2, True, False, tmp_path / "local")
    staging = shard_dir(tmp_path / "node", p.model_hash, 0, 2, True, False)
    staging = staging.with_name(".0-2-f1l0.partial")
    staging.mkdir(parents=True)
    (staging / "model.safetensors.part").write_bytes(b"\xff" * 1000)
    (staging / "etag").write_text('"' + "ab" * 32 + '"')   # the source's file changed since
    proxy, url = await proxy_factory(None)
    folder = await fetch_shard(session, url, p.model_hash, 0, 2, True, False, tmp_path / "node", KEY)
    assert proxy.requests[0]["if-range"] == '"' + "ab" * 32 + '"'
    assert hashlib.sha256((folder / SHARD_FILE).read_bytes()).hexdigest() == manifest["sha256"]


async def test_a_corrupted_byte_is_detected_and_nothing_cached(source, proxy_factory, session, model, tmp_path):
    p = profile_model(model)
    proxy, url = await proxy_factory("flip")
    with pytest.raises(ShardError, match="corrupt"):
        await fetch_shard(session, url, p.model_hash, 2, 6, False, True, tmp_path / "node", KEY)
    dest = shard_dir(tmp_path / "node", p.model_hash, 2, 6, False, True)
    assert not dest.exists()
    assert not list(dest.parent.glob(".*/*.part"))
    # and the next try, clean, succeeds
    folder = await fetch_shard(session, url, p.model_hash, 2, 6, False, True, tmp_path / "node", KEY)
    assert (folder / MANIFEST_FILE).exists()


async def test_refused_or_dead_sources_fail_with_shard_error(source, session, model, tmp_path):
    _, url = source
    h = profile_model(model).model_hash
    with pytest.raises(ShardError, match="401"):
        await fetch_shard(session, url, h, 0, 2, True, False, tmp_path / "node", "wrong key")
    with pytest.raises(ShardError, match="404"):
        await fetch_shard(session, url, "f" * 32, 0, 2, True, False, tmp_path / "node", KEY)
    with pytest.raises(ShardError, match="cannot fetch"):
        await fetch_shard(session, f"https://127.0.0.1:{free_port()}", h, 0, 2, True, False, tmp_path / "node", KEY)

    silent = socket.socket()   # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        with pytest.raises(ShardError, match="cannot fetch"):
            await fetch_shard(session, f"https://127.0.0.1:{silent.getsockname()[1]}", h, 0, 2, True, False,
                              tmp_path / "node", KEY, read_timeout=0.5)
    finally:
        silent.close()
    assert not shard_dir(tmp_path / "node", h, 0, 2, True, False).exists()


# -- memory of the serving node ------------------------------------------------------------------------------

SERVE = """
import asyncio, sys
from aiohttp import web
from swarm.shards import profile_model
from swarm.shardserve import ShardServer, shard_app
from swarm.tls import load_identity

async def main():
    profile = profile_model(sys.argv[1])
    identity = load_identity(sys.argv[4])
    runner = web.AppRunner(shard_app(ShardServer(sys.argv[2], sys.argv[3], [profile], identity.fingerprint)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=identity.server_context()).start()
    print(runner.addresses[0][1], profile.model_hash, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_serving_7b_shaped_shards_streams_in_constant_memory(tmp_path, session, identity):
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("make_model", Path(__file__).resolve().parents[1] / "scripts" / "make_model.py")
    make_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_model)
    # qwen2.5-7b tensors (its 272 MB embedding and lm_head among them), one layer of the 28
    model = make_model.make_model("qwen2.5-7b", tmp_path / "m7", layers=1)
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(model), str(tmp_path / "source-cache"), KEY,
                             str(identity.path.parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port, model_hash = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)).split()
        url = f"https://127.0.0.1:{port}"
        folder = await fetch_shard(session, url, model_hash, 0, 1, True, True, tmp_path / "node", KEY)
        size = json.loads((folder / MANIFEST_FILE).read_text())["size"]
        assert size == shard_layout(profile_model(model), 0, 1, True, True).size
        assert size > 3 * 300_000_000 // 2   # well past the limit below: the stream cannot all be in memory
        assert peak_rss(proc.pid) < 300_000_000
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp_path, ignore_errors=True)
