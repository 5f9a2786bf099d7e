"""The engine against references: mlx-lm's outputs for checkpoints it wrote (tests/conftest.py builds
them from fixed seeds), and clear errors for bad ones."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from swarm.model.config import ModelError
from swarm.model.decoder import load_stage
from tests.mlxlm_reference import reference_logits, write_checkpoint

CHECKPOINTS = ["tiny_qwen2", "tiny_llama"]


def greedy(stages, prompt, steps):
    """Greedy tokens through a chain of stages (one stage = the whole model); also the first logits."""
    caches = [s.make_cache() for s in stages]

    def step(x):
        for s, c in zip(stages, caches):
            x = s(x, c)
        return x[0, -1]

    first = logits = step(mx.array([prompt]))
    tokens = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits)))
        logits = step(mx.array([[tokens[-1]]]))
    return tokens, first


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_float32_matches_mlx_lm(request, name):
    ref = request.getfixturevalue(name)
    tokens, logits = greedy([load_stage(ref.folder, dtype=mx.float32)], ref.prompt, len(ref.greedy_float32))
    assert tokens == ref.greedy_float32
    expected = ref.first_logits_float32
    assert np.max(np.abs(np.array(logits) - expected)) <= 1e-4 * np.max(np.abs(expected))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_as_stored_dtype_matches_mlx_lm(request, name):
    ref = request.getfixturevalue(name)
    tokens, _ = greedy([load_stage(ref.folder, dtype=ref.stored_dtype)], ref.prompt, len(ref.greedy_as_stored))
    assert tokens == ref.greedy_as_stored


def test_cpu_policy_is_float32(tiny_qwen2):
    assert load_stage(tiny_qwen2.folder).dtype == mx.float32


@pytest.mark.parametrize("cuts", [[0, 6], [0, 2, 4, 6], [0, 1, 5, 6], [0, 3, 6]])
def test_stages_chained_equal_whole_model(tiny_qwen2, cuts):
    ref = tiny_qwen2
    stages = [load_stage(ref.folder, a, b) for a, b in zip(cuts, cuts[1:])]
    assert [s.spec.first for s in stages] == [True] + [False] * (len(stages) - 1)
    assert [s.spec.last for s in stages] == [False] * (len(stages) - 1) + [True]
    tokens, _ = greedy(stages, ref.prompt, 20)
    assert tokens == ref.greedy_float32[:20]


def test_middle_stage_reads_only_its_layers(tiny_qwen2):
    stage = load_stage(tiny_qwen2.folder, 2, 4)
    assert "embed_tokens" not in stage and "lm_head" not in stage and len(stage.layers) == 2
    h = stage(mx.zeros((1, 3, 256)), stage.make_cache())
    assert h.shape == (1, 3, 256)


FAMILIES = {
    "llama3-rope-scaling": dict(model_type="llama", tie_word_embeddings=True, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-traditional": dict(model_type="llama", rope_traditional=True, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", head_dim=48, tie_word_embeddings=False, rope_theta=1e6),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, rope_theta=1e6, head_dim=32),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("quant", [dict(group_size=64, bits=4), dict(group_size=32, bits=8),
                                   dict(group_size=128, bits=2), dict(group_size=None, dtype=mx.bfloat16)],
                         ids=["q4g64", "q8g32", "q2g128", "bf16"])
def test_family_matches_mlx_lm(tmp_path, family, quant):
    folder = write_checkpoint(tmp_path / family, dict(FAMILIES[family]), **quant)
    prompt = [5, 77, 3, 300, 12, 9, 250, 41]
    ref_logits, ref_tokens = reference_logits(folder, prompt, 12)
    tokens, first = greedy([load_stage(folder, dtype=mx.float32)], prompt, 12)
    assert tokens == ref_tokens
    np.testing.assert_allclose(np.array(first), np.array(ref_logits[0]), rtol=1e-4, atol=1e-4)


def test_mixed_quantization_overrides(tmp_path):
    """Per-module overrides: 8-bit attention, dense down_proj, 4-bit elsewhere."""
    def predicate(path, module):
        if "down_proj" in path:
            return False
        return {"group_size": 32, "bits": 8} if "self_attn" in path else True

    folder = write_checkpoint(tmp_path / "mixed", dict(model_type="qwen2"), group_size=64, bits=4,
                              quant_predicate=predicate)
    stage = load_stage(folder, dtype=mx.float32)
    assert stage.layers[0].mlp.down_proj.quantized is False
    assert stage.layers[0].self_attn.q_proj.bits == 8 and stage.layers[0].mlp.up_proj.bits == 4
    prompt = [1, 2, 3, 4, 5]
    _, ref_tokens = reference_logits(folder, prompt, 10)
    assert greedy([stage], prompt, 10)[0] == ref_tokens


def test_cache_grows_past_its_step(tiny_llama):
    stage = load_stage(tiny_llama.folder, dtype=mx.float32)
    cache = stage.make_cache()
    ids = list(range(3, 300))
    full = stage(mx.array([ids]), stage.make_cache(), all_logits=True)[0]
    for i, t in enumerate(ids):
        step = stage(mx.array([[t]]), cache)[0, -1]
    assert cache[0].offset == len(ids) and cache[0].keys.shape[-2] == 512  # positions are the second-last axis
    np.testing.assert_allclose(np.array(step), np.array(full[-1]), rtol=1e-4, atol=1e-4)


def test_cache_bookkeeping_of_in_place_writes():
    # The fused CUDA step writes a position into keys/values in place and reports it with written_in_place;
    # the cache must count it, hand the step's output to the next step, and settle before it copies.
    from swarm.model.decoder import KVCache
    cache = KVCache()
    k = mx.random.normal((1, 2, 5, 4), key=mx.random.key(0))
    cache.append(k, k * 2)
    cache.reserve(1)
    assert cache.keys.shape[2] == 256 and cache.last_write is None
    step_out = mx.ones((1, 1, 8)) * 3
    cache.written_in_place(step_out)
    assert cache.offset == 6 and cache.last_write is step_out
    cache.reserve(300)                      # grows, after waiting for the step; keeps what was written
    assert cache.last_write is None and cache.keys.shape == (1, 2, 512, 4) and cache.offset == 6
    np.testing.assert_array_equal(np.array(cache.keys[..., :5, :]), np.array(k))
    np.testing.assert_array_equal(np.array(cache.values[..., :5, :]), np.array(k * 2))
    cache.written_in_place(step_out)
    cache.append(k[..., :2, :], k[..., :2, :])  # a slice update settles too
    assert cache.last_write is None and cache.offset == 9
    np.testing.assert_array_equal(np.array(cache.keys[..., 7:9, :]), np.array(k[..., :2, :]))


# --- bad checkpoints: clear errors naming the file and the tensor ------------------------------------

@pytest.fixture
def qwen_copy(tmp_path, tiny_qwen2):
    """A copy of the Qwen2-shaped checkpoint to break."""
    return Path(shutil.copytree(tiny_qwen2.folder, tmp_path / "tiny-qwen2-4bit"))


def rewrite_header(folder, change):
    """Rewrites model.safetensors with change(header) applied, keeping the data bytes."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def drop_from_index(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor(qwen_copy):
    folder = qwen_copy
    rewrite_header(folder, lambda h: h.pop("model.layers.3.mlp.up_proj.scales"))
    drop_from_index(folder, "model.layers.3.mlp.up_proj.scales")
    with pytest.raises(ModelError, match=r"model\.layers\.3\.mlp\.up_proj\.scales.*missing"):
        load_stage(folder)


