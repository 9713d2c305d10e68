"""Fine-tune every configured method on one base model and measure them side by side.

:func:`run_methods` is the whole study: the base model is loaded once and deep-copied per
method; each method trains, is evaluated, answers the fixed prompts and a few test questions,
is saved, and gets its own MLflow run (nested under the active pipeline run, if any).

Two measures compare across models with different tokenizers: bits per character of the
assistant text (:mod:`.scoring`) and chrF++ of the answers to the test questions against their
reference answers. A method that cannot work on a model (an error while building, training or
generating) gets a row whose ``status`` says why, in one line, and the study goes on.

A finished method leaves ``<output_dir>/<method>/llm_caption_result.json`` with its row, loss
history and answers, keyed by a fingerprint of everything that determines them (model, data,
settings, seed); a rerun with the same fingerprint reuses it instead of training again, so a study
that failed late does not redo the methods it had finished (``reuse_finished: false`` retrains).

Under ``torchrun`` / ``accelerate launch`` every rank runs the study (the Trainer does DDP: every rank
sees the same seeded data order, takes its share of each batch, and gradients are averaged); rank 0
alone opens MLflow runs, saves adapters and writes finished results, and its run ids reach the other
ranks so that every rank returns the same tables. ``world_size`` in the table says how many processes
trained (a result from another world size is not reused: its effective batch differs).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

from .. import distributed
from ..common import require_columns
from ..evaluation.chat_metrics import chrf_pp
from ..tracking import child_run
from .adapters import save_finetuned
from .chat_format import as_messages, first_user_turn, resolve_max_seq_len, tokenize_conversations
from .generation import generate_answers
from .methods import MethodContext, build_method, count_parameters
from .models import load_model, load_tokenizer, train_chat_template
from .scoring import score_characters
from .text_metrics import persian_share
from .training import TrainResult, train_method, uses_bf16

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["method", "stage", "status", "trainable_params", "total_params", "trainable_pct", "peak_memory_mb",
                  "train_steps", "train_time_s", "step_time_s", "tokens_per_s", "eval_loss", "perplexity",
                  "bits_per_char", "dev_bits_per_char", "chrf_pp", "test_persian_share", "ended_rate", "answer_chars",
                  "n_test_answers", "persian_share", "english_prompt_persian_share", "mlflow_run_id", "adapter_dir",
                  "world_size"]
METRIC_COLUMNS = ("trainable_params", "total_params", "trainable_pct", "peak_memory_mb", "train_steps",
                  "train_time_s", "step_time_s", "tokens_per_s", "eval_loss", "perplexity", "bits_per_char",
                  "dev_bits_per_char", "chrf_pp", "test_persian_share", "ended_rate", "answer_chars", "n_test_answers",
                  "persian_share", "english_prompt_persian_share")
RESULT_FILE = "llm_caption_result.json"
LOSS_COLUMNS = ["method", "step", "split", "loss"]
RELEASE_COLUMNS = ["method", "role", "train_steps", "train_time_s", "eval_loss", "bits_per_char", "dev_bits_per_char",
                   "chrf_pp", "test_persian_share", "ended_rate", "answer_chars", "n_test_answers"]
GENERATION_COLUMNS = ["method", "stage", "prompt_kind", "prompt", "reference", "answer"]


def check_chat_frame(frame: pd.DataFrame, name: str) -> None:
    """Fail with a clear message when a chat split lacks the columns of docs/datasets.md or is empty."""
    require_columns(frame, name, ["conversation_id", "messages"], allow_empty=False)


def sample_rows(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """``n`` rows drawn with ``seed`` (all rows, in order, when ``n`` is null or not smaller)."""
    if n is None or n >= len(frame):
        return frame
    return frame.sample(n=int(n), random_state=seed).sort_index()


def split_dev(chat_train: pd.DataFrame, n_dev: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rest, dev): ``n_dev`` conversations of ``chat_train`` drawn with ``seed``, disjoint from the rest."""
    if not 0 < n_dev < len(chat_train):
        raise ValueError(f"the dev split must hold between 1 and {len(chat_train) - 1} conversations (chat_train has "
                         f"{len(chat_train)}), got {n_dev}")
    dev = chat_train.sample(n=n_dev, random_state=seed).sort_index()
    return chat_train.drop(index=dev.index), dev


