"""Every method's training step with and without the frozen-weight casts and eager attention, side by side.

    python -m benchmarks.method_steps [--model gemma3_270m] [--steps 12] [--reps 1] [--threads 2] [--seq-len 128]
                                      [--methods lora ...] [--data ../shared/data/persian_chat/chat.jsonl]

Each method of conf/base's ``llm_finetuning`` block is built as ``llm_finetuning`` builds it (``methods.build_method``
on a copy of the base model) and trained by ``training.train_method`` on the packaged Persian conversations (or
the ``{"messages": [...]}`` lines of ``--data``, the Persian study's longer conversations), twice
per repetition, alternating: ``before`` with ``cast_frozen_once: false`` and the model's SDPA attention (the path
before ``llm/frozen_weights.py``), ``after`` with the training block as configured. Same data, seed, batches and
schedule; s/step is the median interval between step ends over steps 2..N; the eval loss (8 held-out
conversations, after the last step) shows how far the two paths' numbers drift apart. Prints one Markdown row per
method.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from .llm import MODELS, _params, persian_conversations, step_clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.method_steps")
    parser.add_argument("--model", default=None, choices=list(MODELS), help="default: conf/base's llm_model")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method but `base`")
    parser.add_argument("--data", default=None, help="a JSONL file of {\"messages\": [...]} conversations")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llm_caption.llm.chat_format import tokenize_conversations
    from llm_caption.llm.methods import MethodContext, build_method
    from llm_caption.llm.models import load_model, load_tokenizer, train_chat_template
    from llm_caption.llm.training import train_method

    params = _params(args.model)
    spec, seed, cfg = params["spec"], params["seed"], params["llm"]
    tokenizer = load_tokenizer(spec)
    if args.data:
        with open(args.data, encoding="utf-8") as handle:
            conversations = [(f"line{i + 1}", json.loads(line)["messages"]) for i, line in enumerate(handle)
                             if line.strip()]
    else:
        conversations = persian_conversations()
    random.Random(seed).shuffle(conversations)
    template = train_chat_template(spec)
    train_ds = tokenize_conversations(tokenizer, conversations[:4 * (args.steps + 1)], template, args.seq_len)
    eval_ds = tokenize_conversations(tokenizer, conversations[-8:], template, args.seq_len)
    base = load_model(spec, quantization={})
    methods = args.methods or [m for m, c in cfg["methods"].items() if c.get("builder") != "none"]
    variants = {"before": {"cast_frozen_once": False, "attn_implementation": None}, "after": {}}
    tmp = Path(tempfile.mkdtemp(prefix="llm_caption_method_steps_"))
    print("| method | s/step before | s/step after | before / after | eval loss before | eval loss after | rel Δ |")
    print("|---|---|---|---|---|---|---|")
    try:
        for method in methods:
            method_cfg = dict(cfg["methods"][method])
            training = {**cfg["training"], **(method_cfg.get("training") or {})}
            training.update(max_steps=args.steps, eval_steps=10**9, save_steps=10**9, logging_steps=1, resume=False,
                            disable_tqdm=True)
            times: dict[str, list[float]] = {name: [] for name in variants}
            losses: dict[str, float] = {}
            for rep in range(args.reps):
                for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                    clock = step_clock()
                    model = build_method(copy.deepcopy(base), method_cfg, MethodContext(tokenizer=tokenizer, seed=seed))
                    result = train_method(model, tokenizer, train_ds, eval_ds, {**training, **variants[name]},
                                          tmp / f"{method}-{name}-{rep}", seed, callbacks=[clock])
                    times[name].append(clock.figures()["s_per_step"])
                    losses[name] = result.eval_loss
                    del model
            before = sorted(times["before"])[len(times["before"]) // 2]
            after = sorted(times["after"])[len(times["after"]) // 2]
            drift = abs(losses["after"] - losses["before"]) / abs(losses["before"])
            print(f"| {method} | {before:.2f} | {after:.2f} | {before / after:.2f}x | {losses['before']:.4f} | "
                  f"{losses['after']:.4f} | {drift:.1e} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
