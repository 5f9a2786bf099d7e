"""scripts/make_model.py: random-weight 4-bit checkpoints of real shapes, read back by mlx-lm."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from swarm.tensorfile import read_header

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_model.py"
spec = importlib.util.spec_from_file_location("make_model", SCRIPT)
make_model_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_model_module)
make_model = make_model_module.make_model


def q4_bytes(rows, cols, group=64):
    return rows * cols // 2 + 2 * (rows * cols // group) * 2  # packed codes + bf16 scales and biases


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_model("qwen2.5-0.5b", tmp_path_factory.mktemp("qwen"), layers=2, seed=0)


def test_qwen_files_have_the_shapes_bytes(qwen):
    d, inter, kv, vocab = 896, 4864, 128, 151936
    layer = (q4_bytes(d, d) * 2 + q4_bytes(kv, d) * 2 + q4_bytes(inter, d) * 2 + q4_bytes(d, inter)
             + (d + kv + kv) * 2 + 2 * d * 2)  # q/k/v biases and two norms, bf16
    expected = q4_bytes(vocab, d) + 2 * layer + d * 2
    files = sorted(qwen.glob("model-*.safetensors"))
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    tensors = {}
    for f in files:
        found, meta = read_header(f)
        assert meta == {"format": "mlx"}
        data = sum(t.nbytes for t in found.values())
        header = int.from_bytes(f.read_bytes()[:8], "little")
        assert f.stat().st_size == 8 + header + data
        tensors.update(found)
    assert sum(t.nbytes for t in tensors.values()) == expected
    index = json.loads((qwen / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == expected
    assert set(index["weight_map"]) == set(tensors)
    assert "lm_head.weight" not in tensors  # tied
    assert tensors["model.layers.1.self_attn.k_proj.bias"].shape == (128,)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == "U32"
    assert tensors["model.layers.0.mlp.down_proj.scales"].dtype == "BF16"
    assert tensors["model.embed_tokens.weight"].shape == (vocab, d // 8)


def test_qwen_loads_in_mlx_lm_with_finite_logits(qwen):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tokenizer = mlx_lm.load(str(qwen))
    model.set_dtype(mx.float32)  # the project's CPU policy; MLX's bf16 q4 path is very slow on CPU
    ids = tokenizer.encode("Hello, world!")
    assert tokenizer.decode(ids) == "Hello, world!"
    logits = np.array(model(mx.array([ids])).astype(mx.float32))
    assert logits.shape == (1, len(ids), 151936)
    assert np.isfinite(logits).all() and logits.std() > 0
    assert tokenizer.eos_token_ids == {151645}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_every_id_decodes(qwen):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(qwen / "tokenizer.json"))
    assert tok.get_vocab_size() == 151936
    assert tok.decode([300, 151643 - 1, 151935]) == " tok300 tok151642 tok151935"
    assert tok.decode([151644], skip_special_tokens=False) == "<|im_start|>"


def test_same_seed_same_layers_whatever_the_depth(qwen, tmp_path):
    other = make_model("qwen2.5-0.5b", tmp_path / "one", layers=1, seed=0)
    assert (other / "model-00002-of-00003.safetensors").read_bytes() == (qwen / "model-00002-of-00004.safetensors").read_bytes()
    reseeded = make_model("qwen2.5-0.5b", tmp_path / "seed1", layers=1, seed=1)
    assert (reseeded / "model-00002-of-00003.safetensors").read_bytes() != (other / "model-00002-of-00003.safetensors").read_bytes()


def test_llama_cli_writes_rope_scaling_and_bos(tmp_path):
    out = tmp_path / "llama"
    subprocess.run([sys.executable, str(SCRIPT), "--shape", "llama-3.2-1b", str(out), "--layers", "1"], check=True,
                   capture_output=True)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["head_dim"] == 64
    assert (config["num_hidden_layers"], config["vocab_size"], config["quantization"]["group_size"]) == (1, 128256, 64)
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tokenizer = mlx_lm.load(str(out))
    model.set_dtype(mx.float32)
    ids = tokenizer.encode("Hi")
    assert ids[0] == 128000
    assert np.isfinite(np.array(model(mx.array([ids])).astype(mx.float32))).all()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_unknown_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="qwen2.5-0.5b"):
        make_model("gpt-5", tmp_path)
