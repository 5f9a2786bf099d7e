"""What the tests read, made where they run: checkpoints written by mlx-lm from fixed seeds with
mlx-lm's own greedy references, and the demo model's llama2.c files found as cake-swarm finds them.

Nothing here needs a folder beside the repository; tests/conftest.py turns these into session fixtures.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from tests.mlxlm_reference import reference_logits, write_checkpoint

# Qwen2-shaped: q/k/v bias, untied lm_head, GQA 4/2, rope theta 1e6, bfloat16, group 64.
TINY_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=256, intermediate_size=768,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                  rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=4096)
# stories260K-shaped llama: tied embeddings, traditional RoPE, float32, group 32, so that the 172-wide
# down_proj stays unquantized (mlx-lm quantizes only widths that divide by the group).
TINY_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=172,
                  num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, rope_traditional=True, tie_word_embeddings=True,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
GREEDY_STEPS = 96


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder and mlx-lm's greedy run on it: as stored, and with every parameter in float32."""

    folder: Path
    stored_dtype: mx.Dtype
    prompt: list[int]
    greedy_as_stored: list[int]
    greedy_float32: list[int]
    first_logits_float32: np.ndarray


def write_reference_checkpoint(folder: Path, config: dict, *, dtype: mx.Dtype, group_size: int, seed: int,
                               prompt: list[int]) -> Checkpoint:
    """A random 4-bit checkpoint written by mlx-lm, with mlx-lm's references computed now."""
    write_checkpoint(folder, config, group_size=group_size, bits=4, dtype=dtype, seed=seed, scaled=True)
    logits, greedy_float32 = reference_logits(folder, prompt, GREEDY_STEPS, dtype=mx.float32)
    _, greedy_as_stored = reference_logits(folder, prompt, GREEDY_STEPS, dtype=dtype)
    return Checkpoint(folder, dtype, prompt, greedy_as_stored, greedy_float32, np.array(logits[0]))


def tiny_qwen2(folder: Path) -> Checkpoint:
    return write_reference_checkpoint(folder, TINY_QWEN2, dtype=mx.bfloat16, group_size=64, seed=2,
                                      prompt=[1, 17, 99, 512, 3, 800, 42])


def tiny_llama(folder: Path) -> Checkpoint:
    return write_reference_checkpoint(folder, TINY_LLAMA, dtype=mx.float32, group_size=32, seed=3,
                                      prompt=[1, 403, 407, 261, 378])


# --- the demo ------------------------------------------------------------------------------------------

@functools.cache
def _find_demo_source() -> tuple[Path | None, str]:
    from swarm.model.source import ModelSourceError, demo_source

    try:
        return demo_source().resolve(), ""
    except ModelSourceError as e:
        return None, str(e)


def require_demo() -> Path:
    """The demo's llama2.c folder (stories260K), found as cake-swarm finds it ($CAKE_SWARM_DEMO_SRC, the
    folder beside the repository, the download cache, the pinned download), or the calling test skips.

    It is exported as $CAKE_SWARM_DEMO_SRC, so that daemons and CLI runs started afterwards with caches
    of their own convert the demo from it instead of downloading it again.
    """
    import pytest

    src, why = _find_demo_source()
    if src is None:
        pytest.skip(f"needs the demo model (stories260K), which cannot be had here: {why}")
    os.environ["CAKE_SWARM_DEMO_SRC"] = str(src)
    return src
