"""Shard profile, layout and building (swarm.shards): exact tensors, byte identity, loadable, engine stages chain."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from swarm.shards import (MANIFEST_FILE, SHARD_FILE, ShardError, build_shard, ensure_shard, profile_model,
                          read_manifest, shard_dir, shard_layout, split_model, stage_tensors, write_shard_folder)
from swarm.tensorfile import read_header

# tests/conftest.py: tiny_qwen2 (untied head, bf16, 6 layers), tiny_llama (tied head, f32, 5 layers)
TOKENIZER = {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}


def model_copy(src: Path, dest: Path, index: bool = True) -> Path:
    """A writable copy of a fixture, with tokenizer files so the side files have something to carry."""
    dest.mkdir(parents=True)
    for name in ("config.json", "model.safetensors") + (("model.safetensors.index.json",) if index else ()):
        shutil.copyfile(src / name, dest / name)
    (dest / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    (dest / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return dest


def source_bytes(info) -> bytes:
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def all_tensors(folder: Path) -> dict:
    return read_header(folder / "model.safetensors")[0]


# -- profile -------------------------------------------------------------------------------------------------

@pytest.fixture
def qwen_folder(tiny_qwen2) -> Path:
    return tiny_qwen2.folder


@pytest.fixture
def llama_folder(tiny_llama) -> Path:
    return tiny_llama.folder


@pytest.mark.parametrize("name,layers,tied", [("qwen_folder", 6, False), ("llama_folder", 5, True)])
def test_profile_groups_every_tensor(request, name, layers, tied):
    fixture = request.getfixturevalue(name)
    p = profile_model(fixture)
    src = all_tensors(fixture)
    assert p.num_layers == layers and p.tied is tied
    grouped = [t.name for t in p.embed + p.norm + p.head] + [t.name for layer in p.layers for t in layer]
    assert sorted(grouped) == sorted(src) and len(grouped) == len(set(grouped))
    assert all(t.name.startswith(f"model.layers.{i}.") for i, layer in enumerate(p.layers) for t in layer)
    assert {t.name for t in p.embed} == {n for n in src if n.startswith("model.embed_tokens.")}
    assert (p.head == ()) is tied
    assert p.total_bytes == sum(t.nbytes for t in src.values())
    assert p.layer_bytes(1) == sum(t.nbytes for n, t in src.items() if n.startswith("model.layers.1."))
    assert p.embed_bytes + p.norm_bytes + p.head_bytes + sum(map(p.layer_bytes, range(layers))) == p.total_bytes
    assert p.model_hash == profile_model(fixture).model_hash and len(p.model_hash) == 32


def test_profile_single_file_and_multi_file_index_give_the_same_shards(tmp_path, qwen_folder):
    single = model_copy(qwen_folder, tmp_path / "single", index=False)
    multi = tmp_path / "multi"
    multi.mkdir()
    shutil.copyfile(qwen_folder / "config.json", multi / "config.json")
    weights = mx.load(str(qwen_folder / "model.safetensors"))
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(multi / file), {n: weights[n] for n in part}, metadata={"format": "mlx"})
        weight_map.update({n: file for n in part})
    (multi / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    p_single, p_multi = profile_model(single), profile_model(multi)
    assert {Path(t.file).name for layer in p_multi.layers for t in layer} == set(weight_map.values())
    assert p_single.model_hash != p_multi.model_hash   # other files, other headers
    for stage in ((0, 2, True, False), (2, 6, False, True)):
        a = build_shard(p_single, *stage, tmp_path / "a.safetensors")
        b = build_shard(p_multi, *stage, tmp_path / "b.safetensors")
        assert a[1:] == b[1:]   # same tensors, same bytes: same sha256 and size


def test_profile_refuses_unknown_tensors_and_layer_count_mismatch(tmp_path, llama_folder):
    folder = model_copy(llama_folder, tmp_path / "m", index=False)
    weights = mx.load(str(llama_folder / "model.safetensors"))
    weights["vision_tower.proj.weight"] = mx.zeros((2, 2))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(ShardError, match="vision_tower.proj.weight"):
        profile_model(folder)

    del weights["vision_tower.proj.weight"]
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=4)))
    with pytest.raises(ShardError, match=r"4 layers.*extra layers \[4\]"):
        profile_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ShardError, match="neither model.safetensors"):
        profile_model(folder)


def test_model_hash_changes_with_weight_content_of_the_same_shape(tmp_path, qwen_folder):
    folder = model_copy(qwen_folder, tmp_path / "m", index=False)
    before = profile_model(folder)
    info = before.layers[3][0]
    with open(folder / "model.safetensors", "r+b") as f:   # a "fine-tune": same header, other bytes
        f.seek(info.start)
        f.write(bytes(b ^ 0xFF for b in f.read(info.nbytes)))
    assert profile_model(folder).model_hash != before.model_hash
    (folder / "tokenizer.json").write_text("{}")
    assert profile_model(folder).model_hash != profile_model(model_copy(qwen_folder, tmp_path / "n", False)).model_hash


# -- layout and build ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen_folder", "llama_folder"])
@pytest.mark.parametrize("stage", [(0, 2, True, False), (2, 4, False, False), (4, None, False, True), (0, None, True, True)])
def test_shard_holds_exactly_the_stage_tensors_byte_identical(request, tmp_path, name, stage):
    fixture = request.getfixturevalue(name)
    p = profile_model(fixture)
    start, end, first, last = stage[0], stage[1] or p.num_layers, stage[2], stage[3]
    path, sha, size = build_shard(p, start, end, first, last, tmp_path / "s.safetensors")
    data = path.read_bytes()
    assert size == len(data) == shard_layout(p, start, end, first, last).size
    assert sha == hashlib.sha256(data).hexdigest()
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0 and data[8:8 + header_len].rstrip(b" ").endswith(b"}")

    src = all_tensors(fixture)
    expected = {n for n in src if any(n.startswith(f"model.layers.{i}.") for i in range(start, end))}
    if first or (last and p.tied):
        expected |= {n for n in src if n.startswith("model.embed_tokens.")}
    if last:
        expected |= {n for n in src if n.startswith(("model.norm.", "lm_head."))}
    shard = read_header(path)[0]
    assert set(shard) == expected
    for name, info in shard.items():
        assert (info.dtype, info.shape) == (src[name].dtype, src[name].shape)
        assert data[info.start:info.end] == source_bytes(src[name]), name

    loaded = mx.load(str(path))
    assert set(loaded) == expected
    name = sorted(expected)[-1]
    assert np.array_equal(np.array(loaded[name].astype(mx.float32)), np.array(mx.load(str(fixture / "model.safetensors"))[name].astype(mx.float32)))
    with safe_open(str(path), "numpy") as f:   # the safetensors library validates header and offsets
        assert set(f.keys()) == expected and f.metadata() == {"format": "mlx"}
    if name == "llama_folder":   # f32/u32 only: numpy can hold all of it
        arrays = safetensors.numpy.load_file(str(path))
        assert all(arrays[n].tobytes() == source_bytes(src[n]) for n in expected)


def test_build_is_deterministic(tmp_path, qwen_folder):
    p = profile_model(qwen_folder)
    a = build_shard(p, 1, 5, False, False, tmp_path / "a.safetensors")
    b = build_shard(profile_model(qwen_folder), 1, 5, False, False, tmp_path / "b.safetensors")
    assert a[1:] == b[1:] and a[0].read_bytes() == b[0].read_bytes()
    assert not list(tmp_path.glob("*.tmp*"))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(["qwen", "llama"]))
def test_stages_cover_every_tensor_once_twice_only_tied_embedding(tiny_qwen2, tiny_llama, data, name):
    which = {"qwen": tiny_qwen2, "llama": tiny_llama}[name].folder
    p = _PROFILES.setdefault(which, profile_model(which))
    cuts = sorted(data.draw(st.sets(st.integers(1, p.num_layers - 1), max_size=p.num_layers - 1)))
    bounds = [0] + cuts + [p.num_layers]
    counts: dict[str, int] = {}
    total = 0
    for start, end in zip(bounds, bounds[1:]):
        tensors = stage_tensors(p, start, end, start == 0, end == p.num_layers)
        total += p.stage_bytes(start, end, start == 0, end == p.num_layers)
        for t in tensors:
            counts[t.name] = counts.get(t.name, 0) + 1
    src = all_tensors(which)
    assert set(counts) == set(src)
    twice = {n for n, c in counts.items() if c == 2}
    embed = {t.name for t in p.embed}
    assert max(counts.values()) <= 2
    assert twice == (embed if p.tied and len(bounds) > 2 else set())
    assert total == p.total_bytes + (p.embed_bytes if twice else 0)


_PROFILES: dict = {}


def test_bad_stages_are_refused(qwen_folder):
    p = profile_model(qwen_folder)
    for start, end in ((0, 0), (3, 2), (-1, 2), (0, 7)):
        with pytest.raises(ShardError, match="not a stage"):
            shard_layout(p, start, end, start == 0, end == 6)


# -- folders, cache, split -----------------------------------------------------------------------------------

def test_shard_folder_has_manifest_and_side_files(tmp_path, qwen_folder):
    model = model_copy(qwen_folder, tmp_path / "m")
    p = profile_model(model)
    folder, manifest = ensure_shard(p, 2, 6, False, True, tmp_path / "cache")
    assert folder == shard_dir(tmp_path / "cache", p.model_hash, 2, 6, False, True)
    assert folder == tmp_path / "cache" / "shards" / p.model_hash / "2-6-f0l1"
    assert sorted(x.name for x in folder.iterdir()) == sorted(
        [SHARD_FILE, MANIFEST_FILE, "config.json", "tokenizer.json", "tokenizer_config.json"])
    assert manifest == json.loads((folder / MANIFEST_FILE).read_text()) == read_manifest(folder)
    assert {k: manifest[k] for k in ("model_hash", "start", "end", "first", "last", "num_layers", "file")} == {
        "model_hash": p.model_hash, "start": 2, "end": 6, "first": False, "last": True, "num_layers": 6,
        "file": SHARD_FILE}
    assert manifest["sha256"] == hashlib.sha256((folder / SHARD_FILE).read_bytes()).hexdigest()
    assert manifest["tensors"] == list(read_header(folder / SHARD_FILE)[0])
    assert (folder / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    mtime = (folder / SHARD_FILE).stat().st_mtime_ns
    assert ensure_shard(p, 2, 6, False, True, tmp_path / "cache") == (folder, manifest)
    assert (folder / SHARD_FILE).stat().st_mtime_ns == mtime   # reused, not rebuilt
    with open(folder / SHARD_FILE, "ab") as f:
        f.write(b"x")
    assert read_manifest(folder) is None


TOPOLOGY = """\
first:
  host: 127.0.0.1:10128
  layers: [model.layers.0-1]
