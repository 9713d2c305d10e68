"""The release stage: the study's best method trained again, longer, as ``<method>-release``.

The study gives every method the same short budget, which is right for ranking them side by side and wrong for
shipping one. After it, the method with the lowest **dev** bits per character (``n_dev_conversations`` held out of
``chat_train``; the test split never chooses) is trained again from its initial weights on the same training
conversations with the ``release.training`` settings: a longer ``max_steps``, the dev split evaluated every
``eval_steps``, training stopped once the dev loss has not improved for ``early_stopping_patience`` evaluations
and the best checkpoint kept. It is then measured exactly like the study's methods (eval loss and bits per
character on the eval split, bits per character on the dev split, answers), has its own MLflow run and its own
row ``<method>-release`` in ``llm_method_results``, and is registered by the same rule as the study's best.

Its answers cover every test question (``release.n_test_answers``, null: all), and so do the untuned model's and
the study champion's in the same stage, with the same decoding: ``llm_release_results`` compares the three on
chrF++, Persian share, ended rate and answer length over all of them (the study's methods answer
``n_test_generations`` questions only, to hold the study's budget).

The stage resumes like a method: a killed release training continues from its last checkpoint, and a finished
one (``<output_dir>/<method>-release/llm_caption_result.json``, same fingerprint) is not trained again; the study's
methods are reused from their own finished results.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .. import distributed
from .adapters import load_finetuned
from .experiment import (RELEASE_COLUMNS, BaseModel, MethodData, _generation_rows, answer_metrics, generation_batch,
                         generation_prompts, method_fingerprint, method_settings, read_finished, read_saved,
                         run_or_fail, write_saved)
from .generation import generate_answers
from .registration import best_method

logger = logging.getLogger(__name__)

RELEASE_SUFFIX = "-release"
RANKED_BY = "dev_bits_per_char"
FINAL_FILE = "llm_caption_final_answers.json"


def release_settings(cfg: Mapping[str, Any], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method config, training settings) of ``method``'s release: its study settings overridden by
    ``release.training``."""
    method_cfg, training = method_settings(cfg, method)
    return method_cfg, {**training, **dict((cfg.get("release") or {}).get("training") or {})}


def release_prompts(chat_test: pd.DataFrame, cfg: Mapping[str, Any], seed: int) -> list[dict[str, Any]]:
    """The fixed prompts and ``release.n_test_answers`` test questions (null: every one)."""
    n = (cfg.get("release") or {}).get("n_test_answers")
    return generation_prompts(chat_test, {**cfg, "n_test_generations": n}, seed)


def _final_answers(role: str, method: str, model, data: MethodData, prompts: list[dict[str, Any]],
                   cfg: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model's answers to ``prompts``: its measures and its generation rows (stage ``final``)."""
    answers, ended = generate_answers(model, data.tokenizer, [p["conversation"] for p in prompts],
                                      cfg.get("generation") or {}, batch_size=generation_batch(cfg),
                                      with_ended=True)
    measures = answer_metrics(prompts, answers, ended)
    logger.info("[release] %s (%s): chrF++ %.1f on %d test answers | ended %.2f | %.0f chars | Persian share %.2f",
                role, method, measures["chrf_pp"], measures["n_test_answers"], measures["ended_rate"],
                measures["answer_chars"], measures["test_persian_share"])
    return measures, _generation_rows(method, "final", prompts, answers)


def run_release(results: pd.DataFrame, base: BaseModel, data: MethodData, chat_test: pd.DataFrame,
                cfg: Mapping[str, Any], model_spec: Mapping[str, Any], seed: int, study: str, out_root: Path,
                ckpt_root: Path) -> dict[str, Any]:
    """Train and measure ``<best method>-release``; its row, loss history, answers and the ``llm_release_results``
    table (untuned model, study champion, release model on every test question)."""
    if data.dev_ds is None:
        raise ValueError("llm_finetuning.release needs a dev split to choose the method and its budget on: set "
                         "n_dev_conversations (e.g. 64)")
    start = time.perf_counter()
    champion = best_method(results[results["stage"] == "study"], RANKED_BY)
    method = str(champion["method"])
    name = f"{method}{RELEASE_SUFFIX}"
    method_cfg, training = release_settings(cfg, method)
    prompts = release_prompts(chat_test, cfg, seed)
    fingerprint = method_fingerprint(study, name, method_cfg, {**training, "n_test_answers": len(prompts)},
                                     distributed.world_size())
    reuse = bool(cfg.get("reuse_finished", True))
    logger.info("[release] %s has the lowest dev bits/char of the study (%.4f): training %s for at most %s steps, "
                "dev split every %s steps, patience %s", method, float(champion[RANKED_BY]), name,
                training.get("max_steps"), training.get("eval_steps"), training.get("early_stopping_patience"))
    finished = read_finished(out_root / name, fingerprint) if reuse else None
    if finished is None:
        finished = run_or_fail(name, method_cfg, training, base, data, cfg, model_spec, seed, out_root, ckpt_root,
                               fingerprint, prompts=prompts, select_on_dev=True)
    else:
        logger.info("[release] finished %s for this configuration found in %s: not retrained", name, out_root / name)
    row = {"world_size": 1, **finished["row"], "stage": "release"}

    final = read_saved(out_root / name / FINAL_FILE, _final_key(fingerprint)) if reuse else None
    if final is None and str(row.get("status")) == "ok":
        final = _measure_final(results, champion, row, base, data, prompts, cfg)
        if distributed.is_main_process():
            write_saved(out_root / name / FINAL_FILE, _final_key(fingerprint), final)
    table = pd.DataFrame((final or {}).get("table", []), columns=RELEASE_COLUMNS)
    logger.info("[release] stage done in %.0f s (parts reused from earlier runs count 0)", time.perf_counter() - start)
    gc.collect()
    return {"row": row, "losses": finished["losses"],
            "generations": [g for g in finished["generations"] if g["stage"] == "after"]
            + list((final or {}).get("generations", [])),
            "table": table}


def _measure_final(results: pd.DataFrame, champion: pd.Series, release_row: Mapping[str, Any], base: BaseModel,
                   data: MethodData, prompts: list[dict[str, Any]], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The untuned model and the study champion answer every release prompt; the three rows of the table."""
    untuned_row = results[results["method"] == "base"]
    untuned_row = untuned_row.iloc[0].to_dict() if not untuned_row.empty else {"method": "base"}
    untuned, untuned_generations = _final_answers("untuned", "base", base.get(), data, prompts, cfg)
    champion_model, _ = load_finetuned(champion["adapter_dir"], copy.deepcopy(base.get()), data.tokenizer)
    study, study_generations = _final_answers("study champion", str(champion["method"]), champion_model, data,
                                              prompts, cfg)
    del champion_model
    table = [
        _table_row("untuned", untuned_row, untuned),
        _table_row("study champion", champion.to_dict(), study),
        _table_row("release", release_row, {k: release_row.get(k) for k in
                                            ("chrf_pp", "test_persian_share", "ended_rate", "answer_chars",
                                             "n_test_answers")}),
    ]
    return {"table": table, "generations": untuned_generations + study_generations}


def _table_row(role: str, row: Mapping[str, Any], measures: Mapping[str, Any]) -> dict[str, Any]:
    out = {column: row.get(column, float("nan")) for column in RELEASE_COLUMNS}
    out.update(measures)
    out["role"] = role
    return out


def _final_key(fingerprint: str) -> str:
    return hashlib.sha256(f"final:{fingerprint}".encode()).hexdigest()

