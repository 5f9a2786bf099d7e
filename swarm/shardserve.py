"""Shards over HTTP: the routes a model's source serves, and the fetch that pulls one into the cache.

Routes (GET and HEAD), served on a node's TLS peer listener only (swarm.membership), and only for requests
that pass swarm.auth.verify_request (signed for this listener's certificate, a nonce never used before):

    /shards/<model_hash>/<start>-<end>-f<0|1>l<0|1>   the stage's model.safetensors, built into the source's cache
                                                     on first request; Range (one range) -> 206, ETag = "<sha256>"
    /shards/<model_hash>/files/<name>                 config.json, tokenizer.json, tokenizer_config.json,
                                                     generation_config.json; ETag = "<sha256>"

Anything else under /shards/ (unknown model or stage, '..', a bad byte range, no or wrong signature, a replay)
is a 4xx with a log line and no body from disk; a signature whose time is outside the window says by how
much the clocks differ (X-Cake-Skew). The fetch goes through a swarm.tls.PeerClient, pinned to the
certificate the source's handshake proved; it streams to <stage>.partial/model.safetensors.part, resumes
with Range + If-Range after a cut, checks the sha256 against the ETag and only then renames the folder into
the cache (swarm.shards.shard_dir).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import aiohttp
from aiohttp import web

from swarm.auth import MAX_SKEW_S, SKEW_HEADER, Nonces, sign_request, skew_words, verify_request
from swarm.shards import (SHARD_FILE, SIDE_FILES, ModelProfile, ShardError, check_stage, ensure_shard,
                          parse_stage_name, read_manifest, shard_dir, stage_name, write_manifest)
from swarm.tensorfile import TensorFileError, read_header
from swarm.tls import Endpoint, PeerClient

log = logging.getLogger("swarm.shards")

Progress = Callable[[int, int, float], None]   # (bytes_done, bytes_total, rate_bytes_per_s)
WRITE_BYTES = 4 << 20
MAX_SIDE_FILE_BYTES = 64 << 20
ATTEMPTS = 5
SIDE_FILES_HEADER = "X-Cake-Side-Files"   # on a shard response: which side files the source has
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


# -- serving -----------------------------------------------------------------------------------------------

def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(offset, count) of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range within size; None if unsatisfiable."""
    m = _RANGE.fullmatch(value.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if m.group(1):
        first = int(m.group(1))
        last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if first >= size or last < first:
            return None
    else:
        suffix = int(m.group(2))
        if suffix == 0:
            return None
        first, last = max(0, size - suffix), size - 1
    return first, last - first + 1


def _refuse(request: web.Request, exc: type[web.HTTPException], reason: str, **kw) -> web.HTTPException:
    log.warning("shard request refused (%d): %s %s from %s: %s", exc.status_code, request.method, request.path_qs,
                request.remote, reason)
    return exc(text=reason + "\n", **kw)


async def send_file(request: web.Request, path: Path, sha256: str, size: int,
                    extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Serve a file whose sha256 is known: ETag, one byte range, If-Range; the body through sendfile."""
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **(extra_headers or {})}
    wanted = request.headers.get("Range")
    if wanted is not None and request.headers.get("If-Range", etag) != etag:
        wanted = None   # the receiver's partial copy is of another file: send all of this one
    offset, count, status = 0, size, 200
    if wanted is not None:
        span = parse_range(wanted, size)
        if span is None:
            raise _refuse(request, web.HTTPRequestRangeNotSatisfiable, f"bad range {wanted!r} for {size} bytes",
                          headers={"Content-Range": f"bytes */{size}"})
        (offset, count), status = span, 206
        headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = count
    with open(path, "rb") as f:
        await response.prepare(request)
        if request.method != "HEAD":
            if request.transport is None:
                raise ConnectionResetError("client went away")
            try:
                await asyncio.get_running_loop().sendfile(request.transport, f, offset, count)
            except NotImplementedError:  # uvloop has no loop.sendfile: plain writes
                f.seek(offset)
                while count > 0:
                    chunk = f.read(min(count, 1 << 20))
                    await response.write(chunk)
                    count -= len(chunk)
            except ConnectionError as e:
                raise ConnectionResetError(str(e)) from None
    await response.write_eof()
    return response


class ShardServer:
    """The shard routes of a node: the models it holds, by hash, built into its cache on demand.

    `fingerprint` is the certificate of the TLS listener serving the routes: requests are signed for it."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, key: str | None = None,
                 profiles: tuple[ModelProfile, ...] | list[ModelProfile] = (), fingerprint: str | None = None):
        self.cache_dir = cache_dir
        self.key = key
        self.fingerprint = fingerprint
        self.nonces = Nonces()
        self.profiles: dict[str, ModelProfile] = {p.model_hash: p for p in profiles}
        self._builds: dict[tuple[str, str], asyncio.Lock] = {}
        self._side_sha: dict[Path, tuple[int, str]] = {}

    def add_model(self, profile: ModelProfile) -> None:
        self.profiles[profile.model_hash] = profile

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/shards/{model_hash}/files/{name}", self.side_file),
                web.get("/shards/{model_hash}/{stage}", self.shard),
                web.route("*", "/shards/{tail:.*}", self.unknown)]

    def _check(self, request: web.Request) -> None:
        refusal = verify_request(self.key, request.method, request.path_qs, request.headers, self.fingerprint,
                                 self.nonces)
        if refusal is not None:
            skew = {} if refusal.skew_s is None else {"headers": {SKEW_HEADER: str(refusal.skew_s)}}
            raise _refuse(request, web.HTTPUnauthorized, refusal.reason, **skew)
        if ".." in request.path or ".." in request.raw_path:
            raise _refuse(request, web.HTTPBadRequest, "'..' in path")

    def _admit(self, request: web.Request) -> ModelProfile:
        self._check(request)
        profile = self.profiles.get(request.match_info["model_hash"])
        if profile is None:
            raise _refuse(request, web.HTTPNotFound, "unknown model")
        return profile

    async def shard(self, request: web.Request) -> web.StreamResponse:
        profile = self._admit(request)
        try:
            start, end, first, last = parse_stage_name(request.match_info["stage"])
            check_stage(profile, start, end)
        except ShardError as e:
            raise _refuse(request, web.HTTPNotFound, str(e)) from None
        lock = self._builds.setdefault((profile.model_hash, request.match_info["stage"]), asyncio.Lock())
        async with lock:
            try:
                folder, manifest = await asyncio.to_thread(ensure_shard, profile, start, end, first, last, self.cache_dir)
            except (ShardError, OSError) as e:
                log.error("cannot build shard %s of %s: %s", stage_name(start, end, first, last), profile.model_dir, e)
                raise web.HTTPInternalServerError(text="cannot build the shard\n") from None
        return await send_file(request, folder / SHARD_FILE, manifest["sha256"], manifest["size"],
                               {SIDE_FILES_HEADER: ",".join(profile.side_files)})

    async def side_file(self, request: web.Request) -> web.StreamResponse:
        profile = self._admit(request)
        name = request.match_info["name"]
        if name not in profile.side_files:
            if name in SIDE_FILES:  # one this model has not (often generation_config.json): an answer, not a refusal
                raise web.HTTPNotFound(text=f"no side file {name!r}\n")
            raise _refuse(request, web.HTTPNotFound, f"no side file {name!r}")
        path = profile.model_dir / name
        size, sha = await asyncio.to_thread(self._file_sha, path)
        return await send_file(request, path, sha, size)

    def _file_sha(self, path: Path) -> tuple[int, str]:
        if path not in self._side_sha:
            data = path.read_bytes()
            self._side_sha[path] = (len(data), hashlib.sha256(data).hexdigest())
        return self._side_sha[path]

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        self._check(request)
        raise _refuse(request, web.HTTPNotFound, "no such shard path")


