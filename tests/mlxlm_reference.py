"""mlx-lm as the reference reader in tests: writes random checkpoints with mlx-lm's own model classes,
quantizer and saver, and computes mlx-lm's logits for them. Test-only; the daemon never imports mlx-lm."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map, tree_map_with_path

BASE = dict(hidden_size=128, num_hidden_layers=3, intermediate_size=320, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=384, rms_norm_eps=1e-5, max_position_embeddings=2048)


def write_checkpoint(out: Path, config: dict, *, group_size: int | None = 64, bits: int = 4, dtype=mx.float16,
                     quant_predicate=None, seed: int = 0, scaled: bool = False) -> Path:
    """A random-weight checkpoint written by mlx-lm (quantized when group_size is set).

    Every parameter is N(0, 0.08), or with scaled=True closer to a trained model's (norm weights near 1,
    matrices N(0, 1/fan_in)), so that greedy runs vary instead of repeating one token."""
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    config = {**BASE, **config}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.update(tree_map_with_path(lambda path, p: _random(path, p.shape, scaled).astype(dtype), model.parameters()))
    if group_size:
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=quant_predicate)
    config["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[dtype]
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def _random(path: str, shape: tuple[int, ...], scaled: bool) -> mx.array:
    noise = mx.random.normal(shape)
    if not scaled:
        return noise * 0.08
    if "norm" in path:
        return 1 + noise * 0.1
    if "embed_tokens" in path:  # small beside the layers' outputs, or a tied head repeats the last token
        return noise * 0.1
    return noise * (0.1 if len(shape) == 1 else shape[-1] ** -0.5)  # biases small; matrices by fan-in


def reference_logits(folder: Path, prompt: list[int], steps: int, dtype=mx.float32) -> tuple[list[mx.array], list[int]]:
    """mlx-lm's logits at the prompt's last position and for `steps` greedy tokens after it, parameters cast to dtype."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    out, tokens = [logits], []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits)))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
        out.append(logits)
    return out, tokens


def tensor_names(folder: Path) -> list[str]:
    return sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])

