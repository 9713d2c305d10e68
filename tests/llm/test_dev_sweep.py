"""The dev sweep chooses settings on conversations held out of chat_train: the dev split is disjoint from what
trains, each ``--set`` value is one variant, and every variant is measured on the dev split like a method."""

from __future__ import annotations

import math

import mlflow
import pytest

from chat_fixtures import chat_frames, load_conf
from gemma_fixtures import tiny_gemma_spec  # noqa: F401 (fixture)
from llm_caption.llm.dev_sweep import parse_value, split_dev, sweep, variants


def _cfg() -> dict:
    return load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]


def test_each_value_of_a_setting_is_one_variant_of_the_method():
    cfg = _cfg()
    configured = cfg["methods"]["lora"]["training"]["learning_rate"]
    assert configured not in (3.0e-3, 6.0e-3)
    out = variants(cfg, "lora", ["learning_rate=3.0e-3,6.0e-3", "r=8"])
    assert list(out) == ["lora(learning_rate=3.0e-3)", "lora(learning_rate=6.0e-3)", "lora(r=8)"]
    assert out["lora(learning_rate=6.0e-3)"]["training"]["learning_rate"] == pytest.approx(6.0e-3)
    assert out["lora(r=8)"]["options"]["r"] == 8 and out["lora(r=8)"]["training"]["learning_rate"] == configured
    assert cfg["methods"]["lora"]["training"]["learning_rate"] == configured  # the study's config is not changed
    assert parse_value("true") is True and parse_value("16") == 16 and parse_value("cosine") == "cosine"
    with pytest.raises(ValueError, match="key=value"):
        variants(cfg, "lora", ["learning_rate"])
    with pytest.raises(ValueError, match="'nope' is not in llm_finetuning.methods"):
        variants(cfg, "nope", ["learning_rate=1.0e-3"])


def test_the_dev_split_is_drawn_from_chat_train_and_disjoint_from_what_trains():
    train, _ = chat_frames(20, 2)
    rest, dev = split_dev(train, 6, seed=3)
    assert len(dev) == 6 and len(rest) == 14
    assert not set(dev["conversation_id"]) & set(rest["conversation_id"])
    assert split_dev(train, 6, seed=3)[1]["conversation_id"].tolist() == dev["conversation_id"].tolist()
    with pytest.raises(ValueError, match="between 1 and 19 conversations"):
        split_dev(train, 20, seed=3)


def test_a_sweep_measures_the_untuned_model_and_every_variant_on_the_dev_split(tiny_gemma_spec, tmp_path):
    train, _ = chat_frames(14, 2)
    cfg = _cfg()
    cfg.update(n_test_generations=2, torch_num_threads=1, generation={"max_new_tokens": 4, "do_sample": False})
    cfg["training"] = {**cfg["training"], "max_steps": 2, "eval_steps": 2, "save_steps": 2, "bf16": False}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'sweep.db'}")
    try:
        table = sweep(train, cfg, tiny_gemma_spec, 0, "lora", ["learning_rate=1.0e-3,1.0e-2"], 4, tmp_path)
    finally:
        mlflow.set_tracking_uri(None)
    assert table["method"].tolist() == ["base", "lora(learning_rate=1.0e-3)", "lora(learning_rate=1.0e-2)"]
    assert (table["status"] == "ok").all()
    assert table["learning_rate"].tolist()[1:] == [1.0e-3, 1.0e-2]
    assert table["bits_per_char"].map(math.isfinite).all()
    # Different rates, different models: the sweep is not measuring one model three times.
    assert table["bits_per_char"].nunique() == 3
