"""The demo model against llama2.c: stories260K converted to float32, greedy from BOS, gives run.c's text."""

from pathlib import Path

import mlx.core as mx
import pytest

from swarm.model.convert import convert_llama2c
from swarm.model.decoder import load_stage
from swarm.model.generate import generate_text
from swarm.model.sampling import SamplingParams
from swarm.model.tokenizer import Tokenizer

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"

# karpathy/llama2.c doc/stories260K.md: `./run stories260K/stories260K.bin -z stories260K/tok512.bin -t 0.0`
# (run.c's default of 256 steps: 256 tokens generated after BOS).
LLAMA2C_REFERENCE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, "
    "red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play "
    "with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" Her mom said, \"Don't "
    "worry, Lily. We can help you."
)


@pytest.fixture(scope="module")
def float32_demo(tmp_path_factory):
    return convert_llama2c(STORIES, tmp_path_factory.mktemp("stories260K-f32"))


def test_greedy_from_bos_reproduces_llama2c(float32_demo):
    stage = load_stage(float32_demo, dtype=mx.float32)
    tokenizer = Tokenizer.load(float32_demo)
    text = "".join(generate_text(stage, tokenizer, [tokenizer.bos_token_id], SamplingParams(max_tokens=256)))
    assert text == LLAMA2C_REFERENCE


def test_converted_config_is_llama2c_shaped(float32_demo):
    stage = load_stage(float32_demo)
    cfg = stage.cfg
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == \
        (64, 5, 8, 4, 512)
    assert cfg.rope_traditional and not stage.layers[0].mlp.down_proj.quantized
