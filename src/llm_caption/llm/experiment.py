"""Fine-tune every configured method on one base model and measure them side by side.

:func:`run_methods` is the whole study: the base model is loaded once and deep-copied per
method; each method trains, is evaluated, answers the fixed prompts and a few test questions,
is saved, and gets its own MLflow run (nested under the active pipeline run, if any).
"""

from __future__ import annotations

import copy
import gc
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from ..tracking import child_run
from .adapters import save_finetuned
from .chat_format import as_messages, first_user_turn, tokenize_conversations
from .generation import generate_answers
from .methods import MethodContext, build_method, count_parameters
from .models import load_model, load_tokenizer, train_chat_template
from .text_metrics import persian_share
from .training import TrainResult, train_method

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["method", "trainable_params", "total_params", "trainable_pct", "peak_memory_mb", "train_time_s",
                  "step_time_s", "tokens_per_s", "eval_loss", "perplexity", "persian_share",
                  "english_prompt_persian_share", "mlflow_run_id",
                  "adapter_dir"]
LOSS_COLUMNS = ["method", "step", "split", "loss"]
GENERATION_COLUMNS = ["method", "stage", "prompt_kind", "prompt", "reference", "answer"]


def check_chat_frame(frame: pd.DataFrame, name: str) -> None:
    """Fail with a clear message when a chat split lacks the columns of docs/datasets.md or is empty."""
    missing = {"conversation_id", "messages"} - set(frame.columns)
    if missing:
        raise ValueError(f"{name}: missing column(s) {sorted(missing)}; has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{name}: no conversations")