def shard_app(server: ShardServer) -> web.Application:
    """An application with only the shard routes (the daemon serves server.routes() on its peer listener)."""
    app = web.Application()
    app.add_routes(server.routes())
    return app


# -- fetching ----------------------------------------------------------------------------------------------

def _hash_prefix(path: Path, size: int):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while size:
            chunk = f.read(min(size, 8 << 20))
            if not chunk:
                raise ShardError(f"{path}: shrank while resuming")
            h.update(chunk)
            size -= len(chunk)
    return h


def _append(f, h, chunks: list[bytes]) -> int:
    f.writelines(chunks)   # no joined copy: fresh memory is slow to touch on small VMs
    for chunk in chunks:
        h.update(chunk)
    return sum(map(len, chunks))


class _Cut(Exception):
    """The transfer stopped after some bytes arrived: worth resuming."""


async def _find(client: PeerClient, base_url: str) -> Endpoint:
    try:
        return await client.find(base_url)
    except ConnectionError as e:
        raise ShardError(f"cannot fetch from {base_url}: {e}") from None


async def _refused(url: str, response: aiohttp.ClientResponse) -> ShardError:
    skew = response.headers.get(SKEW_HEADER, "")
    if response.status == 401 and re.fullmatch(r"-?\d{1,12}", skew):   # the request's time - the source's
        return ShardError(f"{url}: refused: this node's clock is {skew_words(int(skew))} the source's, more than "
                          f"the {MAX_SKEW_S} s a signed request is good for: set both clocks (NTP)")
    return ShardError(f"{url}: the source answered {response.status} "
                      f"{(await response.text(errors='replace'))[:200].strip()!r}")


