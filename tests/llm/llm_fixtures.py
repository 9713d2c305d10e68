"""Shared real assets for the LLM tests: the packaged SmolLM2 tokenizer and model (conf/smoke's model), loaded
once per session.

Test modules import these fixtures by name (``from llm_fixtures import base_model, ...``); the
loaders are cached, so the GGUF file is read once however many modules use them.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from chat_fixtures import load_conf


@functools.cache
def _model_spec() -> dict:
    """The fast model of the tests (conf/smoke's ``llm_model``: SmolLM2-135M-Instruct)."""
    return load_conf("conf/base/parameters.yml")["llm_models"][load_conf("conf/smoke/parameters.yml")["llm_model"]]


@functools.cache
def _tokenizer():
    from llm_caption.llm.models import load_tokenizer

    return load_tokenizer(_model_spec())


@functools.cache
def _base_model():
    from llm_caption.llm.models import load_model

    torch.set_num_threads(1)  # the machine is shared: one thread avoids oversubscription stalls
    model = load_model(_model_spec())
    model.eval()
    return model


@pytest.fixture
def model_spec() -> dict:
    return copy.deepcopy(_model_spec())


@pytest.fixture
def finetuning_cfg() -> dict:
    return load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]


@pytest.fixture
def tokenizer():
    return _tokenizer()


@pytest.fixture
def base_model():
    """The fp32 base model; tests deep-copy it before changing anything."""
    return _base_model()
