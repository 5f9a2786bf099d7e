"""Session fixtures: the mlx-lm checkpoints (built once per test session) and the demo's files."""

from __future__ import annotations

import pytest

from tests import checkpoints


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