async def _pull(client: PeerClient, source: Endpoint, url_path, part: Path, etag_file: Path, key, timeout, progress,
                started) -> tuple[str, int, list[str]] | None:
    """One GET of the shard into part; (sha256, size, side files) when complete, None to try again from scratch."""
    url = source.url + url_path
    have = part.stat().st_size if part.exists() else 0
    etag = etag_file.read_text() if have and etag_file.exists() else None
    headers = sign_request(key, "GET", url_path, source.fingerprint)
    if etag:
        headers.update({"Range": f"bytes={have}-", "If-Range": etag})
    # a read buffer as large as a write lets the socket fill while the previous block goes to disk
    async with client.session.get(url, headers=headers, ssl=source.pin, timeout=timeout,
                                  read_bufsize=WRITE_BYTES) as response:
        if response.status == 416 and etag:
            m = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:   # cut after the last byte, before the check
                return (await asyncio.to_thread(_hash_prefix, part, have)).hexdigest(), have, list(SIDE_FILES)
            part.unlink(missing_ok=True)
            return None
        if response.status not in (200, 206):
            raise await _refused(url, response)
        new_etag = response.headers.get("ETag", "")
        if not re.fullmatch(r'"[0-9a-f]{64}"', new_etag):
            raise ShardError(f"{url}: the source sent no sha256 ETag ({new_etag!r})")
        if response.status == 206:
            m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not m or new_etag != etag or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                return None
            total, mode = int(m.group(3)), "ab"
            h = await asyncio.to_thread(_hash_prefix, part, have)
        else:
            if response.content_length is None:
                raise ShardError(f"{url}: the source sent no Content-Length")
            total, mode, have, h = response.content_length, "wb", 0, hashlib.sha256()
            etag_file.write_text(new_etag)
        got_before = have
        side_files = [n for n in response.headers.get(SIDE_FILES_HEADER, ",".join(SIDE_FILES)).split(",") if n]
        last_report = 0.0
        cut = None
        with open(part, mode) as f:
            chunks: list[bytes] = []
            buffered = 0
            try:
                async for chunk in response.content.iter_any():
                    chunks.append(chunk)
                    buffered += len(chunk)
                    if buffered >= WRITE_BYTES:
                        pending, chunks, buffered = chunks, [], 0
                        have += await asyncio.to_thread(_append, f, h, pending)
                        now = time.monotonic()
                        if progress and now - last_report >= 0.1:
                            last_report = now
                            progress(have, total, (have - got_before) / max(now - started, 1e-6))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                cut = e
            finally:   # also when the task is cancelled: what arrived is kept for the resume
                have += _append(f, h, chunks)
        if cut is not None:
            if have > got_before:
                raise _Cut(f"{cut.__class__.__name__}: {cut}") from cut
            raise cut
    if have != total:
        raise _Cut(f"got {have} of {total} bytes")
    if progress:
        progress(have, total, (have - got_before) / max(time.monotonic() - started, 1e-6))
    if f'"{h.hexdigest()}"' != new_etag:
        part.unlink(missing_ok=True)
        etag_file.unlink(missing_ok=True)
        raise ShardError(f"{url}: corrupt transfer: sha256 {h.hexdigest()}, the source says {new_etag}; nothing cached")
    return h.hexdigest(), have, side_files


