"""Where a model comes from: a folder, `demo`, or a Hugging Face repo id -> a local checkpoint folder.

Owns the cache layout ($XDG_CACHE_HOME/cake-swarm), the demo model (stories260K, converted to 4 bits on
first use, atomically, from $CAKE_SWARM_DEMO_SRC, ../shared/models/stories260K beside the repository,
or a download checked against pinned sha256 sums) and the Hugging Face hub lookup (only the files a
checkpoint needs; the local HF cache alone when offline).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

import swarm

# The cache folder's name says which conversion it holds: v2 records BOS as an end token (older ones
# never stopped), so a cache from before is converted again instead of being used.
DEMO_NAME = "demo-stories260K-q4-v2"
DEMO_URL = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/"
DEMO_FILES = {
    "stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
    "tok512.model": "dfff07d929db979913f166ec94a6f5ecad4c70cfed8eb5c9cbe7e464455e46f5",
}
HF_FILES = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja",
]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelSourceError(ValueError):
    """A model spec that names nothing usable: no such folder, repo, or a download that failed its check."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cake-swarm"


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_model(spec: str, *, offline: bool | None = None) -> Path:
    """A local checkpoint folder for SPEC: an existing folder, "demo", or a Hugging Face "owner/name"."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if spec == "demo":
        return demo_model(offline=offline)
    if REPO_ID.fullmatch(spec) and not spec.startswith((".", "/", "~")):
        return hf_model(spec, offline=offline)
    raise ModelSourceError(
        f"model {spec!r}: not an existing folder; expected a checkpoint folder, 'demo', "
        "or a Hugging Face repo id such as mlx-community/Qwen2.5-0.5B-Instruct-4bit")


def hf_model(repo_id: str, *, offline: bool | None = None) -> Path:
    """Snapshot of a hub repo with just the checkpoint's files; the local HF cache only when offline."""
    from huggingface_hub import snapshot_download

    offline = _offline(offline)
    hub_cache = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HF_FILES, cache_dir=hub_cache,
                                        local_files_only=offline))
    except Exception as e:  # the hub raises many kinds (HTTP, offline, validation, missing cache entry)
        where = "in the local Hugging Face cache (offline)" if offline else "on the Hugging Face hub"
        raise ModelSourceError(f"model {repo_id!r}: not found {where}: {type(e).__name__}: {e}") from e
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model {repo_id!r}: snapshot {folder} has no config.json")
    return folder


def demo_model(*, offline: bool | None = None) -> Path:
    """The 4-bit stories260K demo folder in the cache, converted on first use."""
    from swarm.model.convert import convert_llama2c

    out = cache_dir() / "models" / DEMO_NAME
    if (out / "config.json").is_file():
        return out
    src = demo_source(offline=offline)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=out.parent))
    try:
        convert_llama2c(src, tmp, bits=4, group_size=32)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent conversion that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def demo_source(*, offline: bool | None = None) -> Path:
    """The llama2.c folder the demo is converted from."""
    env = os.environ.get("CAKE_SWARM_DEMO_SRC")
    if env:
        if not Path(env).is_dir():
            raise ModelSourceError(f"CAKE_SWARM_DEMO_SRC={env!r} is not a folder")
        return Path(env)
    beside = Path(swarm.__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
    if beside.is_dir():
        return beside
    dest = cache_dir() / "downloads" / "stories260K"
    if _offline(offline) and not all(_sha256(dest / name) == h for name, h in DEMO_FILES.items()):
        raise ModelSourceError(f"demo model: not in {dest} and offline; set CAKE_SWARM_DEMO_SRC to a stories260K folder")
    return fetch_demo_source(dest)


def fetch_demo_source(dest: Path, base_url: str = DEMO_URL) -> Path:
    """Download the demo's files into DEST, each checked against its pinned sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, expected in DEMO_FILES.items():
        target = dest / name
        if _sha256(target) == expected:
            continue
        part = dest / (name + ".part")
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(base_url + name, timeout=60) as r, open(part, "wb") as f:
                while chunk := r.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise ModelSourceError(f"demo model: download of {base_url + name} failed: {e}") from e
        if digest.hexdigest() != expected:
            part.unlink()
            raise ModelSourceError(
                f"demo model: {base_url + name} has sha256 {digest.hexdigest()}, expected {expected}")
        os.replace(part, target)
    return dest


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
