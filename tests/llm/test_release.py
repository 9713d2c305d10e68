"""The release stage on a tiny random Gemma-3: it trains only the study's best method by dev bits/char, early-stops
on the dev split, answers every test question beside the untuned model and the study champion, resumes after a
kill without retraining the study, and registers by the champion rule. Sequence lengths are chosen from the data
and every answer that fits ends with the end-of-turn token in its labels."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from chat_fixtures import chat_frames, load_conf, persian_conversations
from gemma_fixtures import gemma_spec, gemma_tokenizer, tiny_gemma_spec  # noqa: F401 (fixtures)
from llm_caption.llm.chat_format import (IGNORE_INDEX, choose_max_seq_len, labelled_end, resolve_max_seq_len,
                                         tokenize_conversation)
from llm_caption.llm.experiment import RESULT_FILE, dev_split, run_methods
from llm_caption.llm.models import train_chat_template
from llm_caption.llm.release import run_release
from llm_caption.pipelines.llm_finetuning.nodes import register_best_method
from test_gemma import _child_runs, _study_cfg, store  # noqa: F401 (fixture)

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _release_cfg(tmp_path: Path, methods: list[str], **release_training) -> dict:
    cfg = _study_cfg(tmp_path, methods)
    cfg["release"] = {"enabled": True, "n_test_answers": None,
                      "training": {"max_steps": 6, "eval_steps": 2, "early_stopping_patience": 1, **release_training}}
    cfg["methods"]["prompt_tuning"]["training"] = {"learning_rate": 1e-6}  # a sure loser on dev
    return cfg


def test_choose_max_seq_len_takes_the_shortest_window_that_holds_the_asked_share():
    ends = [10, 20, 30, 40, 50, 60, 70, 80, 90, 500]
    chosen = choose_max_seq_len(ends, coverage=0.9, multiple_of=32, cap=512)
    assert chosen["max_seq_len"] == 96 and chosen["share_fitting"] == 0.9 and chosen["longest"] == 500
    assert choose_max_seq_len(ends, coverage=0.8, multiple_of=32)["max_seq_len"] == 96  # 64 holds 6 of 10
    assert choose_max_seq_len(ends, coverage=1.0, multiple_of=32, cap=256) == {
        "max_seq_len": 256, "coverage": 1.0, "share_fitting": 0.9, "n_conversations": 10, "longest": 500}
    with pytest.raises(ValueError, match="coverage must be in"):
        choose_max_seq_len(ends, coverage=0)


def test_every_answer_that_fits_ends_with_end_of_turn_in_its_labels(gemma_spec, gemma_tokenizer):
    tok = gemma_tokenizer
    template = train_chat_template(gemma_spec)
    conversations = [(str(i), c) for i, c in enumerate(persian_conversations(40))]
    chosen = resolve_max_seq_len("auto", tok, conversations, template, {"coverage": 0.9, "multiple_of": 8, "max": 512})
    length = chosen["max_seq_len"]
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    fitting = 0
    for _, messages in conversations:
        row = tokenize_conversation(tok, messages, template, length)
        full = tokenize_conversation(tok, messages, template)
        if labelled_end(full["labels"]) <= length:
            fitting += 1
            labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
            assert labelled[-1] == end_of_turn
            assert labelled == [t for t in full["labels"] if t != IGNORE_INDEX]  # nothing of the answer cut
    assert fitting / len(conversations) == chosen["share_fitting"] >= 0.9
    # One multiple shorter would hold less than 90%.
    shorter = resolve_max_seq_len(length - 8, tok, conversations, template)
    assert shorter["share_fitting"] < 0.9 and shorter["max_seq_len"] == length - 8


def test_release_trains_only_the_best_dev_method_and_answers_every_test_question(tiny_gemma_spec, tmp_path, store):
    train, test = chat_frames(12, 4)
    methods = ["base", "prompt_tuning", "lora"]
    cfg = _release_cfg(tmp_path, methods)
    tables = run_methods(train, test, cfg, tiny_gemma_spec, seed=0, release=run_release)
    results = tables["llm_method_results"]
    study = results[results["stage"] == "study"]
    assert study["method"].tolist() == methods and (results["status"] == "ok").all()
    best = study[study["method"] != "base"].sort_values("dev_bits_per_char").iloc[0]["method"]
    assert best == "lora"
    release = results.iloc[-1]
    assert release["stage"] == "release" and release["method"] == "lora-release"
    assert math.isfinite(release["dev_bits_per_char"]) and math.isfinite(release["bits_per_char"])
    assert 1 <= release["train_steps"] <= 6
    # The dev conversations are held out of training: 12 - 4 train.
    rest, dev = dev_split(train, cfg, seed=0)
    assert len(dev) == 4 and len(rest) == 8
    runs = _child_runs(store)
    assert runs.count("lora-release") == 1 and not any(r.endswith("-release") and r != "lora-release" for r in runs)
    losses = tables["llm_loss_history"]
    assert set(losses[losses["method"] == "lora-release"]["split"]) == {"train", "dev"}

    table = tables["llm_release_results"]
    assert table["role"].tolist() == ["untuned", "study champion", "release"]
    assert table["method"].tolist() == ["base", "lora", "lora-release"]
    assert (table["n_test_answers"] == len(test)).all()
    assert table["ended_rate"].between(0, 1).all() and (table["answer_chars"] >= 0).all()
    generations = tables["llm_generations"]
    final = generations[generations["stage"] == "final"]
    assert final.groupby("method").size().to_dict() == {"base": len(test) + 1, "lora": len(test) + 1}
    released = generations[(generations["method"] == "lora-release") & (generations["prompt_kind"] == "test")]
    assert len(released) == len(test)

    # The same configuration again: nothing trained, generated or logged again.
    again = run_methods(train, test, cfg, tiny_gemma_spec, seed=0, release=run_release)
    pd.testing.assert_frame_equal(again["llm_method_results"], results)
    pd.testing.assert_frame_equal(again["llm_release_results"], table)
    assert _child_runs(store) == runs

    # Registration: the study's best first, then the release model, each judged by the champion rule.
    params = {**cfg, "registry": {"model_name": "release-test", "metric": "dev_bits_per_char"}}
    worse = results.copy()
    worse.loc[worse.index[-1], "dev_bits_per_char"] = float(best_value(results)) + 1.0
    decision = register_best_method(worse, train, test, params, seed=0)
    assert decision["method"] == "lora" and decision["promoted"]
    assert decision["release"]["method"] == "lora-release" and not decision["release"]["promoted"]
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("release-test", "champion").version) == decision["version"]
    decision = register_best_method(results, train, test, params, seed=0)
    if results.iloc[-1]["dev_bits_per_char"] < best_value(results):
        assert decision["release"]["promoted"]
        assert str(client.get_model_version_by_alias("release-test", "champion").version) == decision["release"]["version"]
    else:
        assert not decision["release"]["promoted"]


def best_value(results: pd.DataFrame) -> float:
    study = results[(results["stage"] == "study") & (results["method"] != "base")]
    return float(study["dev_bits_per_char"].min())


def test_a_release_killed_in_training_resumes_without_retraining_the_study(tiny_gemma_spec, tmp_path, store, caplog):
    cfg = _release_cfg(tmp_path, ["base", "lora"], max_steps=60, eval_steps=5, early_stopping_patience=100)
    (tmp_path / "cfg.json").write_text(json.dumps({"cfg": cfg, "spec": tiny_gemma_spec}), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    worker = subprocess.Popen([sys.executable, str(HERE / "study_worker.py"), str(tmp_path / "cfg.json")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = Path(cfg["checkpoint_dir"]) / "lora-release" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 240
    while not checkpoint.exists() and worker.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert worker.poll() is None, "the study ended before its release training could be killed"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert not (Path(cfg["output_dir"]) / "lora-release" / RESULT_FILE).exists()
    runs_before = _child_runs(store)
    assert runs_before.count("lora") == 1 and "lora-release" not in runs_before

    train, test = chat_frames(12, 4)
    with caplog.at_level(logging.INFO, logger="llm_caption"):
        results = run_methods(train, test, cfg, tiny_gemma_spec, seed=0, release=run_release)["llm_method_results"]
    assert results["method"].tolist() == ["base", "lora", "lora-release"] and (results["status"] == "ok").all()
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming from")]
    assert len(resumed) == 1 and "lora-release/checkpoint-" in resumed[0]
    assert int(resumed[0].rsplit("-", 1)[-1]) >= 10
    after = _child_runs(store)
    assert after.count("base") == after.count("lora") == after.count("lora-release") == 1  # the study not retrained


def test_the_release_needs_a_dev_split(tiny_gemma_spec, tmp_path, store):
    train, test = chat_frames(8, 2)
    cfg = _release_cfg(tmp_path, ["base", "lora"])
    cfg["n_dev_conversations"] = 0
    with pytest.raises(ValueError, match="release needs a dev split"):
        run_methods(train, test, cfg, tiny_gemma_spec, seed=0, release=run_release)


def test_each_study_registers_under_its_own_name_in_its_config():
    base = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]
    study = load_conf("conf/persian_study/parameters_llm_finetuning.yml")["llm_finetuning"]
    assert base["registry"]["model_name"] == "persian-chat-quickstart"
    assert study["registry"]["model_name"] == "persian-chat-adapter"
    assert study["release"]["enabled"] and not base["release"]["enabled"]
    readme = (HERE.parents[1] / "README.md").read_text(encoding="utf-8")
    for name in ("persian-chat-quickstart", "persian-chat-adapter"):
        assert f"models:/{name}@champion" in readme
