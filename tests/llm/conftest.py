"""Shared real assets for the LLM tests: the packaged SmolLM2 tokenizer and model, loaded once per session."""

from __future__ import annotations

import copy

import pytest
import torch

from chat_fixtures import load_conf


@pytest.fixture(scope="session")
def model_spec() -> dict:
    params = load_conf("conf/base/parameters.yml")
    return params["llm_models"][params["llm_model"]]


@pytest.fixture(scope="session")
def finetuning_cfg() -> dict:
    return load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]


@pytest.fixture(scope="session")
def tokenizer(model_spec):
    from llm_caption.llm.models import load_tokenizer

    return load_tokenizer(model_spec)


@pytest.fixture(scope="session")
def base_model(model_spec):
    """The fp32 base model; tests deep-copy it before changing anything."""
    from llm_caption.llm.models import load_model

    torch.set_num_threads(1)  # the machine is shared: one thread avoids oversubscription stalls
    model = load_model(model_spec)
    model.eval()
    return model


@pytest.fixture
def fresh_model(base_model):
    return copy.deepcopy(base_model)
