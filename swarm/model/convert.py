"""llama2.c checkpoints -> MLX checkpoint folders, as mlx-lm would write them.

Owns the demo model's conversion: the legacy (v0) llama2.c weight file, its SentencePiece tokenizer
(`tok*.model` protobuf, or llama2.c's own `tok*.bin`), both parsed by hand so that the runtime needs
neither torch nor sentencepiece, and the mlx-lm folder layout: config.json, generation_config.json,
model.safetensors (+ index), tokenizer.json (a `tokenizers` SentencePiece-style BPE) and
tokenizer_config.json. llama2.c's models end a text with BOS (run.c stops there), so BOS is recorded as
an end token beside EOS, and generation stops there on every path. With `bits`, every
linear layer and the embedding whose input width divides by `group_size` is quantized with
`mx.quantize`, the rule mlx-lm applies (so a 172-wide down_proj stays float).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

HEADER = struct.Struct("<7i")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PLAIN_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
BOS_ID, EOS_ID = 1, 2
END_IDS = [BOS_ID, EOS_ID]  # TinyStories-style training puts BOS between texts: a story ends with it


@dataclass
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def file_size(self) -> int:
        d, h, L, hs = self.dim, self.hidden_dim, self.n_layers, self.head_size
        floats = (self.vocab_size * d + 2 * L * d + L * d * self.n_heads * hs * 2
                  + L * d * self.n_kv_heads * hs * 2 + 3 * L * d * h + d + self.seq_len * hs)
        if not self.shared_classifier:
            floats += self.vocab_size * d
        return HEADER.size + 4 * floats


def read_llama2c_header(path: Path) -> Llama2cConfig | None:
    """The header of a legacy llama2.c weight file, or None when the file is not one (e.g. a tokenizer)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        return None
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = HEADER.unpack(raw)
    if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or vocab == 0 or dim % heads:
        return None
    cfg = Llama2cConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)
    return cfg if cfg.file_size() == path.stat().st_size else None


def read_llama2c_weights(path: Path, cfg: Llama2cConfig) -> dict[str, np.ndarray]:
    """HF-named float32 tensors, each (out_features, in_features) as nn.Linear stores them."""
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    d, h, L, hs = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.head_size
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = data[pos:pos + n].reshape(shape)
        pos += n
        return out

    emb = take(cfg.vocab_size, d)
    rms_att = take(L, d)
    wq = take(L, cfg.n_heads * hs, d)
    wk = take(L, cfg.n_kv_heads * hs, d)
    wv = take(L, cfg.n_kv_heads * hs, d)
    wo = take(L, d, cfg.n_heads * hs)
    rms_ffn = take(L, d)
    w1 = take(L, h, d)
    w2 = take(L, d, h)
    w3 = take(L, h, d)
    rms_final = take(d)
    take(cfg.seq_len, hs)  # freq_cis_real and freq_cis_imag: RoPE tables, recomputed by the engine
    wcls = emb if cfg.shared_classifier else take(cfg.vocab_size, d)

    w = {"model.embed_tokens.weight": emb}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = wq[i]
        w[p + "self_attn.k_proj.weight"] = wk[i]
        w[p + "self_attn.v_proj.weight"] = wv[i]
        w[p + "self_attn.o_proj.weight"] = wo[i]
        w[p + "mlp.gate_proj.weight"] = w1[i]
        w[p + "mlp.down_proj.weight"] = w2[i]
        w[p + "mlp.up_proj.weight"] = w3[i]
        w[p + "input_layernorm.weight"] = rms_att[i]
        w[p + "post_attention_layernorm.weight"] = rms_ffn[i]
    w["model.norm.weight"] = rms_final
    if not cfg.shared_classifier:
        w["lm_head.weight"] = wcls
    return w


# --- tokenizer -------------------------------------------------------------------------------------

@dataclass
class SentencePieceModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    precompiled_charsmap: bytes = b""


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """Parse a SentencePiece ModelProto: pieces (field 1) and normalizer_spec (field 3)."""
    model = SentencePieceModel(pieces=[])
    for field, _, value in _proto_fields(path.read_bytes()):
        if field == 1:
            piece, score, kind = "", 0.0, NORMAL
            for f, _, v in _proto_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif field == 3:
            for f, _, v in _proto_fields(value):
                if f == 2:
                    model.precompiled_charsmap = v
                elif f == 3:
                    model.add_dummy_prefix = bool(v)
                elif f == 4:
                    model.remove_extra_whitespaces = bool(v)
    return model


