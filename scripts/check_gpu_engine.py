"""On a CUDA machine: the engine with the fused q4 kernels against MLX's own kernels and against mlx-lm.

    python scripts/check_gpu_engine.py [--shape qwen2.5-0.5b] [--layers 4]

Writes a random-weight checkpoint (scripts/make_model.py), runs the same prompt through the engine with
the CUDA kernels (kernels/cuda_*.py) on and off, and through mlx-lm; prints the logits' relative difference
and whether the greedy tokens agree.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def run(stage, prompt, steps):
    """Greedy tokens and the logits of every step (prefill first), as float32 numpy arrays."""
    cache = stage.make_cache()
    logits = stage(mx.array([prompt]), cache)[0, -1]
    all_logits, tokens = [np.array(logits.astype(mx.float32))], []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits)))
        logits = stage(mx.array([[tokens[-1]]]), cache)[0, -1]
        all_logits.append(np.array(logits.astype(mx.float32)))
    return all_logits, tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    from kernels import cuda_common, cuda_q4
    from make_model import make_model
    from swarm.model.decoder import load_stage

    folder = make_model(args.shape, Path(tempfile.mkdtemp()) / args.shape, layers=args.layers)
    print("backend:", mx.default_device(), "cuda_q4 enabled:", cuda_q4.enabled())
    print(cuda_q4.report())
    prompt = [(i * 7919 + 13) % 5000 + 3 for i in range(24)]
    fused_stage = load_stage(folder)
    steps = sum(layer.decode_step is not None for layer in fused_stage.layers)
    print(f"layers with the fused one-token step: {steps}/{len(fused_stage.layers)}")
    fused_logits, fused_tokens = run(fused_stage, prompt, 16)
    for layer in fused_stage.layers:   # the same kernels, op by op
        layer.decode_step = None
    opwise_logits, opwise_tokens = run(fused_stage, prompt, 16)
    del fused_stage
    cuda_common.passed.update({family: False for family in cuda_common.passed})   # MLX's kernels only
    mlx_logits, mlx_tokens = run(load_stage(folder), prompt, 16)
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))  # noqa: E731
    # each step fed the same token ids: compare while the tokens agree
    agree = next((i for i, (a, b) in enumerate(zip(fused_tokens, mlx_tokens)) if a != b), len(mlx_tokens))
    print("decode-step logits vs MLX kernels, rel diff per step:",
          " ".join(f"{rel(a, b):.1e}" for a, b in zip(fused_logits[1:agree + 1], mlx_logits[1:agree + 1])))
    print("greedy tokens equal (fused step vs MLX kernels):", fused_tokens == mlx_tokens,
          sum(a == b for a, b in zip(fused_tokens, mlx_tokens)), "/", len(mlx_tokens),
          "| (op-by-op kernels vs MLX kernels):", opwise_tokens == mlx_tokens)
    fused_logits, mlx_logits = fused_logits[0], mlx_logits[0]
    from mlx_lm.utils import load_model
    from mlx_lm.models.cache import make_prompt_cache
    model, _ = load_model(folder)
    cache = make_prompt_cache(model)
    ref = np.array(model(mx.array([prompt]), cache=cache)[0, -1].astype(mx.float32))
    print(f"first logits rel diff: fused vs MLX kernels {rel(fused_logits, mlx_logits):.2e}, "
          f"fused vs mlx-lm {rel(fused_logits, ref):.2e}, MLX kernels vs mlx-lm {rel(mlx_logits, ref):.2e}")


if __name__ == "__main__":
    main()
