"""Random-weight MLX 4-bit checkpoints of real model shapes, for benchmarks and the swarm's tests.

    python scripts/make_model.py --shape qwen2.5-0.5b OUT_DIR [--layers N] [--seed S] [--bits 4 --group-size 64]

Writes what mlx-community publishes (config.json with a quantization block, model-*.safetensors +
model.safetensors.index.json, tokenizer.json, tokenizer_config.json with the family's chat template),
one file per layer (plus one for the embedding, one for the final norm and head), so that no more than
one layer is ever in memory: a 7B-shaped checkpoint is written on a small machine. Weights are
small (standard deviation about 0.02) so activations stay finite; the tokenizer is a byte-level BPE padded with placeholder
tokens up to the vocabulary size, so that any generated id decodes.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np

QWEN_BASE = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0, rms_norm_eps=1e-06,
                 max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645, hidden_act="silu",
                 sliding_window=32768, use_sliding_window=False)
SHAPES = {
    "qwen2.5-0.5b": dict(QWEN_BASE, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(QWEN_BASE, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(QWEN_BASE, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "llama-3.2-1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-05, max_position_embeddings=131072,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], hidden_act="silu",
        attention_bias=False, mlp_bias=False),
}

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
QWEN_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                   128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>"}

def _rng(name: str, seed: int) -> np.random.Generator:
    """Seeded by tensor name, so a cut-down model has the same first layers as the full one."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _bf16(a: np.ndarray) -> mx.array:
    return mx.array(a.astype(np.float32)).astype(mx.bfloat16)


def _linear(name: str, rows: int, cols: int, seed: int, bits: int, group_size: int) -> dict:
    """One weight matrix, quantized where cols divide by group_size (mlx-lm's rule), else bf16.

    The packed codes are drawn directly as random words (uniform codes), with per-group scales and
    biases that centre the weights on zero with a standard deviation near 0.02: the same tensors as
    quantizing normal * 0.02, at a fraction of the time.
    """
    rng = _rng(name, seed)
    if cols % group_size:
        return {f"{name}.weight": _bf16(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)}
    levels = 2 ** bits - 1
    code_std = ((levels + 1) ** 2 - 1) ** 0.5 / 12 ** 0.5  # std of a uniform code in 0..levels
    q = rng.integers(0, 2 ** 32, size=(rows, cols * bits // 32), dtype=np.uint32)
    scales = (0.02 / code_std) * rng.uniform(0.8, 1.2, size=(rows, cols // group_size))
    biases = -scales * levels / 2
    return {f"{name}.weight": mx.array(q), f"{name}.scales": _bf16(scales), f"{name}.biases": _bf16(biases)}


def _layer(i: int, c: dict, seed: int, bits: int, group_size: int) -> dict:
    d, inter = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q_out, kv_out = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    w = {}
    for name, rows, cols in (("self_attn.q_proj", q_out, d), ("self_attn.k_proj", kv_out, d),
                             ("self_attn.v_proj", kv_out, d), ("self_attn.o_proj", d, q_out),
                             ("mlp.gate_proj", inter, d), ("mlp.up_proj", inter, d), ("mlp.down_proj", d, inter)):
        w.update(_linear(p + name, rows, cols, seed, bits, group_size))
    if c["model_type"] == "qwen2":
        for name, n in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            w[f"{p}self_attn.{name}.bias"] = _bf16(_rng(f"{p}self_attn.{name}.bias", seed).standard_normal(n) * 0.02)
    w[p + "input_layernorm.weight"] = mx.ones((d,), dtype=mx.bfloat16)
    w[p + "post_attention_layernorm.weight"] = mx.ones((d,), dtype=mx.bfloat16)
    return w


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest move above 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(out: Path, config: dict) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    llama = config["model_type"] == "llama"
    specials = LLAMA3_SPECIALS if llama else QWEN_SPECIALS
    if llama:
        specials = {i: specials.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)}
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for i in range(256, config["vocab_size"]):
        vocab[specials.get(i) or "".join(table[b] for b in f" tok{i}".encode())] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials.values()])
    if llama:
        bos = specials[128000]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, 128000)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "bos_token": specials[128000] if llama else None,
        "eos_token": specials[128009] if llama else "<|im_end|>",
        "pad_token": specials[128001] if llama else "<|endoftext|>",
        "chat_template": LLAMA3_TEMPLATE if llama else CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def make_model(shape: str, out_dir, layers: int | None = None, seed: int = 0, bits: int = 4,
               group_size: int = 64) -> Path:
    """Write a random-weight checkpoint of SHAPE into OUT_DIR, layer by layer; returns OUT_DIR."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    config = dict(SHAPES[shape])
    if layers is not None:
        config["num_hidden_layers"] = layers
    config.update(torch_dtype="bfloat16",
                  quantization={"group_size": group_size, "bits": bits, "mode": "affine"},
                  quantization_config={"group_size": group_size, "bits": bits, "mode": "affine"})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_layers, d, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]

    def units():  # each yields the tensors of one file
        yield lambda: _linear("model.embed_tokens", vocab, d, seed, bits, group_size)
        for i in range(n_layers):
            yield lambda i=i: _layer(i, config, seed, bits, group_size)

        def last():
            w = {"model.norm.weight": mx.ones((d,), dtype=mx.bfloat16)}
            if not config["tie_word_embeddings"]:
                w.update(_linear("lm_head", vocab, d, seed, bits, group_size))
            return w
        yield last

    count = n_layers + 2
    weight_map, total_size, total_parameters = {}, 0, 0
    for k, make in enumerate(units(), 1):
        name = f"model-{k:05d}-of-{count:05d}.safetensors"
        tensors = make()
        mx.save_safetensors(str(out / name), tensors, metadata={"format": "mlx"})
        for key, t in tensors.items():
            weight_map[key] = name
            total_size += t.nbytes
            if not key.endswith((".scales", ".biases")):
                total_parameters += t.size * 32 // bits if t.dtype == mx.uint32 else t.size
        del tensors
    index = {"metadata": {"total_size": total_size, "total_parameters": total_parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    write_tokenizer(out, config)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, help="cut the depth to N layers (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args(argv)
    out = make_model(args.shape, args.out_dir, layers=args.layers, seed=args.seed, bits=args.bits,
                     group_size=args.group_size)
    print(out)


if __name__ == "__main__":
    main()
