"""The demo model against llama2.c: stories260K converted to float32, greedy from BOS, gives run.c's text
and stops where run.c stops (at the next BOS). Skips without the demo's files."""

import mlx.core as mx
import pytest

from swarm.model.convert import convert_llama2c
from swarm.model.decoder import load_stage
from swarm.model.generate import generate_text
from swarm.model.sampling import SamplingParams
from swarm.model.generate import Completion, generate_ids
from swarm.model.tokenizer import Tokenizer
from tests.checkpoints import require_demo

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
    return convert_llama2c(require_demo(), tmp_path_factory.mktemp("stories260K-f32"))


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


def test_a_story_ends_where_run_c_stops(float32_demo):
    """run.c ends at the first BOS it samples (id 1); so must every path, which all read the end ids from
    the checkpoint's config: the stream stops at that BOS and does not print it."""
    stage = load_stage(float32_demo, dtype=mx.float32)
    tokenizer = Tokenizer.load(float32_demo)
    prompt = tokenizer.encode("Once upon a time")
    free = list(generate_ids(stage, prompt, SamplingParams(max_tokens=1000)))
    end = free.index(1)
    assert 0 < end < 1000
    done = Completion()
    text = "".join(generate_text(stage, tokenizer, prompt, SamplingParams(max_tokens=1000), None, done))
    assert done.token_ids == free[:end + 1] and done.finish_reason == "stop"
    assert text == tokenizer.decode(free[:end]) and text.rstrip('"').endswith(('.', '!'))  # the story's last sentence
