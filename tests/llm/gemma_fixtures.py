"""Gemma-3 assets for the tests: the packaged Gemma-3-270m spec and tokenizer (real), and a tiny randomly
initialised model of Gemma-3's architecture (sliding + full attention layers, one key/value head, tied and
scaled embeddings, the real 262,144-token vocabulary) so that every method can train a few steps quickly."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

from chat_fixtures import load_conf

GEMMA = "gemma3_270m"


@functools.cache
def _gemma_spec() -> dict:
    return load_conf("conf/base/parameters.yml")["llm_models"][GEMMA]


@functools.cache
def _gemma_tokenizer():
    from llm_caption.llm.models import load_tokenizer

    return load_tokenizer(_gemma_spec())


@pytest.fixture
def gemma_spec() -> dict:
    return copy.deepcopy(_gemma_spec())


@pytest.fixture
def gemma_tokenizer():
    return _gemma_tokenizer()


def write_tiny_gemma(directory: Path) -> dict:
    """Save a tiny random Gemma-3 model with the real Gemma tokenizer to ``directory``; its model spec."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=32,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = _gemma_tokenizer()
    tokenizer.save_pretrained(directory)
    spec = {k: v for k, v in _gemma_spec().items() if k not in ("package", "gguf_file")}
    spec.update(source="local", model_id=str(directory))
    return spec


@pytest.fixture(scope="module")
def tiny_gemma_spec(tmp_path_factory) -> dict:
    return write_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma"))
