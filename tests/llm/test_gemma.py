"""Gemma-3 in the study: its turn template labels exactly the assistant tokens, every method runs on its
architecture, a method that cannot run is a row that says why, finished methods are not retrained, and the
real packaged model learns to end its turn."""

from __future__ import annotations

import json
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
import torch

from chat_fixtures import chat_frames, load_conf, persian_conversations
from gemma_fixtures import gemma_spec, gemma_tokenizer, tiny_gemma_spec  # noqa: F401 (fixtures)
from llm_caption.llm.chat_format import IGNORE_INDEX, tokenize_conversation
from llm_caption.llm.experiment import RESULT_FILE, run_methods
from llm_caption.llm.models import train_chat_template
from llm_caption.llm.scoring import labelled_spans

HERE = Path(__file__).resolve().parent
CONVERSATION = [
    {"role": "system", "content": "به فارسی پاسخ بده."},
    {"role": "user", "content": "سلام، حالت چطوره؟"},
    {"role": "assistant", "content": "سلام! خوبم، ممنون."},
    {"role": "user", "content": "پایتخت ایران کجاست؟"},
    {"role": "assistant", "content": "تهران."},
]


def test_gemma_template_labels_exactly_the_assistant_turns(gemma_spec, gemma_tokenizer):
    tok = gemma_tokenizer
    row = tokenize_conversation(tok, CONVERSATION, train_chat_template(gemma_spec))
    spans = labelled_spans(row["labels"])
    assert [tok.decode(s) for s in spans] == ["سلام! خوبم، ممنون.<end_of_turn>", "تهران.<end_of_turn>"]
    # Everything else (bos, the system text folded into the first user turn, user turns, turn headers) is -100.
    unlabelled = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE_INDEX])
    assert unlabelled == ("<bos><start_of_turn>user\nبه فارسی پاسخ بده.\n\nسلام، حالت چطوره؟<end_of_turn>\n"
                          "<start_of_turn>model\n\n<start_of_turn>user\nپایتخت ایران کجاست؟<end_of_turn>\n"
                          "<start_of_turn>model\n\n")
    # The inference template renders the same text, so generation sees what training saw.
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(row["input_ids"]) == rendered
    prompt = tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(prompt) and prompt.endswith("<start_of_turn>model\n")
    assert tok.eos_token == "<end_of_turn>" and tok.pad_token == "<pad>"


def _study_cfg(tmp_path: Path, methods: list[str], **training) -> dict:
    cfg = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]
    smoke = load_conf("conf/smoke/parameters_llm_finetuning.yml")["llm_finetuning"]
    cfg.update({k: v for k, v in smoke.items() if k != "training"})
    cfg["training"] = {**cfg["training"], **smoke["training"], "bf16": False, **training}
    cfg.update(methods_to_run=methods, output_dir=str(tmp_path / "llm"), checkpoint_dir=str(tmp_path / "ckpt"),
               torch_num_threads=1)
    return cfg


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def _child_runs(uri: str) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = []
    for experiment in client.search_experiments():
        runs += [r.info.run_name for r in client.search_runs([experiment.experiment_id])]
    return sorted(runs)


def test_every_method_runs_two_steps_on_the_gemma3_architecture_and_a_rerun_reuses_them(
        tiny_gemma_spec, tmp_path, store):
    train, test = chat_frames(12, 4)
    methods = list(load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]["methods"])
    cfg = _study_cfg(tmp_path, methods)
    results = run_methods(train, test, cfg, tiny_gemma_spec, seed=0)["llm_method_results"]
    assert results["method"].tolist() == methods
    assert (results["status"] == "ok").all(), results[["method", "status"]].to_string()
    trained = results[results["method"] != "base"]
    assert (trained["trainable_params"] > 0).all()
    assert results["bits_per_char"].map(math.isfinite).all() and results["chrf_pp"].map(math.isfinite).all()
    runs_before = _child_runs(store)
    stamps = {m: (Path(cfg["output_dir"]) / m / RESULT_FILE).stat().st_mtime_ns for m in methods}

    again = run_methods(train, test, cfg, tiny_gemma_spec, seed=0)["llm_method_results"]
    pd.testing.assert_frame_equal(again, results)
    assert _child_runs(store) == runs_before  # nothing trained or logged again
    assert stamps == {m: (Path(cfg["output_dir"]) / m / RESULT_FILE).stat().st_mtime_ns for m in methods}