middle:
  host: 127.0.0.1:10129
  layers: [model.layers.2-3]
idle:
  host: 127.0.0.1:10131
  layers: []
last:
  host: 127.0.0.1:10130
  layers: [model.layers.4]
"""


def test_split_writes_one_folder_per_node(tmp_path, llama_folder):
    topo = tmp_path / "topo.yaml"
    topo.write_text(TOPOLOGY)
    model = model_copy(llama_folder, tmp_path / "m")
    folders = split_model(model, topo, tmp_path / "out")
    assert folders == [tmp_path / "out" / n for n in ("first", "middle", "last")]
    manifests = [json.loads((f / MANIFEST_FILE).read_text()) for f in folders]
    assert [tuple(m[k] for k in ("start", "end", "first", "last")) for m in manifests] == [(0, 2, True, False), (2, 4, False, False), (4, 5, False, True)]
    for f in folders:
        assert len(list(f.glob("*.safetensors"))) == 1 and (f / "config.json").exists() and (f / "tokenizer.json").exists()
    # the tied head: the last node has the embedding too
    assert "model.embed_tokens.weight" in all_tensors(folders[2])
    assert not (tmp_path / "out" / "idle").exists()


def test_split_refuses_a_topology_that_does_not_fit_the_model(tmp_path, llama_folder):
    topo = tmp_path / "topo.yaml"
    topo.write_text(TOPOLOGY.replace("model.layers.4]", "model.layers.3]"))
    with pytest.raises(ShardError, match="layer 3 placed twice"):
        split_model(llama_folder, topo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_engine_stages_chained_give_the_whole_models_logits_and_tokens(tmp_path, tiny_qwen2):
    from swarm.model.decoder import load_stage

    qwen_folder = tiny_qwen2.folder
    p = profile_model(qwen_folder)
    folders = [write_shard_folder(p, a, b, a == 0, b == 6, tmp_path / f"s{a}") and tmp_path / f"s{a}"
               for a, b in ((0, 2), (2, 3), (3, 6))]
    chained = [load_stage(f) for f in folders]
    whole = [load_stage(qwen_folder)]

    def greedy(stages, n=12):
        caches = [s.make_cache() for s in stages]
        x, tokens, first = mx.array([tiny_qwen2.prompt]), [], None
        for _ in range(n):
            for stage, cache in zip(stages, caches):
                x = stage(x, cache)
            first = np.array(x[0, -1].astype(mx.float32)) if first is None else first
            tokens.append(int(mx.argmax(x[0, -1]).item()))
            x = mx.array([[tokens[-1]]])
        return first, tokens

    logits_chained, tokens_chained = greedy(chained)
    logits_whole, tokens_whole = greedy(whole)
    assert np.array_equal(logits_chained, logits_whole)
    assert tokens_chained == tokens_whole


# the peak memory of loading a stage, above what the process held once its kernels were ready (their
# start-up self-check and runtime, e.g. numba's compiler on the CPU, are the same for any stage)
LOAD_AND_REPORT = """
import sys
from kernels.linear import kernel_path
from swarm.model.decoder import load_stage
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
kernel_path()
base = status("VmRSS")
stage = load_stage(sys.argv[1])
print(base, status("VmHWM") - base)
"""


def test_a_third_of_a_05b_shaped_model_loads_in_a_third_of_its_weights_plus_150mb(tmp_path):
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("make_model", Path(__file__).resolve().parents[1] / "scripts" / "make_model.py")
    make_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_model)
    model = make_model.make_model("qwen2.5-0.5b", tmp_path / "m")   # 24 layers, tied, several weight files
    topo = tmp_path / "thirds.yaml"
    topo.write_text("".join(f"n{a}:\n  host: 127.0.0.1:{10128 + a}\n  layers: [model.layers.{a}-{a + 7}]\n"
                            for a in (0, 8, 16)))
    folders = split_model(model, topo, tmp_path / "out")
    total = profile_model(model).total_bytes
    for folder in folders:
        out = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(folder)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        base, loading = map(int, out.stdout.split()[-2:])
        assert loading <= total / 3 + 150_000_000, (folder.name, base, loading, total)
    shutil.rmtree(tmp_path, ignore_errors=True)


# cake's own kind of file: the workers only (as `cake split` writes them); the node started with
# --model, cake's master, runs the layers nobody names
WORKERS_ONLY = """\
worker1:
  host: '192.168.1.7:10128'
  description: 'a laptop'
  layers:
    - 'model.layers.1-2'
