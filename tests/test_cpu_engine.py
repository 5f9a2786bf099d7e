"""The engine on the CPU kernels against mlx-lm: greedy tokens and first logits for checkpoints mlx-lm wrote
(every family, 2-8 bits, dense, mixed), through the decoder's Stage with its linears on kernels.cpu_matmul
and through kernels.cpu_block's numpy forward; and batched decode giving each session its solo tokens."""

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("numba")

from kernels.cpu_block import BLAS_MIN_ROWS, StageRunner  # noqa: E402
from kernels.linear import Linear, kernel_path  # noqa: E402
from swarm.model.decoder import load_stage  # noqa: E402
from tests.mlxlm_reference import reference_logits, write_checkpoint  # noqa: E402
from tests.test_engine import FAMILIES, greedy  # noqa: E402


def greedy_numpy(runner: StageRunner, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    caches = [runner.make_cache()]
    first = logits = runner.forward(np.array(prompt), caches, [len(prompt)])[0]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = runner.forward(np.array(tokens[-1:]), caches, [1])[0]
    return tokens, first


def assert_close_logits(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))


def linears(stage) -> list[Linear]:
    return [m for _, m in stage.named_modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_llama"])
def test_checkpoints_match_mlx_lm(request, name):
    ref = request.getfixturevalue(name)
    stage = load_stage(ref.folder, dtype=mx.float32)
    assert kernel_path()["linear"].startswith("cpu-numba-")
    assert all(lin.cpu is not None for lin in linears(stage))  # tiny_llama's dense down_proj included
    tokens, first = greedy([stage], ref.prompt, len(ref.greedy_float32))
    assert tokens == ref.greedy_float32
    assert_close_logits(first, ref.first_logits_float32)
    tokens, first = greedy_numpy(StageRunner(stage), ref.prompt, len(ref.greedy_float32))
    assert tokens == ref.greedy_float32
    assert_close_logits(first, ref.first_logits_float32)


QUANTS = {"q4g64": dict(group_size=64, bits=4), "q8g32": dict(group_size=32, bits=8),
          "q3g32": dict(group_size=32, bits=3), "q5g64": dict(group_size=64, bits=5),
          "q6g128": dict(group_size=128, bits=6), "q2g128": dict(group_size=128, bits=2),
          "bf16": dict(group_size=None, dtype=mx.bfloat16)}
CASES = [(family, "q4g64") for family in sorted(FAMILIES)] + [("qwen2", q) for q in QUANTS if q != "q4g64"]


@pytest.mark.parametrize("family,quant", CASES)
def test_family_matches_mlx_lm(tmp_path, family, quant):
    folder = write_checkpoint(tmp_path / family, dict(FAMILIES[family]), seed=7, scaled=True, **QUANTS[quant])
    prompt = [5, 77, 3, 300, 12, 9, 250, 41]
    ref_logits, ref_tokens = reference_logits(folder, prompt, 12)
    tokens, first = greedy_numpy(StageRunner(load_stage(folder, dtype=mx.float32)), prompt, 12)
    assert tokens == ref_tokens
    assert_close_logits(first, ref_logits[0])


def test_long_prompt_matches_mlx_lm(tmp_path):
    """A prompt long enough for its linears to run on BLAS (cpu_block.BLAS_MIN_ROWS)."""
    folder = write_checkpoint(tmp_path / "llama", dict(FAMILIES["llama3-rope-scaling"]), seed=11, scaled=True)
    prompt = [(i * 37 + 5) % 380 + 2 for i in range(BLAS_MIN_ROWS + 30)]
    ref_logits, ref_tokens = reference_logits(folder, prompt, 12)
    tokens, first = greedy_numpy(StageRunner(load_stage(folder, dtype=mx.float32)), prompt, 12)
    assert tokens == ref_tokens
    assert_close_logits(first, ref_logits[0])


def test_mixed_quantization(tmp_path):
    """Per-module overrides: 8-bit attention, dense down_proj, 4-bit elsewhere. mlx-lm's tokens; the logits
    against the decoder on MLX's own kernels (whose first logits are not mlx-lm's within 1e-4 here)."""
    def predicate(path, module):
        if "down_proj" in path:
            return False
        return {"group_size": 32, "bits": 8} if "self_attn" in path else True

    folder = write_checkpoint(tmp_path / "mixed", dict(model_type="qwen2"), group_size=64, bits=4,
                              quant_predicate=predicate, scaled=True)
    prompt = [1, 2, 3, 4, 5]
    _, ref_tokens = reference_logits(folder, prompt, 10)
    stage = load_stage(folder, dtype=mx.float32)
    tokens, first = greedy_numpy(StageRunner(stage), prompt, 10)
    assert tokens == ref_tokens
    for lin in linears(stage):
        lin.cpu = None
    _, on_mlx = greedy([stage], prompt, 0)
    assert_close_logits(first, on_mlx)


def test_batched_decode_gives_each_session_its_solo_logits(tiny_qwen2):
    """Three sessions decoded together, one row each, and beside another session's prompt chunk (short, or
    long enough for BLAS): each row's logits are bit for bit those of the session decoded alone."""
    runner = StageRunner(load_stage(tiny_qwen2.folder, dtype=mx.float32))
    prompts = [[1, 17, 99, 512, 3], [7, 8], [900, 901, 902, 903, 904, 905, 906]]
    solo = []
    for prompt in prompts:
        caches = [runner.make_cache()]
        logits = [runner.forward(np.array(prompt), caches, [len(prompt)])[0]]
        for _ in range(6):
            logits.append(runner.forward(np.array([int(np.argmax(logits[-1]))]), caches, [1])[0])
        solo.append(logits)
    caches = [runner.make_cache() for _ in prompts]
    last = [runner.forward(np.array(p), [c], [len(p)])[0] for p, c in zip(prompts, caches)]
    for step in range(6):
        ids = [int(np.argmax(x)) for x in last]
        if step in (2, 4):  # a new session's prompt in the same forward (the long one on BLAS)
            chunk = [5, 6, 7, 8] if step == 2 else list(range(10, 10 + BLAS_MIN_ROWS + 6))
            out = runner.forward(np.array(ids + chunk), caches + [runner.make_cache()], [1, 1, 1, len(chunk)])[:3]
        else:
            out = runner.forward(np.array(ids), caches, [1, 1, 1])
        last = list(out)
        for i in range(3):
            np.testing.assert_array_equal(last[i], solo[i][step + 1])


def test_stages_chained_equal_one_stage(tiny_qwen2):
    ref = tiny_qwen2
    runners = [StageRunner(load_stage(ref.folder, a, b, dtype=mx.float32)) for a, b in ((0, 2), (2, 5), (5, 6))]
    caches = [[r.make_cache()] for r in runners]

    def forward(ids, rows):
        x = np.array(ids)
        for r, c in zip(runners, caches):
            x = r.forward(x, c, rows)
        return x[0]

    logits, tokens = forward(ref.prompt, [len(ref.prompt)]), []
    for _ in range(20):
        tokens.append(int(np.argmax(logits)))
        logits = forward(tokens[-1:], [1])
    assert tokens == ref.greedy_float32[:20]