def test_a_method_that_cannot_run_is_a_failed_row_and_the_study_goes_on(tiny_gemma_spec, tmp_path, store):
    train, test = chat_frames(8, 4)
    cfg = _study_cfg(tmp_path, ["base", "broken", "lora"])
    cfg["methods"]["broken"] = {"builder": "lora", "options": {"r": 4, "target_modules": ["no_such_proj"]}}
    results = run_methods(train, test, cfg, tiny_gemma_spec, seed=0)["llm_method_results"].set_index("method")
    assert results.loc["broken", "status"].startswith("failed: NoMatchingPeftModuleError: Target modules {'no_such_proj'} not found")
    assert "\n" not in results.loc["broken", "status"] and math.isnan(results.loc["broken", "eval_loss"])
    assert results.loc["base", "status"] == results.loc["lora", "status"] == "ok"
    assert not (Path(cfg["output_dir"]) / "broken" / RESULT_FILE).exists()  # a failed method is tried again


def test_a_study_killed_during_a_method_does_not_retrain_the_methods_before_it(tiny_gemma_spec, tmp_path, store):
    cfg = _study_cfg(tmp_path, ["base", "lora", "loha"])
    cfg["methods"]["loha"]["training"] = {"max_steps": 400, "save_steps": 1000}  # long enough to be killed in
    (tmp_path / "cfg.json").write_text(json.dumps({"cfg": cfg, "spec": tiny_gemma_spec}), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    worker = subprocess.Popen([sys.executable, str(HERE / "study_worker.py"), str(tmp_path / "cfg.json")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lora_done = Path(cfg["output_dir"]) / "lora" / RESULT_FILE
    deadline = time.time() + 240
    while not lora_done.exists() and worker.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # inside loha's training
    assert worker.poll() is None, "the study ended before it could be killed"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert lora_done.exists() and not (Path(cfg["output_dir"]) / "loha" / RESULT_FILE).exists()
    saved = json.loads(lora_done.read_text(encoding="utf-8"))["row"]
    runs_before = _child_runs(store)

    cfg["methods"]["loha"]["training"] = {"max_steps": 2}
    train, test = chat_frames(12, 4)
    results = run_methods(train, test, cfg, tiny_gemma_spec, seed=0)["llm_method_results"].set_index("method")
    assert results.loc["lora", "mlflow_run_id"] == saved["mlflow_run_id"]
    assert results.loc["loha", "status"] == "ok"
    # Only loha ran again: base and lora keep their one run each (the killed loha had logged none).
    assert runs_before.count("lora") == 1 and "loha" not in runs_before
    after = _child_runs(store)
    assert after.count("base") == after.count("lora") == after.count("loha") == 1


@pytest.mark.slow
def test_the_packaged_gemma_learns_to_end_its_turn(gemma_spec, gemma_tokenizer, tmp_path):
    from llm_caption.llm.chat_format import tokenize_conversations
    from llm_caption.llm.generation import generate_answers
    from llm_caption.llm.methods import MethodContext, build_method
    from llm_caption.llm.models import load_model
    from llm_caption.llm.training import train_method

    torch.set_num_threads(2)
    tok = gemma_tokenizer
    conversations = [[{"role": "user", "content": c[0]["content"]}, {"role": "assistant", "content": "بله."}]
                     for c in persian_conversations(8)]
    data = tokenize_conversations(tok, [(str(i), c) for i, c in enumerate(conversations)],
                                  train_chat_template(gemma_spec), 48)
    model = build_method(load_model(gemma_spec), {"builder": "lora", "options": {
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        MethodContext(tokenizer=tok, seed=0))
    train_method(model, tok, data, data, {"max_steps": 12, "learning_rate": 3e-3, "per_device_train_batch_size": 4,
                                          "eval_steps": 12, "save_steps": 100, "resume": False}, tmp_path, seed=0)
    prompts = [[{"role": "user", "content": "امروز هوا خوب است؟"}], [{"role": "user", "content": "سلام"}]]
    settings = {"max_new_tokens": 16, "do_sample": False}
    answers = generate_answers(model, tok, prompts, settings)
    assert answers == ["بله.", "بله."]
    # The answers stopped at <end_of_turn>, well before max_new_tokens.
    enc = tok([tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[:1]],
              return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.convert_tokens_to_ids("<end_of_turn>") and len(new) < 16
