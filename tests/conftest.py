"""Session fixtures: the mlx-lm checkpoints (built once per test session) and the demo's files."""

from __future__ import annotations

import pytest

from tests import checkpoints
from tests.swarm_harness import SOLO_CHAT, SOLO_MAX_TOKENS, Daemon, cli_generate, free_port, ready_swarm


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> checkpoints.Checkpoint:
    """Qwen2-shaped, bfloat16, group 64, random weights; 6 layers."""
    return checkpoints.tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-4bit"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> checkpoints.Checkpoint:
    """stories260K-shaped llama (tied, traditional RoPE, group 32, dense down_proj), random weights; 5 layers."""
    return checkpoints.tiny_llama(tmp_path_factory.mktemp("tiny-llama-4bit"))


@pytest.fixture
def stories260k():
    """The demo's llama2.c folder (real trained weights), or a skip saying why it cannot be had."""
    return checkpoints.require_demo()


@pytest.fixture(scope="module")
def solo_demo(tmp_path_factory):
    """A one-node demo daemon of the module's own, ready."""
    workdir = tmp_path_factory.mktemp("solo-demo")
    node = Daemon("solo", "127.0.0.1", free_port(), ["--model", "demo", "--no-mdns", "--speed", "1",
                                                     "--cache-dir", str(workdir / "cache")],
                  workdir, {"XDG_CACHE_HOME": str(workdir / "xdg")})
    node.workdir = workdir
    with ready_swarm([node], nodes=1):
        yield node


@pytest.fixture(scope="module")
def solo_demo_answer(solo_demo) -> str:
    """What `cake-swarm generate` on one node answers SOLO_CHAT in SOLO_MAX_TOKENS tokens."""
    return cli_generate(solo_demo.workdir, "--prompt", SOLO_CHAT, "--max-tokens", str(SOLO_MAX_TOKENS))
