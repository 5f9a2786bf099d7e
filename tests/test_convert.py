"""llama2.c -> MLX conversion: against mlx-lm's own 4-bit checkpoint, SentencePiece, and mlx-lm's reader.

These read the demo's real files (stories260K); without them (no copy and no network) they skip."""

import json
import shutil
import struct

import numpy as np
import pytest

from swarm.model.convert import convert_llama2c, read_llama2c_tokenizer, read_sentencepiece_model
from swarm.tensorfile import read_header
from tests.checkpoints import require_demo

@pytest.fixture(scope="module")
def stories():
    return require_demo()


@pytest.fixture(scope="module")
def q4(stories, tmp_path_factory):
    return convert_llama2c(stories, tmp_path_factory.mktemp("q4"), bits=4, group_size=32)


@pytest.fixture(scope="module")
def f32(stories, tmp_path_factory):
    return convert_llama2c(stories, tmp_path_factory.mktemp("f32"))


@pytest.fixture(scope="module")
def mlx_lm_q4(f32, tmp_path_factory):
    """mlx-lm's own 4-bit checkpoint of the float32 conversion: its loader, quantizer and saver."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    out = tmp_path_factory.mktemp("mlx-lm-q4")
    model, _ = load_model(f32)
    model, config = quantize_model(model, json.loads((f32 / "config.json").read_text()), 32, 4)
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f32 / name, out)
    return out


def test_4bit_matches_mlx_lm_byte_for_byte(q4, mlx_lm_q4):
    ours, _ = read_header(q4 / "model.safetensors")
    theirs, meta = read_header(mlx_lm_q4 / "model.safetensors")
    assert meta == {"format": "mlx"}
    assert {n: (t.dtype, t.shape) for n, t in ours.items()} == {n: (t.dtype, t.shape) for n, t in theirs.items()}
    assert "model.layers.0.mlp.down_proj.scales" not in ours  # 172 wide: not a multiple of 32
    assert ours["model.layers.0.mlp.gate_proj.weight"].dtype == "U32"
    assert (q4 / "model.safetensors").read_bytes() == (mlx_lm_q4 / "model.safetensors").read_bytes()
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((q4 / name).read_text()) == json.loads((mlx_lm_q4 / name).read_text())


def test_float32_config_and_tensors(f32):
    config = json.loads((f32 / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32" and "quantization" not in config
    assert (config["max_position_embeddings"], config["bos_token_id"]) == (512, 1)
    # run.c stops at BOS: a story ends with it; EOS stays an end too
    assert config["eos_token_id"] == [1, 2]
    assert json.loads((f32 / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": [1, 2]}
    tensors, _ = read_header(f32 / "model.safetensors")
    assert all(t.dtype == "F32" for t in tensors.values())
    assert tensors["model.layers.4.self_attn.k_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 172)
    assert "lm_head.weight" not in tensors
    index = json.loads((f32 / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)


def test_float32_weights_are_the_llama2c_floats(stories, f32):
    mx = pytest.importorskip("mlx.core")
    raw = np.fromfile(stories / "stories260K.bin", dtype="<f4", offset=28)
    w = mx.load(str(f32 / "model.safetensors"))
    np.testing.assert_array_equal(np.array(w["model.embed_tokens.weight"]).ravel(), raw[:512 * 64])
    # wq of layer 0 follows embedding (512x64) and rms_att (5x64)
    start = 512 * 64 + 5 * 64
    np.testing.assert_array_equal(np.array(w["model.layers.0.self_attn.q_proj.weight"]).ravel(), raw[start:start + 64 * 64])


def test_unshared_classifier_writes_lm_head(stories, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    raw = (stories / "stories260K.bin").read_bytes()
    header = list(struct.unpack("<7i", raw[:28]))
    header[5] = -header[5]
    wcls = np.arange(512 * 64, dtype="<f4")
    (src / "m.bin").write_bytes(struct.pack("<7i", *header) + raw[28:] + wcls.tobytes())
    shutil.copy(stories / "tok512.model", src)
    out = convert_llama2c(src, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 512
    mx = pytest.importorskip("mlx.core")
    np.testing.assert_array_equal(np.array(mx.load(str(out / "model.safetensors"))["lm_head.weight"]).ravel(), wcls)


def test_missing_model_file_is_a_clear_error(stories, tmp_path):
    shutil.copy(stories / "tok512.model", tmp_path)
    with pytest.raises(ValueError, match="no llama2.c"):
        convert_llama2c(tmp_path, tmp_path / "out")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="missing: no such folder"):
        convert_llama2c(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file: not a folder"):
        convert_llama2c(tmp_path / "file", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_both_tokenizer_formats_give_the_same_pieces(stories):
    from_model = read_sentencepiece_model(stories / "tok512.model")
    from_bin = read_llama2c_tokenizer(stories / "tok512.bin", 512)
    assert [(p, s) for p, s, _ in from_bin.pieces] == [(p, s) for p, s, _ in from_model.pieces]
    assert [t for _, _, t in from_bin.pieces] == [t for _, _, t in from_model.pieces]
    assert from_model.add_dummy_prefix and from_model.remove_extra_whitespaces


TEXTS = ["", "   ", " a  b ", "a\n\nb", "\tx", "x \n y", "  lead", "trail  ", "Hello world",
         "Once upon a time, there was a little girl named Lily. She loved to play 1234 games!",
         "héllo wörld 日本語 🎉 — “quotes” … \u200a"]


def test_tokenizer_json_encodes_and_decodes_as_sentencepiece(stories, f32):
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(stories / "tok512.model"))
    tok = Tokenizer.from_file(str(f32 / "tokenizer.json"))
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDE    \n.,!?0123456789éü日🎉\t-'")
    texts = TEXTS + ["".join(rng.choice(alphabet, size=rng.integers(0, 50))) for _ in range(500)]
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
    assert tok.encode("Once upon a time").ids == [1, 403, 407, 261, 378]  # BOS added


def test_tokenizer_config(f32):
    cfg = json.loads((f32 / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<s>", "</s>", True)


def test_mlx_lm_reads_both_conversions(q4, f32, mlx_lm_q4):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    prompt = [1, 403, 407, 261, 378]  # "Once upon a time"

    def greedy(folder, n):
        model, tokenizer = mlx_lm.load(str(folder))
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
        return ids[len(prompt):], tokenizer

    tokens, tokenizer = greedy(q4, 20)
    assert tokens == greedy(mlx_lm_q4, 20)[0]
    assert tokenizer.eos_token_ids == {1, 2}  # mlx-lm stops at BOS too
    tokens, tokenizer = greedy(f32, 30)
    assert tokenizer.encode("Once upon a time") == prompt
    text = tokenizer.decode(tokens)
    assert text.startswith(", there was a little girl named Lily."), text
