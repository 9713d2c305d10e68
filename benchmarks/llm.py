"""LLM fine-tuning throughput: the project's ``lora`` method vs plain Trainer + PEFT (peer A) vs TRL defaults (peer B).

One row per model: SmolLM2-135M-Instruct (the default run's settings, ``conf/base``) and Gemma-3-270m (the
Persian study's LoRA learning rate, ``conf/persian_study``). On each, all three paths start from the same
de-quantised weights, the same LoRA initialisation (same seed), the same tokenized conversations and labels
(``chat_format.tokenize_conversations``: assistant tokens only), the same batches in the same order and the
same optimiser settings (the ``lora`` method's training block).

* project: ``methods.build_method`` + ``training.train_method``, exactly as ``llm_finetuning`` runs them;
* peer A: ``peft.get_peft_model`` + ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (pads the
  prepared labels with -100: the standard collator for masked causal-LM labels);
* peer B: ``trl.SFTTrainer(peft_config=...)`` with TRL's defaults (gradient checkpointing on, fp32 LM head).

Tokens are counted here, not by the trainers: a forward pre-hook on the model sums ``attention_mask`` of
every training forward (non-padding tokens; all of ``input_ids`` for a padding-free row). tokens/s is the
tokens of the training conversations per second, the same batches on every path (the peers' count); the
project's forward leaves out each conversation's tokens after its last label, which no loss depends on. Step times are the intervals between consecutive step ends
(data loading, collation, forward, backward, optimiser step and per-step logging included); the first step
(warm-up) is left out. ``whole_s`` is the wall time of the whole training call as a user feels it: building the
LoRA model, constructing the trainer, every step, and the final evaluation.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import Series, alternate, count_flops

logger = logging.getLogger(__name__)


def step_clock():
    """A ``TrainerCallback`` that records each step's end time and the non-padding tokens each step trained on."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self._pending = 0
            self._handle = None

        def _count(self, module, args, kwargs) -> None:
            if module.training and torch.is_grad_enabled():
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids")
                self._pending += int(mask.sum()) if mask is not None else int(ids.numel())

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.tokens.append(self._pending)
            self._pending = 0

        def on_train_end(self, args, state, control, **kwargs):
            if self._handle is not None:
                self._handle.remove()

        def figures(self) -> dict[str, float]:
            """s/step over steps 2..N (step 1 warms up), their seconds and forward tokens, and all steps' tokens."""
            intervals = [b - a for a, b in zip(self.ends[1:-1], self.ends[2:])]
            return {"s_per_step": sorted(intervals)[len(intervals) // 2] if intervals else float("nan"),
                    "steady_s": sum(intervals), "steady_tokens": float(sum(self.tokens[1:])),
                    "tokens_total": float(sum(self.tokens))}

    return StepClock()


def persian_conversations() -> list[tuple[str, list[dict[str, str]]]]:
    """The packaged Persian chatterbot conversations (the embedded default data) as user/assistant turns."""
    import yaml

    from llm_caption.llm.models import package_dir

    folder = package_dir("chatterbot_corpus") / "data" / "persian"
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        for i, chain in enumerate(yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []):
            turns = [str(t) for t in chain if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]
            if turns:
                conversations.append((f"{path.stem}-{i}", [{"role": ("user", "assistant")[j % 2], "content": t}
                                                            for j, t in enumerate(turns)]))
    return conversations


# The models of the benchmark and the environment whose LoRA learning rate each trains with.
# The models `make bench` trains, each with its LoRA learning rate (None: conf/base's lora rate, chosen for Gemma on
# a dev split; SmolLM2's 3e-3 was its own choice when it was the default model).
MODELS = {"smollm2_135m_instruct": 3.0e-3, "gemma3_270m": None}


def _params(model: str | None = None) -> dict[str, Any]:
    """Spec of ``model`` (default: conf/base's ``llm_model``), seed, and conf/base's llm_finetuning block with the
    ``lora`` method's learning rate of ``MODELS`` on top."""
    import yaml

    conf = Path(__file__).resolve().parents[1] / "conf"
    shared = yaml.safe_load((conf / "base" / "parameters.yml").read_text(encoding="utf-8"))
    llm = yaml.safe_load((conf / "base" / "parameters_llm_finetuning.yml").read_text(encoding="utf-8"))["llm_finetuning"]
    rate = MODELS.get(model or shared["llm_model"])
    if rate is not None:
        llm["methods"]["lora"]["training"] = {**llm["methods"]["lora"].get("training", {}), "learning_rate": rate}
    return {"spec": shared["llm_models"][model or shared["llm_model"]], "seed": int(shared["seed"]), "llm": llm}


def run(steps: int = 40, reps: int = 2, batch: int = 4, seq_len: int = 96, n_train: int = 160,
        n_eval: int = 16, paths: tuple[str, ...] = ("project", "peer_a", "peer_b"), model: str | None = None,
        tiny_model: bool = False) -> dict[str, Any]:
    """Train each path ``reps`` times (alternating) for ``steps`` steps on ``model`` (a name of ``MODELS``; default
    conf/base's ``llm_model``); their figures, side by side. ``tiny_model``: a tiny random model of the same
    architecture and tokenizer instead of the real weights (checks the harness only)."""
    from llm_caption.llm.chat_format import tokenize_conversations
    from llm_caption.llm.methods import MethodContext, build_method
    from llm_caption.llm.models import load_model, load_tokenizer, train_chat_template
    from llm_caption.llm.training import cpu_supports_bf16, peak_memory_mb, train_method

    params = _params(model)
    spec, seed, cfg = params["spec"], params["seed"], params["llm"]
    tmp = Path(tempfile.mkdtemp(prefix="llm_caption_bench_llm_"))
    if tiny_model:  # the harness on Gemma-3's shapes and vocabulary, without its 268M parameters
        from llm_caption.llm.models import load_tokenizer, write_tiny_gemma3

        spec = write_tiny_gemma3(tmp / "tiny_model", load_tokenizer(spec), spec)
    method_cfg = dict(cfg["methods"]["lora"])
    training = {**cfg["training"], **(method_cfg.get("training") or {})}
    training.update(max_steps=steps, per_device_train_batch_size=batch, eval_steps=steps, save_steps=10**9,
                    logging_steps=1, resume=False, disable_tqdm=True)
    bf16 = bool(training.get("bf16")) and cpu_supports_bf16()
    tokenizer = load_tokenizer(spec)
    template = train_chat_template(spec)
    conversations = persian_conversations()
    random.Random(seed).shuffle(conversations)
    train_ds = tokenize_conversations(tokenizer, conversations[:n_train], template, seq_len)
    eval_ds = tokenize_conversations(tokenizer, conversations[-n_eval:], template, seq_len)
    base = load_model(spec, quantization={})
    lora_options = dict(method_cfg["options"])
    shared_args = dict(max_steps=steps, per_device_train_batch_size=batch,
                       per_device_eval_batch_size=int(training["per_device_eval_batch_size"]),
                       learning_rate=float(training["learning_rate"]), lr_scheduler_type=training["lr_scheduler_type"],
                       warmup_steps=int(training["warmup_steps"]), weight_decay=float(training["weight_decay"]),
                       max_grad_norm=float(training["max_grad_norm"]), optim=training["optim"], seed=seed,
                       data_seed=seed, bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to="none",
                       save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0,
                       disable_tqdm=True)

    def finish(train_losses: list[float], clock, memory, eval_loss: float, whole_s: float) -> dict[str, float]:
        return {**clock.figures(), "whole_s": whole_s, "peak_rss_mb": memory["peak"],
                "extra_rss_mb": memory["peak"] - memory["start"],
                "first_train_loss": float(train_losses[0]) if train_losses else float("nan"),
                "train_loss": float(train_losses[-1]) if train_losses else float("nan"), "eval_loss": float(eval_loss)}

    def project(rep: int) -> dict[str, float]:
        clock = step_clock()
        with peak_memory_mb(interval_s=0.02) as memory:
            start = time.perf_counter()
            model = build_method(copy.deepcopy(base), method_cfg, MethodContext(tokenizer=tokenizer, seed=seed))
            result = train_method(model, tokenizer, train_ds, eval_ds, training, tmp / f"project-{rep}", seed,
                                  callbacks=[clock])
            whole = time.perf_counter() - start
        train_losses = [r["loss"] for r in result.loss_history if r["split"] == "train"]
        return finish(train_losses, clock, memory, result.eval_loss, whole)

    def peer_a(rep: int) -> dict[str, float]:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

        clock = step_clock()
        with peak_memory_mb(interval_s=0.02) as memory:
            start = time.perf_counter()
            set_seed(seed)
            model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, **lora_options))
            args = TrainingArguments(output_dir=str(tmp / f"peer_a-{rep}"), **shared_args)
            collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
            trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              data_collator=collator, callbacks=[clock])
            trainer.train()
            eval_loss = trainer.evaluate()["eval_loss"]
            whole = time.perf_counter() - start
        return finish([e["loss"] for e in trainer.state.log_history if "loss" in e], clock, memory, eval_loss, whole)

    def peer_b(rep: int) -> dict[str, float]:
        from peft import LoraConfig, TaskType
        from transformers import set_seed
        from trl import SFTConfig, SFTTrainer

        clock = step_clock()
        with peak_memory_mb(interval_s=0.02) as memory:
            start = time.perf_counter()
            set_seed(seed)
            args = SFTConfig(output_dir=str(tmp / f"peer_b-{rep}"), **shared_args)
            trainer = SFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tokenizer, callbacks=[clock],
                                 peft_config=LoraConfig(task_type=TaskType.CAUSAL_LM, **lora_options))
            trainer.train()
            eval_loss = trainer.evaluate()["eval_loss"]
            whole = time.perf_counter() - start
        return finish([e["loss"] for e in trainer.state.log_history if "loss" in e], clock, memory, eval_loss, whole)

    sides = {"project": project, "peer_a": peer_a, "peer_b": peer_b}
    try:
        raw = alternate({name: sides[name] for name in paths}, reps)
    finally:  # checkpoints and the tiny model: ~130 MB a run
        shutil.rmtree(tmp, ignore_errors=True)
    # tokens/s counts the tokens of the training conversations each path consumed: the same batches on every
    # path, so the peers' forward count (every non-padding token) stands for all; the project's forward leaves
    # out the tokens after a conversation's last label (``forward_tokens_per_s``).
    reference = raw.get("peer_a") or raw.get("peer_b")
    for name, results in raw.items():
        for rep, r in enumerate(results):
            data_tokens = reference[rep]["steady_tokens"] if reference else r["steady_tokens"]
            r["tokens_per_s"] = data_tokens / r["steady_s"] if r["steady_s"] else float("nan")
            r["forward_tokens_per_s"] = r["steady_tokens"] / r["steady_s"] if r["steady_s"] else float("nan")
    flops_per_token = model_flops_per_token(base, tokenizer, train_ds, batch, lora_options, seed, bf16)
    out: dict[str, Any] = {"settings": {"model": model or "default", "tiny_model": tiny_model,
                                        "steps": steps, "reps": reps, "batch": batch, "seq_len": seq_len,
                                        "bf16_autocast": bf16, "n_train": len(train_ds), "n_eval": len(eval_ds),
                                        "learning_rate": shared_args["learning_rate"],
                                        "threads": torch.get_num_threads()},
                           "flops_per_token": flops_per_token, "sides": {}}
    for name, results in raw.items():
        out["sides"][name] = {key: Series([r[key] for r in results]) for key in results[0]}
    return out


def model_flops_per_token(base, tokenizer, train_ds, batch: int, lora_options: dict[str, Any], seed: int,
                          bf16: bool) -> float:
    """FLOPs of one LoRA training forward+backward of the first batch (LM head over every position, as the model
    computes it), divided by its non-padding tokens: the useful work per token that every path has to do."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, set_seed

    set_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, **lora_options))
    model.train()
    inputs = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(
        [train_ds[i] for i in range(batch)])

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()

    flops = count_flops(step)
    return flops / int(inputs["attention_mask"].sum())