async def _get_side_file(client: PeerClient, source: Endpoint, url_path: str, dest: Path, key: str | None,
                         timeout: aiohttp.ClientTimeout | None) -> bool:
    url = source.url + url_path
    options = {"timeout": timeout} if timeout is not None else {}
    async with client.session.get(url, headers=sign_request(key, "GET", url_path, source.fingerprint),
                                  ssl=source.pin, **options) as response:
        if response.status == 404:
            return False
        if response.status != 200:
            raise await _refused(url, response)
        if (response.content_length or 0) > MAX_SIDE_FILE_BYTES:
            raise ShardError(f"{url}: {response.content_length} bytes is too large for a side file")
        data = await response.read()
        if f'"{hashlib.sha256(data).hexdigest()}"' != response.headers.get("ETag"):
            raise ShardError(f"{url}: corrupt transfer (sha256 does not match the ETag)")
    dest.write_bytes(data)
    return True


async def fetch_side_file(client: PeerClient, base_url: str, url_path: str, dest: Path, key: str | None,
                          timeout: aiohttp.ClientTimeout | None = None) -> bool:
    """GET one side file (url_path = /shards/<hash>/files/<name>) from the node whose dashboard is base_url
    into dest, checked against its sha256 ETag; False when the source does not have it."""
    return await _get_side_file(client, await _find(client, base_url), url_path, dest, key, timeout)


async def fetch_shard(client: PeerClient, base_url: str, model_hash: str, start: int, end: int,
                      first: bool, last: bool, cache_dir: str | os.PathLike | None = None, key: str | None = None,
                      progress: Progress | None = None, *, connect_timeout: float = 10.0,
                      read_timeout: float = 30.0) -> Path:
    """The cached shard folder of a stage, pulled when missing from the source whose dashboard is base_url
    (http://host:port; `client` finds its TLS listener and certificate).

    A cut transfer is resumed (here, up to ATTEMPTS times while bytes keep coming, and by a later call from the
    .part left behind); a source that cannot be reached, refuses, or sends bytes that do not match its sha256
    raises ShardError, and nothing corrupt is ever left in the cache."""
    dest = shard_dir(cache_dir, model_hash, start, end, first, last)
    manifest = read_manifest(dest)
    if manifest is not None:
        if progress:
            progress(manifest["size"], manifest["size"], 0.0)
        return dest
    stage = stage_name(start, end, first, last)
    staging = dest.with_name(f".{stage}.partial")
    staging.mkdir(parents=True, exist_ok=True)
    part, etag_file = staging / (SHARD_FILE + ".part"), staging / "etag"
    base_url = base_url.rstrip("/")
    source = await _find(client, base_url)
    url_path = f"/shards/{model_hash}/{stage}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
    started = time.monotonic()
    result = None
    for _ in range(ATTEMPTS):
        try:
            result = await _pull(client, source, url_path, part, etag_file, key, timeout, progress, started)
        except _Cut as e:
            log.info("shard %s from %s cut (%s); resuming from byte %d", stage, base_url, e,
                     part.stat().st_size if part.exists() else 0)
            continue
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ShardError(f"cannot fetch shard {stage} from {base_url}: {e.__class__.__name__} {e}") from None
        if result is not None:
            break
    if result is None:
        raise ShardError(f"shard {stage} from {base_url}: still incomplete after {ATTEMPTS} attempts; "
                         f"the next fetch resumes it")
    sha, size, side_files = result

    try:
        for name in ["config.json"] + [n for n in side_files if n in SIDE_FILES and n != "config.json"]:
            if not await _get_side_file(client, source, f"/shards/{model_hash}/files/{name}", staging / name,
                                        key, timeout) and name == "config.json":
                raise ShardError(f"{base_url}: the source has no config.json for model {model_hash}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise ShardError(f"cannot fetch the side files of {model_hash} from {base_url}: {e}") from None
    try:
        tensors = list(read_header(part)[0])
        num_layers = json.loads((staging / "config.json").read_bytes())["num_hidden_layers"]
    except (TensorFileError, ValueError, KeyError, TypeError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ShardError(f"shard {stage} from {base_url} is not usable: {e}") from None
    os.replace(part, staging / SHARD_FILE)
    etag_file.unlink(missing_ok=True)
    write_manifest(staging, model_hash, start, end, first, last, num_layers, sha, size, tensors)
    try:
        os.replace(staging, dest)
    except OSError:
        if read_manifest(dest) is None:   # not another fetch that finished first
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return dest
