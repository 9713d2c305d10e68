"""Train one method with TRL's ``SFTTrainer`` and measure it.

Inputs are pre-tokenized datasets (``input_ids`` + ``labels`` with ``-100`` outside assistant
turns, see :mod:`llm_caption.llm.chat_format`), so SFTTrainer keeps our labels as they are.
Checkpoints are written every ``save_steps`` into ``checkpoint_dir``; with ``resume=True`` a
rerun continues from the last one (optimizer, scheduler, RNG and data position included) and
ends where an uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common import cpu_supports_bf16
from .frozen_weights import frozen_weights_cast

logger = logging.getLogger(__name__)

# Keys of the `training` block that are ours, not SFTConfig's.
_OWN_KEYS = {"resume", "padding_free", "early_stopping_patience", "attn_implementation", "cast_frozen_once"}


@dataclass
class TrainResult:
    """What one training (or, for ``base``, evaluation-only) run measured."""

    eval_loss: float
    train_time_s: float
    steps: int
    step_time_s: float
    tokens_per_s: float
    peak_memory_mb: float
    resumed_from: str | None
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0  # with early stopping: the step whose checkpoint was kept (0 otherwise)
    global_step: int = 0  # the trainer's step count at the end (resumed steps included)

    @property
    def perplexity(self) -> float:
        return math.exp(self.eval_loss) if self.eval_loss < 50 else float("inf")


@contextlib.contextmanager
def peak_memory_mb(interval_s: float = 0.05) -> Iterator[dict[str, float]]:
    """Measure peak memory in MB while the block runs: CUDA max allocated on GPU, else sampled process RSS
    (``out["start"]``: the RSS when the block began, so that ``peak - start`` is what the block added)."""
    import psutil

    out = {"peak": 0.0, "start": 0.0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield out
        out["peak"] = torch.cuda.max_memory_allocated() / 2**20
        return
    process = psutil.Process()
    stop = threading.Event()
    peak = [process.memory_info().rss]
    out["start"] = peak[0] / 2**20

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(peak[0], process.memory_info().rss) / 2**20


def labelled_head_trainer(padding_free: bool | str):
    """An ``SFTTrainer`` subclass whose loss is :mod:`.labelled_head`'s: the output layer over labelled positions
    only, under the Trainer's autocast, cross-entropy in fp32; nothing else computed per step (TRL's per-step
    entropy and token accuracy over the logits are not). ``padding_free`` (every method but prompt learning):
    ``true``, each batch laid out the cheaper way (:class:`.labelled_head.PaddingFreeCollator`: its conversations
    end to end in one row, or padded when they are of about one length); ``"always"``, always end to end;
    ``false``, TRL's padded batches. Every batch leaves out the tokens after a conversation's last labelled token
    (they change no scored position)."""
    from trl import SFTTrainer

    from .labelled_head import (PaddingFreeCollator, TailTrimmingCollator, add_labelled_head, attention_crossover,
                                is_prompt_learning)

    class LabelledHeadTrainer(SFTTrainer):
        def __init__(self, model, *args, **kwargs):
            packed = bool(padding_free) and not is_prompt_learning(model)
            if packed and "data_collator" not in kwargs:
                choose = padding_free != "always"
                tokenizer = kwargs.get("processing_class")
                kwargs["data_collator"] = PaddingFreeCollator(
                    pad_token_id=getattr(tokenizer, "pad_token_id", None) if choose else None,
                    crossover=attention_crossover(model) if choose else None)
            super().__init__(model, *args, **kwargs)
            if not packed:  # TRL's padding collator, on rows cut after their last labelled token
                self.data_collator = TailTrimmingCollator(self.data_collator)
            add_labelled_head(self.model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs, use_cache=False, labelled_head=True, num_items_in_batch=num_items_in_batch)
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages gradients
            return (loss, outputs) if return_outputs else loss

    return LabelledHeadTrainer


def uses_bf16(training: Mapping[str, Any]) -> bool:
    """Whether training with ``training`` runs under bf16 autocast (as :func:`sft_config` decides: asked for, and a
    GPU or a CPU with native bf16)."""
    return bool(training.get("bf16")) and (torch.cuda.is_available() or cpu_supports_bf16())


def sft_config(training: Mapping[str, Any], output_dir: str | Path, seed: int, gradient_checkpointing: bool):
    """The ``SFTConfig`` for our settings: CPU-safe defaults (fp32 unless ``bf16`` is asked for, no gradient
    checkpointing unless asked, no external reporters), overridable by the ``training`` block."""
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": seed,
        "data_seed": seed,
        "bf16": False,
        "fp16": False,
        "use_cpu": not on_gpu,
        "gradient_checkpointing": gradient_checkpointing,
        "report_to": "none",
        "logging_steps": 1,
        "eval_strategy": "steps",
        "save_strategy": "steps",
        "save_total_limit": 2,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "packing": False,
        "lr_scheduler_type": "constant",
        "disable_tqdm": False,
        # The datasets are tokenized and cut already (chat_format): TRL's preparation pass would only copy them.
        "dataset_kwargs": {"skip_prepare_dataset": True},
    }
    settings.update({k: v for k, v in training.items() if k not in _OWN_KEYS})
    if training.get("early_stopping_patience"):
        # Stop when the eval loss has not improved for `patience` evaluations; end on the best checkpoint.
        settings.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                        save_steps=settings.get("eval_steps", settings.get("save_steps")))
    if not on_gpu:
        # fp16 has no CPU path. bf16 on CPU (autocast) only when the config asks for it and the CPU has
        # native bf16 (AVX512-BF16 / AMX); otherwise it would be emulated and slower than fp32.
        settings["fp16"] = False
        if settings.get("bf16") and not cpu_supports_bf16():
            logger.warning("training.bf16 is set but this CPU has no native bf16: training in fp32")
            settings["bf16"] = False
    return SFTConfig(**settings)


def safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is unusable (bad header, or data shorter/longer than the header says), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return f"{path} is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 * 2**20):
                return f"{path} is truncated or corrupt (header of {header_len} bytes in a {size}-byte file)"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path} is truncated or corrupt ({size} bytes, its header describes {expected})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file is unusable (unreadable, or holding anything beyond tensors, plain data and the
    numpy arrays of RNG states: the allow-list the Trainer itself loads them with)."""
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated archive, pickle payload, I/O error
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"{path} cannot be loaded safely ({type(exc).__name__}: {reason})"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a ``checkpoint-<step>`` directory cannot be resumed from (naming the file), or None when it can.

    Checked without unpickling anything: ``trainer_state.json`` (written last) parses and names the step; every
    ``.safetensors`` file is as long as its header says; ``optimizer.pt``, ``scheduler.pt`` and the RNG states
    load with ``weights_only=True``.
    """
    folder = Path(path)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return f"{state_file} is missing (the checkpoint was not finished)"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{state_file} is not a complete trainer state ({type(exc).__name__}: {str(exc)[:200]})"
    if folder.name.split("-")[-1] != str(step):
        return f"{state_file} says step {step}, the folder is {folder.name}"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not [p for p in folder.glob("*.bin") if p.name != "training_args.bin"]:
        return f"{folder} has no weights file"
    for file in weights:
        if problem := safetensors_problem(file):
            return problem
    for file in sorted([*folder.glob("*.pt"), *folder.glob("rng_state*.pth")]):
        if problem := _torch_file_problem(file):
            return problem
    return None


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest *usable* ``checkpoint-<step>`` directory in ``output_dir``, if any.

    A process killed while writing a checkpoint leaves a directory without ``trainer_state.json``
    (written last); a damaged file (a truncated ``adapter_model.safetensors``, a cut ``trainer_state.json``,
    an optimizer state that does not load) makes a checkpoint unusable too. Each is skipped with a warning
    naming the file, so the run resumes from the checkpoint before it, or starts fresh.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("Ignoring checkpoint %s: %s", path, problem)
    if candidates:
        logger.warning("No usable checkpoint in %s: training starts fresh", folder)
    return None


def no_eval_at_last_step():
    """A ``TrainerCallback`` that cancels the evaluation ``eval_steps`` would run after the last step."""
    from transformers import TrainerCallback

    class NoEvalAtLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_evaluate = False
            return control

    return NoEvalAtLastStep()


def final_eval(trainer) -> dict[str, float] | None:
    """The eval metrics the trainer already logged at its last step (``eval_steps`` divides ``max_steps``), if any:
    evaluating the same weights on the same split again would only cost time."""
    step = trainer.state.global_step
    logged = [e for e in trainer.state.log_history if "eval_loss" in e and int(e.get("step", -1)) == step]
    return {"eval_loss": float(logged[-1]["eval_loss"])} if logged else None


def loss_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-format ``{step, split, loss}`` rows from the trainer's log history."""
    rows = []
    for entry in log_history:
        if "loss" in entry:
            rows.append({"step": int(entry["step"]), "split": "train", "loss": float(entry["loss"])})
        if "eval_loss" in entry:
            rows.append({"step": int(entry["step"]), "split": "eval", "loss": float(entry["eval_loss"])})
    return rows


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Within the block, ``model``'s attention runs with ``name`` (a transformers ``attn_implementation``:
    ``eager``, ``sdpa`` ...; ``None`` leaves it); the one it had before is restored afterwards, so generation
    and saving after training see the model as loaded."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if not name or before is None or name == before:
        yield
        return
    base.set_attn_implementation(name)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def train_method(model, tokenizer, train_ds, eval_ds, training: Mapping[str, Any], output_dir: str | Path,
                 seed: int, train: bool = True, callbacks: list | None = None, report_ds=None,
                 eval_at_end: bool = True) -> TrainResult:
    """Train ``model`` (its ``requires_grad`` parameters) and evaluate it; ``train=False`` only evaluates.

    ``report_ds``: the split the returned eval loss is measured on, when it is not ``eval_ds`` (the release
    stage evaluates on a dev split while training, ``early_stopping_patience`` stops on it, and reports the
    test split's loss; the loss history then calls the split ``dev``).

    ``training`` holds SFTConfig fields (``max_steps``, ``learning_rate``, ``save_steps`` ...), ``resume``
    (continue from the last checkpoint in ``output_dir`` when there is one), ``padding_free`` (default true:
    each batch without padding when that is cheaper, see :func:`labelled_head_trainer`),
    ``attn_implementation`` (the attention the training and its evaluations run with, e.g. ``eager``; the
    model's own is restored afterwards) and ``cast_frozen_once`` (default true: under bf16 autocast, frozen
    linear weights and shared inputs are cast to bf16 once, see :mod:`.frozen_weights`). ``callbacks`` are
    extra ``transformers.TrainerCallback`` objects (e.g. the benchmarks' step clock).

    ``eval_at_end=False``: no evaluation of ``eval_ds`` (or ``report_ds``) after the last step, for a caller
    that scores that split itself (the study's :func:`.scoring.score_characters` pass gives the same loss per
    token): the returned ``eval_loss`` is then NaN. Evaluations every ``eval_steps`` before the last step (and
    every dev evaluation early stopping needs) still run.
    """
    from transformers import set_seed

    set_seed(seed)
    resume = last_checkpoint(output_dir) if training.get("resume", True) and train else None
    config = sft_config(training, output_dir, seed, gradient_checkpointing=bool(training.get("gradient_checkpointing", False)))
    trainer_class = labelled_head_trainer(training.get("padding_free", True))
    callbacks = list(callbacks or [])
    if training.get("early_stopping_patience"):
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(training["early_stopping_patience"])))
    if not eval_at_end and report_ds is None:
        callbacks.append(no_eval_at_last_step())
    trainer = trainer_class(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=callbacks)
    with peak_memory_mb() as memory, attention_implementation(model, training.get("attn_implementation")), \
            frozen_weights_cast(model, enabled=bool(training.get("cast_frozen_once", True)) and config.bf16,
                                share_inputs=True):
        start = time.perf_counter()
        start_step = 0
        tokens = 0.0
        if train:
            if resume:
                logger.info("Resuming from %s", resume)
                start_step = int(Path(resume).name.split("-")[-1])
            trainer.train(resume_from_checkpoint=resume)
            tokens = float(trainer.state.num_input_tokens_seen or 0)
            layouts = getattr(trainer.data_collator, "layouts", None)
            if layouts and sum(layouts.values()):
                logger.info("Batches (training and evaluation): %d end to end, %d padded",
                            layouts["padding_free"], layouts["padded"])
        train_time = time.perf_counter() - start
        if not eval_at_end:
            metrics = {"eval_loss": float("nan")}
        elif report_ds is not None:
            metrics = trainer.evaluate(eval_dataset=report_ds)
        else:
            metrics = final_eval(trainer) if train else None
            if metrics is None:
                metrics = trainer.evaluate()
    # With bf16, accelerate wraps model.forward in autocast; drop the wrapper so that generation, saving
    # and reloading afterwards see the plain fp32 model.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    steps = trainer.state.global_step - start_step if train else 0
    history = loss_history(trainer.state.log_history)
    if report_ds is not None:  # the last eval is the report split's; the others are the dev split's
        if eval_at_end and history and history[-1]["split"] == "eval":
            history = history[:-1]
        history = [{**e, "split": "dev"} if e["split"] == "eval" else e for e in history]
    if history and history[-1]["split"] == "eval" and not train:
        history = []
    if resume and tokens:
        # num_input_tokens_seen is restored from the checkpoint: count only what this process trained.
        tokens *= steps / max(trainer.state.global_step, 1)
    return TrainResult(
        eval_loss=float(metrics["eval_loss"]),
        train_time_s=train_time if train else 0.0,
        steps=steps,
        step_time_s=train_time / steps if steps else 0.0,
        tokens_per_s=tokens / train_time if train and train_time > 0 else 0.0,
        peak_memory_mb=memory["peak"],
        resumed_from=resume,
        loss_history=history,
        best_step=int(getattr(trainer.state, "best_global_step", None) or 0) if train else 0,
        global_step=int(trainer.state.global_step) if train else 0,
    )