def dev_split(chat_train: pd.DataFrame, cfg: Mapping[str, Any], seed: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(conversations the methods train on, dev conversations or None): ``n_dev_conversations`` held out of
    ``chat_train`` (0 or null: no dev split, every conversation trains)."""
    n_dev = int(cfg.get("n_dev_conversations") or 0)
    return split_dev(chat_train, n_dev, seed) if n_dev else (chat_train, None)


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


def generation_batch(cfg: Mapping[str, Any]) -> int:
    """How many answers are generated together (``generation_batch_size``, default 8)."""
    value = cfg.get("generation_batch_size") or 8
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"llm_finetuning.generation_batch_size must be a positive integer, got {value!r}")
    return value


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
                    result: TrainResult, generations: pd.DataFrame, adapter_dir: Path | None,
                    model_name: str = "") -> str:
    tags = {"llm_caption.pipeline": "llm_finetuning", "llm_caption.method": method}
    if model_name:
        tags["llm_caption.model"] = model_name
    if distributed.world_size() > 1:
        tags["llm_caption.world_size"] = str(distributed.world_size())
    run_name = f"{model_name}/{method}" if model_name else method
    with child_run(run_name, tags=tags, params={"method": method_cfg, "training": training}) as run:
        mlflow.log_metrics({k: float(row[k]) for k in METRIC_COLUMNS})
        for entry in result.loss_history:
            mlflow.log_metric(f"{entry['split']}_loss", entry["loss"], step=entry["step"])
        mlflow.log_table(data=generations, artifact_file="generations.json")
        if adapter_dir is not None:
            mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        return run.info.run_id


def test_answer_chrf(prompts: list[dict[str, Any]], answers: list[str]) -> float:
    """chrF++ of the answers to the test questions against their reference answers (NaN without test questions)."""
    pairs = [(a, p["reference"]) for p, a in zip(prompts, answers, strict=True) if p["prompt_kind"] == "test"]
    return chrf_pp([a for a, _ in pairs], [r for _, r in pairs]) if pairs else float("nan")


def ended_rate(ended: list[bool]) -> float:
    """Share of answers that ended on their own (a stop token before ``max_new_tokens``); NaN without answers."""
    return sum(bool(e) for e in ended) / len(ended) if ended else float("nan")


def answer_metrics(prompts: list[dict[str, Any]], answers: list[str], ended: list[bool]) -> dict[str, float]:
    """The answers to the test questions: chrF++ against the references, Persian share of their letters, ended rate,
    mean characters per answer (a longer answer can score a higher chrF++ without being better) and their count."""
    test = [(p, a, e) for p, a, e in zip(prompts, answers, ended, strict=True) if p["prompt_kind"] == "test"]
    texts = [a for _, a, _ in test]
    return {"chrf_pp": test_answer_chrf(prompts, answers),
            "test_persian_share": persian_share(" ".join(texts)) if texts else float("nan"),
            "ended_rate": ended_rate([e for *_, e in test]),
            "answer_chars": sum(len(a) for a in texts) / len(texts) if texts else float("nan"),
            "n_test_answers": len(texts)}


def study_fingerprint(cfg: Mapping[str, Any], model_spec: Mapping[str, Any], seed: int, train_ids: list[str],
                      eval_ids: list[str], prompts: list[dict[str, Any]], dev_ids: list[str] | None = None,
                      max_seq_len: Any = None) -> str:
    """Hash of what every method's result depends on besides its own settings (model, data, prompts, seed, the
    sequence length in use)."""
    shared = {"model": dict(model_spec), "seed": seed, "max_seq_len": max_seq_len or cfg.get("max_seq_len"),
              "train": train_ids, "eval": eval_ids, "generation": dict(cfg.get("generation") or {}),
              "prompts": [[p["prompt"], p["reference"]] for p in prompts]}
    if dev_ids:
        shared["dev"] = dev_ids
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()


def method_fingerprint(study: str, method: str, method_cfg: Mapping[str, Any], training: Mapping[str, Any],
                       world_size: int = 1) -> str:
    """Hash of the study fingerprint and one method's own configuration (and the world size, when above 1:
    per-device batches on several ranks make another effective batch)."""
    payload = {"study": study, "method": method, "config": dict(method_cfg), "training": dict(training)}
    if world_size > 1:
        payload["world_size"] = int(world_size)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_saved(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The JSON object saved at ``path`` by :func:`write_saved` when its fingerprint is ``fingerprint`` (None when
    missing, unreadable or saved for another configuration)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("Ignoring unreadable saved result %s: %s", path, error)
        return None
    return saved if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else None


def write_saved(path: Path, fingerprint: str, payload: Mapping[str, Any]) -> None:
    """Save ``payload`` with its fingerprint as JSON at ``path`` (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, **payload}, ensure_ascii=False, default=float),
                   encoding="utf-8")
    os.replace(tmp, path)