def sample_rows(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """``n`` rows drawn with ``seed`` (all rows, in order, when ``n`` is null or not smaller)."""
    if n is None or n >= len(frame):
        return frame
    return frame.sample(n=int(n), random_state=seed).sort_index()


def eval_subset(chat_test: pd.DataFrame, cfg: Mapping[str, Any], seed: int) -> pd.DataFrame:
    """The test conversations the eval loss is measured on (the same for every method)."""
    return sample_rows(chat_test, cfg.get("n_eval_conversations"), seed)


def selected_methods(cfg: Mapping[str, Any]) -> list[str]:
    """Methods to run: ``methods_to_run`` (null: every method in ``methods``), checked against ``methods``."""
    methods = cfg["methods"]
    chosen = cfg.get("methods_to_run") or list(methods)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise ValueError(f"methods_to_run names unknown method(s) {unknown}; configured: {list(methods)}")
    return list(chosen)


def generation_prompts(chat_test: pd.DataFrame, cfg: Mapping[str, Any], seed: int) -> list[dict[str, Any]]:
    """Fixed prompts plus ``n_test_generations`` test questions (first user turn) with reference answers."""
    prompts = [{"prompt_kind": "fixed", "conversation": [{"role": "user", "content": p}], "prompt": p, "reference": ""}
               for p in cfg["fixed_prompts"]]
    test = sample_rows(chat_test, cfg.get("n_test_generations", 0), seed + 1)
    for conv_id, raw in zip(test["conversation_id"], test["messages"], strict=True):
        conversation, reference = first_user_turn(as_messages(raw, f"chat_test conversation {conv_id}"))
        prompts.append({"prompt_kind": "test", "conversation": conversation,
                        "prompt": conversation[-1]["content"], "reference": reference})
    return prompts


def method_settings(cfg: Mapping[str, Any], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method config, training settings = shared ``training`` overridden by the method's ``training``)."""
    method_cfg = dict(cfg["methods"][method])
    training = {**dict(cfg.get("training") or {}), **dict(method_cfg.get("training") or {})}
    return method_cfg, training


def _generation_rows(method: str, stage: str, prompts: list[dict[str, Any]], answers: list[str]) -> list[dict]:
    return [{"method": method, "stage": stage, "prompt_kind": p["prompt_kind"], "prompt": p["prompt"],
             "reference": p["reference"], "answer": a} for p, a in zip(prompts, answers, strict=True)]


def fixed_prompt_share(prompts: list[dict[str, Any]], answers: list[str], persian_prompts: bool = True) -> float:
    """Persian-script share of the letters in the answers to the fixed prompts written in Persian (all answers
    joined); ``persian_prompts=False``: the same share for the fixed prompts written in another script (the
    English prompt, which a Persian-tuned model should still answer in Persian)."""
    chosen = [a for p, a in zip(prompts, answers, strict=True)
              if p["prompt_kind"] == "fixed" and (persian_share(p["prompt"]) >= 0.5) == persian_prompts]
    return persian_share(" ".join(chosen))


def _log_method_run(method: str, method_cfg: Mapping[str, Any], training: Mapping[str, Any], row: dict[str, Any],
                    result: TrainResult, generations: pd.DataFrame, adapter_dir: Path | None) -> str:
    tags = {"llm_caption.pipeline": "llm_finetuning", "llm_caption.method": method}
    with child_run(method, tags=tags, params={"method": method_cfg, "training": training}) as run:
        mlflow.log_metrics({k: float(row[k]) for k in ("trainable_params", "total_params", "trainable_pct",
                                                       "peak_memory_mb", "train_time_s", "step_time_s",
                                                       "tokens_per_s", "eval_loss", "perplexity",
                                                       "persian_share", "english_prompt_persian_share")})
        for entry in result.loss_history:
            mlflow.log_metric(f"{entry['split']}_loss", entry["loss"], step=entry["step"])
        mlflow.log_table(data=generations, artifact_file="generations.json")
        if adapter_dir is not None:
            mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        return run.info.run_id


def run_methods(chat_train: pd.DataFrame, chat_test: pd.DataFrame, cfg: Mapping[str, Any],
                model_spec: Mapping[str, Any], seed: int) -> dict[str, pd.DataFrame]:
    """Train, measure, save and track every selected method; return the three result tables."""
    if cfg.get("torch_num_threads"):
        torch.set_num_threads(int(cfg["torch_num_threads"]))
    check_chat_frame(chat_train, "chat_train")
    check_chat_frame(chat_test, "chat_test")
    methods = selected_methods(cfg)
    tokenizer = load_tokenizer(model_spec)
    template = train_chat_template(model_spec)
    max_len = cfg.get("max_seq_len")
    train_rows = sample_rows(chat_train, cfg.get("n_train_conversations"), seed)
    eval_rows = eval_subset(chat_test, cfg, seed)
    train_ds = tokenize_conversations(tokenizer, zip(train_rows["conversation_id"], train_rows["messages"]), template, max_len)
    eval_ds = tokenize_conversations(tokenizer, zip(eval_rows["conversation_id"], eval_rows["messages"]), template, max_len)
    prompts = generation_prompts(chat_test, cfg, seed)
    logger.info("llm_finetuning: %d methods, %d train / %d eval conversations, %d prompts, max_seq_len=%s",
                len(methods), len(train_ds), len(eval_ds), len(prompts), max_len)

    # The base model stays unquantised; a method that wants quantised weights (qlora) asks for them.
    base_model = load_model(model_spec, quantization={})
    if torch.cuda.is_available():
        base_model = base_model.to("cuda")
    conversations = [p["conversation"] for p in prompts]
    before = generate_answers(base_model, tokenizer, conversations, cfg.get("generation") or {})
    before_rows = _generation_rows("base", "before", prompts, before)
    out_root = Path(cfg["output_dir"])
    ckpt_root = Path(cfg["checkpoint_dir"])

    results, losses, generations = [], [], list(before_rows)
    for method in methods:
        method_cfg, training = method_settings(cfg, method)
        trains = method_cfg.get("builder") != "none"
        model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer, seed=seed))
        trainable, total = count_parameters(model)
        result = train_method(model, tokenizer, train_ds, eval_ds, training, ckpt_root / method, seed, train=trains)
        answers = generate_answers(model, tokenizer, conversations, cfg.get("generation") or {}) if trains else before
        rows = _generation_rows(method, "after", prompts, answers)
        adapter_dir = save_finetuned(model, out_root / method, method, method_cfg, model_spec) if trains else None
        row = {"method": method, "trainable_params": trainable, "total_params": total,
               "trainable_pct": 100.0 * trainable / total, "peak_memory_mb": result.peak_memory_mb,
               "train_time_s": result.train_time_s, "step_time_s": result.step_time_s,
               "tokens_per_s": result.tokens_per_s, "eval_loss": result.eval_loss,
               "perplexity": result.perplexity, "persian_share": fixed_prompt_share(prompts, answers),
               "english_prompt_persian_share": fixed_prompt_share(prompts, answers, persian_prompts=False),
               "adapter_dir": str(adapter_dir) if adapter_dir else ""}
        table = pd.DataFrame(before_rows + rows)[GENERATION_COLUMNS]
        row["mlflow_run_id"] = _log_method_run(method, method_cfg, training, row, result, table, adapter_dir)
        logger.info("[%s] trainable %s (%.3f%%) | %d steps, %.2f s/step, %.0f tok/s | peak %.0f MB | "
                    "eval loss %.4f (ppl %.1f) | Persian share %.2f%s", method, f"{trainable:,}",
                    row["trainable_pct"], result.steps, result.step_time_s, result.tokens_per_s,
                    result.peak_memory_mb, result.eval_loss, result.perplexity, row["persian_share"],
                    f" | resumed from {result.resumed_from}" if result.resumed_from else "")
        results.append(row)
        losses.extend({"method": method, **entry} for entry in result.loss_history)
        generations.extend(rows)
        if not cfg.get("keep_checkpoints", False):
            shutil.rmtree(ckpt_root / method, ignore_errors=True)
        del model
        gc.collect()

    return {
        "llm_method_results": pd.DataFrame(results, columns=RESULT_COLUMNS),
        "llm_loss_history": pd.DataFrame(losses, columns=LOSS_COLUMNS),
        "llm_generations": pd.DataFrame(generations, columns=GENERATION_COLUMNS),
    }