"""


def test_split_of_a_workers_only_file(tmp_path, llama_folder):
    topo = tmp_path / "topology.yml"
    topo.write_text(WORKERS_ONLY)
    model = model_copy(llama_folder, tmp_path / "m")
    assert split_model(model, topo, tmp_path / "workers") == [tmp_path / "workers" / "worker1"]
    folders = split_model(model, topo, tmp_path / "all", source="master")
    # the source holds two blocks that do not join: a folder for each
    assert folders == [tmp_path / "all" / n for n in ("master.0-0", "worker1", "master.3-4")]
    manifests = [json.loads((f / MANIFEST_FILE).read_text()) for f in folders]
    assert [tuple(m[k] for k in ("start", "end", "first", "last")) for m in manifests] == [
        (0, 1, True, False), (1, 3, False, False), (3, 5, False, True)]
    assert (folders[1] / MANIFEST_FILE).read_bytes() == (tmp_path / "workers" / "worker1" / MANIFEST_FILE).read_bytes()


def test_stages_of_a_split_workers_only_file_give_mlx_lms_tokens(tmp_path, tiny_llama):
    from swarm.model.decoder import load_stage
    from tests.test_engine import greedy

    topo = tmp_path / "topology.yml"
    topo.write_text(WORKERS_ONLY)
    folders = split_model(model_copy(tiny_llama.folder, tmp_path / "m"), topo, tmp_path / "out", source="master")
    stages = [load_stage(f, dtype=mx.float32) for f in folders]
    tokens, _ = greedy(stages, tiny_llama.prompt, 30)
    assert tokens == tiny_llama.greedy_float32[:30]


def test_split_refuses_automatic_and_image_model_files(tmp_path, llama_folder):
    topo = tmp_path / "topology.yml"
    topo.write_text("worker1:\n  host: '10.0.0.2:10128'\n  layers: []\n")
    with pytest.raises(ShardError, match="assign automatically"):
        split_model(llama_folder, topo, tmp_path / "out")
    topo.write_text("worker1:\n  host: '10.0.0.2:10128'\n  layers: ['unet']\n")
    with pytest.raises(ShardError, match="this swarm runs text models"):
        split_model(llama_folder, topo, tmp_path / "out")
    assert not (tmp_path / "out").exists()