def test_wrong_shape(qwen_copy):
    folder = qwen_copy

    def change(h):
        h["model.norm.weight"]["shape"] = [128, 2]
    rewrite_header(folder, change)
    with pytest.raises(ModelError, match=r"model\.safetensors.*'model\.norm\.weight' has shape \[128, 2\], expected \[256\]"):
        load_stage(folder)


def test_unknown_model_type(qwen_copy):
    folder = qwen_copy
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"config\.json: unknown model_type 'gpt_bigcode'"):
        load_stage(folder)


def test_truncated_file(qwen_copy):
    folder = qwen_copy
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelError, match=r"model\.safetensors: tensor '.*'.*truncated"):
        load_stage(folder)


@pytest.mark.parametrize("garbage", [b"\xff" * 8 + b"{}", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!", b"abc"])
def test_corrupt_header(qwen_copy, garbage):
    folder = qwen_copy
    path = folder / "model.safetensors"
    path.write_bytes(garbage + path.read_bytes()[len(garbage):] if len(garbage) > 3 else garbage)
    with pytest.raises(ModelError, match=r"model\.safetensors: "):
        load_stage(folder)


def test_bad_offsets(qwen_copy):
    folder = qwen_copy

    def change(h):
        h["lm_head.scales"]["data_offsets"][1] += 4
    rewrite_header(folder, change)
    with pytest.raises(ModelError, match=r"tensor 'lm_head\.scales'"):
        load_stage(folder)


def test_cli_reports_a_bad_checkpoint_without_a_traceback(qwen_copy):
    import subprocess
    import sys

    folder = qwen_copy
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(folder), "--prompt-ids", "1,2,3"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 2
    assert "cake-swarm: error:" in out.stderr and "model.safetensors" in out.stderr and "truncated" in out.stderr
    assert "Traceback" not in out.stderr