def read_finished(method_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The finished result saved in ``method_dir`` when its fingerprint matches (and its adapter is there)."""
    saved = read_saved(method_dir / RESULT_FILE, fingerprint)
    if saved is None:
        return None
    adapter_dir = (saved.get("row") or {}).get("adapter_dir")
    if adapter_dir and not Path(adapter_dir).is_dir():
        return None
    return saved


def write_finished(method_dir: Path, fingerprint: str, row: dict[str, Any], losses: list[dict[str, Any]],
                   generations: list[dict[str, Any]]) -> None:
    """Save a finished method's row, loss history and answers."""
    write_saved(method_dir / RESULT_FILE, fingerprint, {"row": row, "losses": losses, "generations": generations})


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def failed_row(method: str, error: BaseException) -> dict[str, Any]:
    """The table row of a method that could not run on this model."""
    row = {column: float("nan") for column in METRIC_COLUMNS}
    row.update(method=method, status=f"failed: {one_line(error)}", mlflow_run_id="", adapter_dir="",
               world_size=distributed.world_size())
    return row


def run_methods(chat_train: pd.DataFrame, chat_test: pd.DataFrame, cfg: Mapping[str, Any],
                model_spec: Mapping[str, Any], seed: int,
                release: Callable[..., dict[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
    """Train, measure, save and track every selected method, then (``release.enabled``) train the best one again
    as ``<method>-release`` with ``release`` (:func:`.release.run_release`, which the caller passes: that module
    builds on this one); return the result tables."""
    if cfg.get("torch_num_threads"):
        torch.set_num_threads(int(cfg["torch_num_threads"]))
    distributed.ensure_process_group()
    world = distributed.world_size()
    main = distributed.is_main_process()
    check_chat_frame(chat_train, "chat_train")
    check_chat_frame(chat_test, "chat_test")
    methods = selected_methods(cfg)
    tokenizer = load_tokenizer(model_spec)
    template = train_chat_template(model_spec)
    fit_rows, dev_rows = dev_split(chat_train, cfg, seed)
    if (cfg.get("release") or {}).get("enabled") and dev_rows is None:
        raise ValueError("llm_finetuning.release needs a dev split to choose the method and its budget on: set "
                         "n_dev_conversations (e.g. 64)")
    train_rows = sample_rows(fit_rows, cfg.get("n_train_conversations"), seed)
    seq = resolve_max_seq_len(cfg.get("max_seq_len"), tokenizer, zip(train_rows["conversation_id"], train_rows["messages"]),
                              template, cfg.get("max_seq_len_choice"))
    max_len = seq["max_seq_len"]
    logger.info("llm_finetuning: max_seq_len=%s%s: %.1f%% of the %d training conversations hold their whole "
                "assistant turn (longest needs %d tokens)", max_len, " (chosen from the data)" if
                cfg.get("max_seq_len") == "auto" else "", 100 * seq["share_fitting"], seq["n_conversations"],
                seq["longest"])
    eval_rows = eval_subset(chat_test, cfg, seed)
    train_ds = tokenize_conversations(tokenizer, zip(train_rows["conversation_id"], train_rows["messages"]), template, max_len)
    eval_ds = tokenize_conversations(tokenizer, zip(eval_rows["conversation_id"], eval_rows["messages"]), template, max_len)
    dev_ds = (None if dev_rows is None else
              tokenize_conversations(tokenizer, zip(dev_rows["conversation_id"], dev_rows["messages"]), template, max_len))
    prompts = generation_prompts(chat_test, cfg, seed)
    logger.info("llm_finetuning: %d methods, %d train / %d dev / %d eval conversations, %d prompts%s",
                len(methods), len(train_ds), 0 if dev_ds is None else len(dev_ds), len(eval_ds), len(prompts),
                f", rank {distributed.rank()} of {world} processes" if world > 1 else "")
    study = study_fingerprint(cfg, model_spec, seed, train_rows["conversation_id"].astype(str).tolist(),
                              eval_rows["conversation_id"].astype(str).tolist(), prompts,
                              None if dev_rows is None else dev_rows["conversation_id"].astype(str).tolist(), max_len)
    out_root = Path(cfg["output_dir"])
    ckpt_root = Path(cfg["checkpoint_dir"])
    reuse = bool(cfg.get("reuse_finished", True))

    plans = []
    for method in methods:
        method_cfg, training = method_settings(cfg, method)
        fingerprint = method_fingerprint(study, method, method_cfg, training, world)
        plans.append((method, method_cfg, training, fingerprint,
                      read_finished(out_root / method, fingerprint) if reuse else None))
    if world > 1:  # every rank must train the same methods (the main process's view of what is finished)
        plans = distributed.broadcast(plans)

    conversations = [p["conversation"] for p in prompts]
    data = MethodData(tokenizer=tokenizer, train_ds=train_ds, eval_ds=eval_ds, dev_ds=dev_ds, prompts=prompts)
    base = BaseModel(model_spec)
    if any(finished is None for *_, finished in plans):
        base.before = generate_answers(base.get(), tokenizer, conversations, cfg.get("generation") or {},
                                       batch_size=generation_batch(cfg), with_ended=True)
    results, losses, generations = [], [], []
    study_start = time.perf_counter()
    for method, method_cfg, training, fingerprint, finished in plans:
        if finished is None:
            finished = run_or_fail(method, method_cfg, training, base, data, cfg, model_spec, seed, out_root,
                                   ckpt_root, fingerprint)
        else:
            logger.info("[%s] finished result for this configuration found in %s: not retrained", method,
                        out_root / method / RESULT_FILE)
        if not generations and finished["generations"]:
            generations.extend(g for g in finished["generations"] if g["stage"] == "before")
        results.append({"world_size": 1, "stage": "study", **finished["row"]})
        losses.extend(finished["losses"])
        generations.extend(g for g in finished["generations"] if g["stage"] == "after")
    logger.info("llm_finetuning: study of %d methods done in %.0f s (methods reused from earlier runs count 0)",
                len(plans), time.perf_counter() - study_start)
    release_table = pd.DataFrame(columns=RELEASE_COLUMNS)
    if (cfg.get("release") or {}).get("enabled"):
        if release is None:
            raise ValueError("llm_finetuning.release.enabled is true but no release stage was given to run_methods "
                             "(pass llm_caption.llm.release.run_release)")
        staged = release(pd.DataFrame(results, columns=RESULT_COLUMNS), base, data, chat_test, cfg, model_spec,
                             seed, study, out_root, ckpt_root)
        results.append(staged["row"])
        losses.extend(staged["losses"])
        generations.extend(staged["generations"])
        release_table = staged["table"]
    return {
        "llm_method_results": pd.DataFrame(results, columns=RESULT_COLUMNS),
        "llm_loss_history": pd.DataFrame(losses, columns=LOSS_COLUMNS),
        "llm_generations": pd.DataFrame(generations, columns=GENERATION_COLUMNS),
        "llm_release_results": release_table.reindex(columns=RELEASE_COLUMNS),
    }


@dataclass
class MethodData:
    """What every method trains and is measured on."""

    tokenizer: Any
    train_ds: Any
    eval_ds: Any
    dev_ds: Any
    prompts: list[dict[str, Any]]


class BaseModel:
    """The base model, loaded once on first use (unquantised; a method that wants quantised weights asks for them),
    and its answers to the study's prompts (``before``: answers, ended flags)."""

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = spec
        self._model = None
        self.before: tuple[list[str], list[bool]] | None = None

    def get(self):
        if self._model is None:
            self._model = load_model(self.spec, quantization={})
            if torch.cuda.is_available():
                self._model = self._model.to("cuda")
        return self._model


def run_or_fail(method: str, method_cfg: Mapping[str, Any], training: Mapping[str, Any], base: BaseModel,
                data: MethodData, cfg: Mapping[str, Any], model_spec: Mapping[str, Any], seed: int, out_root: Path,
                ckpt_root: Path, fingerprint: str, **kwargs) -> dict[str, Any]:
    """:func:`_run_method`, its finished result saved (main process); a method that cannot run gets a failed row."""
    try:
        finished = _run_method(method, method_cfg, training, base, data, cfg, model_spec, seed, out_root, ckpt_root,
                               **kwargs)
    except Exception as error:  # noqa: BLE001 - one method that cannot run must not end the study
        logger.error("[%s] cannot run on this model: %s", method, one_line(error))
        logger.debug("[%s] traceback", method, exc_info=True)
        return {"row": failed_row(method, error), "losses": [], "generations": []}
    finally:
        gc.collect()
    if distributed.is_main_process():
        write_finished(out_root / method, fingerprint, **finished)
    return finished


def _run_method(method: str, method_cfg: Mapping[str, Any], training: Mapping[str, Any], base: BaseModel,
                data: MethodData, cfg: Mapping[str, Any], model_spec: Mapping[str, Any], seed: int, out_root: Path,
                ckpt_root: Path, prompts: list[dict[str, Any]] | None = None, select_on_dev: bool = False,
                model=None) -> dict[str, Any]:
    """Build, train, measure, save and track one method; its row, loss history and answers (before and after).

    ``prompts``: what the method answers (default: the study's prompts). ``select_on_dev``: evaluate on the dev
    split while training (early stopping, best checkpoint kept) and report the eval split's loss afterwards.
    ``model``: an already built model to train instead of building ``method_cfg`` on a copy of the base model.
    """
    trains = method_cfg.get("builder") != "none"
    tokenizer = data.tokenizer
    prompts = data.prompts if prompts is None else prompts
    if model is None:
        model = build_method(copy.deepcopy(base.get()), method_cfg, MethodContext(tokenizer=tokenizer, seed=seed))
    trainable, total = count_parameters(model)
    main = distributed.is_main_process()
    # The eval split is scored once, after training, by score_characters (loss per token and bits/char), not
    # again by the trainer.
    if select_on_dev:
        result = train_method(model, tokenizer, data.train_ds, data.dev_ds, training, ckpt_root / method, seed,
                              train=trains, report_ds=data.eval_ds, eval_at_end=False)
    else:
        result = train_method(model, tokenizer, data.train_ds, data.eval_ds, training, ckpt_root / method, seed,
                              train=trains, eval_at_end=False)
    scored_in_bf16 = uses_bf16(training)  # like training and the trainer's evaluations: ~2.5x faster than fp32
    chars = score_characters(model, tokenizer, data.eval_ds, bf16=scored_in_bf16)
    history = list(result.loss_history)
    if trains and not select_on_dev:
        history.append({"step": result.global_step, "split": "eval", "loss": chars.loss_per_token})
    result = replace(result, eval_loss=chars.loss_per_token, loss_history=history)
    dev_chars = (score_characters(model, tokenizer, data.dev_ds, bf16=scored_in_bf16).bits_per_character
                 if data.dev_ds is not None else float("nan"))
    conversations = [p["conversation"] for p in prompts]
    if trains:
        answers, ended = generate_answers(model, tokenizer, conversations, cfg.get("generation") or {},
                                          batch_size=generation_batch(cfg), with_ended=True)
    else:
        answers, ended = base.before
    before_answers = base.before[0] if base.before is not None and len(base.before[0]) == len(prompts) else None
    before_rows = _generation_rows("base", "before", prompts, before_answers) if before_answers else []
    rows = _generation_rows(method, "after", prompts, answers)
    adapter_dir = out_root / method if trains else None
    if trains:
        with distributed.main_process_first():  # one writer; the others go on once it is on disk
            if main:
                adapter_dir = save_finetuned(model, out_root / method, method, method_cfg, model_spec)
    row = {"method": method, "status": "ok", "trainable_params": trainable, "total_params": total,
           "trainable_pct": 100.0 * trainable / total, "peak_memory_mb": result.peak_memory_mb,
           "train_steps": result.best_step or result.steps, "train_time_s": result.train_time_s,
           "step_time_s": result.step_time_s, "tokens_per_s": result.tokens_per_s, "eval_loss": result.eval_loss,
           "perplexity": result.perplexity, "bits_per_char": chars.bits_per_character,
           "dev_bits_per_char": dev_chars, **answer_metrics(prompts, answers, ended),
           "persian_share": fixed_prompt_share(prompts, answers),
           "english_prompt_persian_share": fixed_prompt_share(prompts, answers, persian_prompts=False),
           "adapter_dir": str(adapter_dir) if adapter_dir else "", "world_size": distributed.world_size()}
    table = pd.DataFrame(before_rows + rows, columns=GENERATION_COLUMNS)
    run_id = (_log_method_run(method, method_cfg, training, row, result, table, adapter_dir,
                              cfg.get("model_label", "")) if main else "")
    row["mlflow_run_id"] = distributed.broadcast(run_id)
    logger.info("[%s] trainable %s (%.3f%%) | %d steps, %.2f s/step, %.0f tok/s | peak %.0f MB | "
                "eval loss %.4f (ppl %.1f) | %.3f bits/char (dev %.3f) | chrF++ %.1f | ended %.2f | %.0f chars | "
                "Persian share %.2f%s", method, f"{trainable:,}", row["trainable_pct"], result.steps,
                result.step_time_s, result.tokens_per_s, result.peak_memory_mb, result.eval_loss, result.perplexity,
                row["bits_per_char"], row["dev_bits_per_char"], row["chrf_pp"], row["ended_rate"],
                row["answer_chars"], row["persian_share"],
                f" | resumed from {result.resumed_from}" if result.resumed_from else "")
    distributed.barrier()  # every rank is done with the checkpoints before the main process removes them
    if main and not cfg.get("keep_checkpoints", False):
        shutil.rmtree(ckpt_root / method, ignore_errors=True)
    losses = [{"method": method, **entry} for entry in result.loss_history]
    del model
    return {"row": row, "losses": losses, "generations": before_rows + rows}


COMPARISON_COLUMNS = ["model", "model_kind", "method", "status", "trainable_params", "train_time_s", "eval_loss",
                      "bits_per_char", "chrf_pp", "persian_share", "english_prompt_persian_share"]


def compare_models(chat_train: pd.DataFrame, chat_test: pd.DataFrame, cfg: Mapping[str, Any],
                   model_specs: Mapping[str, Mapping[str, Any]], main_model: str, main_results: pd.DataFrame,
                   seed: int) -> pd.DataFrame:
    """Base vs instruction models on one test split: each model of ``model_comparison.models`` untuned
    (``base``) and after the ``model_comparison.methods`` (default ``[base, lora]``), same settings and data.

    The study's own model reuses its rows of ``main_results``; every other model runs those methods with
    the study's settings, its outputs under ``<output_dir>/<model>/``. Empty when no models are listed.
    """
    comparison = cfg.get("model_comparison") or {}
    names = list(comparison.get("models") or [])
    methods = list(comparison.get("methods") or ["base", "lora"])
    unknown = [n for n in names if n not in model_specs]
    if unknown:
        raise ValueError(f"model_comparison.models names unknown model(s) {unknown}; known: {sorted(model_specs)}")
    rows = []
    for name in names:
        if name == main_model:
            results = main_results
        else:
            sub_cfg = {**cfg, "methods_to_run": methods, "model_label": name, "release": {"enabled": False},
                       "output_dir": str(Path(cfg["output_dir"]) / name),
                       "checkpoint_dir": str(Path(cfg["checkpoint_dir"]) / name)}
            results = run_methods(chat_train, chat_test, sub_cfg, model_specs[name], seed)["llm_method_results"]
        for method in methods:
            match = results[results["method"] == method]
            if match.empty:
                raise ValueError(f"model_comparison: method {method!r} has no result for model {name!r} "
                                 f"(is it in methods_to_run?)")
            record = match.iloc[0].to_dict()
            rows.append({"model": name, "model_kind": model_specs[name].get("kind", ""),
                         **{c: record.get(c) for c in COMPARISON_COLUMNS if c not in ("model", "model_kind")}})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
