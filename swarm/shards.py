"""Reduced single-file shards: the model profile, the layout of a stage's shard, building it, the cache, split.

A shard is a folder that the engine loads as a checkpoint of its own:

    model.safetensors   the stage's tensors (embedding when first, or last with a tied head; layers [start, end);
                        final norm and lm_head when last), under their original names, in one safetensors file
    shard.json          which part of which model it is, and the sha256 of model.safetensors
    config.json, tokenizer.json, tokenizer_config.json, generation_config.json   copied when the source has them

Everything here works from the safetensors headers (swarm.tensorfile) and copies tensor bytes by their byte
ranges in constant memory, so the same input always gives the same bytes and the same sha256. HTTP serving
and fetching live in swarm.shardserve.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from swarm.tensorfile import TensorFileError, TensorInfo, read_header

SHARD_FILE = "model.safetensors"
MANIFEST_FILE = "shard.json"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
CHUNK_BYTES = 8 << 20
HASH_SAMPLE_BYTES = 4 << 10

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_STAGE = re.compile(r"(\d{1,7})-(\d{1,7})-f([01])l([01])")


class ShardError(ValueError):
    """A model that cannot be profiled, a stage that does not exist, a shard that is missing or corrupt."""


@dataclass(frozen=True)
class ModelProfile:
    """Where every tensor of a checkpoint is, grouped as a pipeline needs them; from the headers alone."""

    model_dir: Path
    model_hash: str
    num_layers: int
    layers: tuple[tuple[TensorInfo, ...], ...]   # layers[i]: tensors named model.layers.i.*, sorted by name
    embed: tuple[TensorInfo, ...]                # model.embed_tokens.*
    norm: tuple[TensorInfo, ...]                 # model.norm.*
    head: tuple[TensorInfo, ...]                 # lm_head.*; empty when tied
    tied: bool                                   # the head is the embedding
    metadata: tuple[tuple[str, str], ...]        # the source's safetensors __metadata__
    side_files: tuple[str, ...]                  # those of SIDE_FILES the folder has
    config: dict = field(compare=False, hash=False, repr=False)

    def layer_bytes(self, i: int) -> int:
        return sum(t.nbytes for t in self.layers[i])

    @property
    def embed_bytes(self) -> int:
        return sum(t.nbytes for t in self.embed)

    @property
    def norm_bytes(self) -> int:
        return sum(t.nbytes for t in self.norm)

    @property
    def head_bytes(self) -> int:
        return sum(t.nbytes for t in self.head)

    @property
    def total_bytes(self) -> int:
        return self.embed_bytes + self.norm_bytes + self.head_bytes + sum(map(self.layer_bytes, range(self.num_layers)))

    def stage_bytes(self, start: int, end: int, first: bool, last: bool) -> int:
        """Tensor bytes a stage holds (its shard's data section)."""
        return sum(t.nbytes for t in stage_tensors(self, start, end, first, last))


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The weight files of a checkpoint folder, and the index's tensor -> file map ({} without an index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            names = sorted(set(map(str, weight_map.values())))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ShardError(f"{index}: not a safetensors index ({e})") from None
        if any(Path(n).name != n for n in names):
            raise ShardError(f"{index}: weight files must be in the model folder: {names}")
        return [folder / n for n in names], weight_map
    if (folder / SHARD_FILE).exists():
        return [folder / SHARD_FILE], {}
    raise ShardError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")


def _hash_weight_file(h, path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Name, size, header bytes, and two 4 KiB samples of every tensor (its start and its middle): reading
    all of a 4 GiB model would take seconds at every start, while the samples still tell apart two
    fine-tunes of the same shapes."""
    size = path.stat().st_size
    data_start = min((t.start for t in tensors.values()), default=size)
    with open(path, "rb") as f:
        h.update(f"{path.name}\0{size}\0".encode())
        h.update(f.read(data_start))
        for t in sorted(tensors.values(), key=lambda t: t.start):
            for off in sorted({t.start, t.start + max(0, t.nbytes // 2 - HASH_SAMPLE_BYTES)}):
                f.seek(off)
                h.update(f.read(min(HASH_SAMPLE_BYTES, t.end - off)))


def profile_model(model_dir: str | os.PathLike) -> ModelProfile:
    """Profile a checkpoint folder (model.safetensors, or shards listed by model.safetensors.index.json).

    model_hash: sha256 (first 32 hex) over config.json, the side files present, and for each weight file its
    name, size, header bytes and two 4 KiB samples of each tensor's data. Equal on every machine holding the same files.
    """
    folder = Path(model_dir).resolve()
    try:
        config_bytes = (folder / "config.json").read_bytes()
        config = json.loads(config_bytes)
    except OSError as e:
        raise ShardError(f"{folder}: cannot read config.json ({e.strerror})") from None
    except ValueError as e:
        raise ShardError(f"{folder / 'config.json'}: not JSON ({e})") from None
    num_layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ShardError(f"{folder / 'config.json'}: num_hidden_layers must be a positive integer, not {num_layers!r}")

    h = hashlib.sha256(b"cake-swarm model v1\0")
    h.update(config_bytes)
    side_files = tuple(n for n in SIDE_FILES if (folder / n).is_file())
    for name in side_files:
        if name == "config.json":
            continue
        data = (folder / name).read_bytes()
        h.update(f"\0{name}\0{len(data)}\0".encode() + data)

    tensors: dict[str, TensorInfo] = {}
    metadata: dict = {}
    files, weight_map = _weight_files(folder)
    try:
        for i, path in enumerate(files):
            file_tensors, file_meta = read_header(path)
            if i == 0:
                metadata = file_meta
            for name in file_tensors:
                if name in tensors:
                    raise ShardError(f"{path}: tensor {name!r} is also in {tensors[name].file}")
            tensors.update(file_tensors)
            _hash_weight_file(h, path, file_tensors)
    except TensorFileError as e:
        raise ShardError(str(e)) from None
    except OSError as e:
        raise ShardError(f"{folder}: cannot read a weight file ({e})") from None

    for name, file in weight_map.items():
        if name not in tensors or Path(tensors[name].file).name != file:
            raise ShardError(f"{folder / file}: tensor {name!r} listed in model.safetensors.index.json is not in the file")

    layers: dict[int, list[TensorInfo]] = {}
    groups: dict[str, list[TensorInfo]] = {"embed": [], "norm": [], "head": []}
    unknown = []
    for name in sorted(tensors):
        t = tensors[name]
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(t)
        elif name.startswith("model.embed_tokens."):
            groups["embed"].append(t)
        elif name.startswith("model.norm."):
            groups["norm"].append(t)
        elif name.startswith("lm_head."):
            groups["head"].append(t)
        else:
            unknown.append(name)
    if unknown:
        raise ShardError(f"{folder}: tensors outside model.layers.N., model.embed_tokens., model.norm., lm_head.: "
                         f"{', '.join(unknown[:10])}" + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    if sorted(layers) != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(layers))
        extra = sorted(set(layers) - set(range(num_layers)))
        raise ShardError(f"{folder}: config.json says {num_layers} layers but the tensors have "
                         + (f"no layer {missing} " if missing else "") + (f"extra layers {extra}" if extra else ""))
    if not groups["embed"]:
        raise ShardError(f"{folder}: no model.embed_tokens.* tensor")
    if not groups["norm"]:
        raise ShardError(f"{folder}: no model.norm.* tensor")
    return ModelProfile(
        model_dir=folder,
        model_hash=h.hexdigest()[:32],
        num_layers=num_layers,
        layers=tuple(tuple(layers[i]) for i in range(num_layers)),
        embed=tuple(groups["embed"]),
        norm=tuple(groups["norm"]),
        head=tuple(groups["head"]),
        tied=bool(config.get("tie_word_embeddings", False)) or not groups["head"],
        metadata=tuple(sorted((k, v) for k, v in metadata.items() if isinstance(v, str))),
        side_files=side_files,
        config=config,
    )


def check_stage(profile: ModelProfile, start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= profile.num_layers):
        raise ShardError(f"layers [{start}, {end}) are not a stage of a model with {profile.num_layers} layers")


def stage_tensors(profile: ModelProfile, start: int, end: int, first: bool, last: bool) -> tuple[TensorInfo, ...]:
    """The source tensors of a stage, in shard order: embedding, layers start..end-1, norm, head."""
    check_stage(profile, start, end)
    out: list[TensorInfo] = []
    if first or (last and profile.tied):
        out += profile.embed
    for i in range(start, end):
        out += profile.layers[i]
    if last:
        out += profile.norm + profile.head
    return tuple(out)


@dataclass(frozen=True)
class ShardLayout:
    tensors: tuple[TensorInfo, ...]   # source tensors, in the order their bytes follow the header
    header: bytes                     # 8-byte little-endian length + JSON, padded with spaces to 8 bytes

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def shard_layout(profile: ModelProfile, start: int, end: int, first: bool, last: bool) -> ShardLayout:
    """The shard file of a stage, as a pure function of the profile: which bytes follow which header."""
    tensors = stage_tensors(profile, start, end, first, last)
    header: dict = {"__metadata__": dict(profile.metadata)} if profile.metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return ShardLayout(tensors, len(raw).to_bytes(8, "little") + raw)


def build_shard(profile: ModelProfile, start: int, end: int, first: bool, last: bool,
                out_path: str | os.PathLike) -> tuple[Path, str, int]:
    """Write a stage's shard file by copying byte ranges in CHUNK_BYTES pieces; returns (path, sha256, size).

    Written to a temporary name and renamed, so a crash never leaves a half file under out_path."""
    layout = shard_layout(profile, start, end, first, last)
    out = Path(out_path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    h = hashlib.sha256(layout.header)
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    sources: dict[str, object] = {}
    try:
        with open(tmp, "wb") as dst:
            dst.write(layout.header)
            for t in layout.tensors:
                src = sources.get(t.file) or sources.setdefault(t.file, open(t.file, "rb"))
                src.seek(t.start)
                left = t.nbytes
                while left:
                    n = src.readinto(view[:min(left, CHUNK_BYTES)])
                    if not n:
                        raise ShardError(f"{t.file}: ends inside tensor {t.name!r} (truncated since profiled?)")
                    h.update(view[:n])
                    dst.write(view[:n])
                    left -= n
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for f in sources.values():
            f.close()
    return out, h.hexdigest(), layout.size


# -- shard folders and the cache ---------------------------------------------------------------------------

def cache_root() -> Path:
    """$XDG_CACHE_HOME/cake-swarm (~/.cache/cake-swarm without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cake-swarm"


def stage_name(start: int, end: int, first: bool, last: bool) -> str:
    return f"{start}-{end}-f{int(bool(first))}l{int(bool(last))}"


def parse_stage_name(name: str) -> tuple[int, int, bool, bool]:
    m = _STAGE.fullmatch(name)
    if not m:
        raise ShardError(f"{name!r} is not a stage name like 0-8-f1l0")
    return int(m.group(1)), int(m.group(2)), m.group(3) == "1", m.group(4) == "1"


def shard_dir(cache_dir: str | os.PathLike | None, model_hash: str, start: int, end: int, first: bool, last: bool) -> Path:
    """<cache>/shards/<model_hash>/<start>-<end>-f<first>l<last>, cache defaulting to cache_root()."""
    return Path(cache_dir or cache_root()) / "shards" / model_hash / stage_name(start, end, first, last)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The shard.json of a complete shard folder, or None when it is missing, unreadable or its file's size is off.

    The sha256 is checked when the shard is written or received, not here (re-reading GiBs at every start)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_bytes())
        if (folder / manifest["file"]).stat().st_size != manifest["size"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def write_manifest(folder: Path, model_hash: str, start: int, end: int, first: bool, last: bool, num_layers: int,
                   sha256: str, size: int, tensors: list[str]) -> dict:
    manifest = {"model_hash": model_hash, "start": start, "end": end, "first": bool(first), "last": bool(last),
                "num_layers": num_layers, "file": SHARD_FILE, "size": size, "sha256": sha256, "tensors": tensors}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_shard_folder(profile: ModelProfile, start: int, end: int, first: bool, last: bool,
                       folder: str | os.PathLike) -> dict:
    """Build a complete shard folder at `folder` (replacing one that is there); returns its manifest.

    Built beside it under a temporary name and renamed into place, so readers see all of it or none."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _, sha, size = build_shard(profile, start, end, first, last, tmp / SHARD_FILE)
        for name in profile.side_files:
            shutil.copyfile(profile.model_dir / name, tmp / name)
        names = [t.name for t in stage_tensors(profile, start, end, first, last)]
        manifest = write_manifest(tmp, profile.model_hash, start, end, first, last, profile.num_layers, sha, size, names)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def ensure_shard(profile: ModelProfile, start: int, end: int, first: bool, last: bool,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """The cached shard folder of a stage and its manifest, built first when the cache lacks it."""
    folder = shard_dir(cache_dir, profile.model_hash, start, end, first, last)
    manifest = read_manifest(folder)
    if manifest is None:
        manifest = write_shard_folder(profile, start, end, first, last, folder)
    return folder, manifest


# -- offline split -------------------------------------------------------------------------------------------

_NODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def split_model(model_dir: str | os.PathLike, topology_path: str | os.PathLike, out_dir: str | os.PathLike,
                source: str | None = None) -> list[Path]:
    """`cake-swarm split`: the shard folder of every stage of the topology; returns them in pipeline order.

    A node with one stage gets DIR/<node name>/; a node holding blocks that do not join up gets one
    folder per block, DIR/<node name>.<A>-<B>/ (its layers, inclusive). A file may leave layers to no
    one (cake's worker-only files): those belong to the node started with --model, which has the whole
    model; they are written as `source`'s only when a source name is given. The topology is validated for
    this model first (every layer exactly once); nodes that hold no layers get no folder."""
    from topology import TopologyError, parse, pipeline, validate

    profile = profile_model(model_dir)
    path = Path(topology_path)
    holder = source or "the node started with --model"  # a name no file can list by accident
    try:
        topo = parse(path.read_text(), source=str(path))
        if topo.automatic:
            raise ShardError(f"{path}: every node has layers: [] (assign automatically): the swarm places those "
                             f"when it starts; split needs the layers written out")
        issues = validate(topo, profile.num_layers, source=holder)
        if issues:
            raise TopologyError(issues, str(path))
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    except TopologyError as e:
        raise ShardError(str(e)) from None
    stages = [(name, s, e) for name, s, e in pipeline(topo, profile.num_layers, holder) if source or name != holder]
    for name, _, _ in stages:
        if not _NODE_NAME.fullmatch(name):
            raise ShardError(f"{path}: node name {name!r} cannot be a folder name")
    blocks = {name: sum(1 for n, _, _ in stages if n == name) for name, _, _ in stages}
    out = Path(out_dir)
    folders = []
    for name, start, end in stages:
        folder = out / (name if blocks[name] == 1 else f"{name}.{start}-{end - 1}")
        write_shard_folder(profile, start, end, start == 0, end == profile.num_layers, folder)
        folders.append(folder)
    return folders