def read_llama2c_tokenizer(path: Path, vocab_size: int) -> SentencePieceModel:
    """llama2.c's tokenizer .bin: max_token_length, then (score f32, length i32, bytes) per token.

    Its exporter wrote "▁" as a space and BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n"; undo both. It keeps no
    normalizer settings, so SentencePiece's defaults (those llama2.c trains with) are assumed.
    """
    buf = path.read_bytes()
    pos, pieces = 4, []
    for i in range(vocab_size):
        score, n = struct.unpack_from("<fi", buf, pos)
        text = buf[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        if text.strip() in ("<s>", "</s>"):
            pieces.append((text.strip(), score, CONTROL))
        elif text == "<unk>":
            pieces.append((text, score, UNKNOWN))
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            pieces.append((text, score, BYTE))
        else:
            pieces.append((text.replace(" ", "▁"), score, NORMAL))
    return SentencePieceModel(pieces=pieces)


def sentencepiece_to_tokenizer_json(sp: SentencePieceModel, bos_id: int = 1) -> str:
    """A `tokenizers` BPE that encodes as SentencePiece's BPE does, as a tokenizer.json string.

    SentencePiece merges, at each step, the adjacent pair whose union is the highest-scoring piece; a BPE
    merge list holding every split of every piece, ranked by the merged piece's score, does the same.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
    mergeable = [(p, s, i) for i, (p, s, t) in enumerate(sp.pieces) if t in (NORMAL, USER_DEFINED)]
    merges = []
    for piece, score, i in sorted(mergeable, key=lambda x: (-x[1], x[2])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
    unk = next((p for p, _, t in sp.pieces if t == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=any(t == BYTE for _, _, t in sp.pieces)))
    steps = []
    if sp.precompiled_charsmap:
        steps.append(normalizers.Precompiled(sp.precompiled_charsmap))
    if sp.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if sp.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if sp.add_dummy_prefix else []))
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, t in sp.pieces if t in (UNKNOWN, CONTROL)])
    bos = sp.pieces[bos_id][0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tok.to_str(pretty=True)


def _find_sources(src: Path) -> tuple[Path, Llama2cConfig, Path | None, Path | None]:
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder" if not src.exists() else f"{src}: not a folder")
    model_file = cfg = None
    tok_bins = []
    for path in sorted(src.glob("*.bin")):
        header = read_llama2c_header(path)
        if header and model_file is None:
            model_file, cfg = path, header
        elif not header:
            tok_bins.append(path)
    if model_file is None:
        raise ValueError(f"{src}: no llama2.c (legacy v0) weight file among its *.bin files")
    sp_models = sorted(src.glob("*.model"))
    if not sp_models and not tok_bins:
        raise ValueError(f"{src}: no tokenizer (*.model or llama2.c tokenizer *.bin) beside {model_file.name}")
    return model_file, cfg, (sp_models[0] if sp_models else None), (tok_bins[0] if tok_bins else None)


# --- the folder ------------------------------------------------------------------------------------

def convert_llama2c(src_dir, out_dir, bits: int | None = None, group_size: int = 32) -> Path:
    """Write SRC_DIR's llama2.c model as an MLX checkpoint folder OUT_DIR (float32, or `bits`-quantized)."""
    src, out = Path(src_dir), Path(out_dir)
    model_file, cfg, sp_file, tok_bin = _find_sources(src)
    sp = read_sentencepiece_model(sp_file) if sp_file else read_llama2c_tokenizer(tok_bin, cfg.vocab_size)
    if len(sp.pieces) != cfg.vocab_size:
        raise ValueError(f"{src}: tokenizer has {len(sp.pieces)} pieces, the model a vocabulary of {cfg.vocab_size}")
    out.mkdir(parents=True, exist_ok=True)

    weights = {}
    total_parameters = 0
    for name, w in read_llama2c_weights(model_file, cfg).items():
        w = mx.array(w)
        total_parameters += w.size
        module = name.removesuffix(".weight")
        if bits and w.ndim == 2 and w.shape[-1] % group_size == 0:
            q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
            weights.update({f"{module}.weight": q, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            weights[name] = w
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values()),
                          "total_parameters": total_parameters},
             "weight_map": {k: "model.safetensors" for k in sorted(weights)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "rope_traditional": True,  # llama2.c rotates adjacent pairs (2i, 2i+1)
        "tie_word_embeddings": cfg.shared_classifier, "torch_dtype": "float32",
        "bos_token_id": BOS_ID, "eos_token_id": END_IDS,
    }
    if bits:
        config["quantization"] = config["quantization_config"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    generation_config = {"bos_token_id": BOS_ID, "eos_token_id": END_IDS}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=4))

    (out / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(sp), encoding="utf-8")
    names = [p for p, _, _ in sp.pieces]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[1], "eos_token": names[2], "unk_token": names[0],
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.seq_len, "chat_template": PLAIN_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return out
