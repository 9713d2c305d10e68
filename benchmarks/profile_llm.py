"""Where a LoRA training step's time goes: the same batch through each loss path, forward + backward, alternating.

    python -m benchmarks.profile_llm [--reps 6] [--batch 4] [--seq-len 96] [--model gemma3_270m] [--profile]

Paths (same LoRA model, same batch, bf16 autocast when the CPU has native bf16):

* ``plain``: the model's own loss (LM head over every position, under autocast), as Trainer + PEFT runs it;
* ``trl_fused``: TRL's fused, chunked LM head over every position (its default off CUDA);
* ``project_padded``: the project's head (``labelled_head``: labelled positions only, projected under the same
  autocast, cross-entropy in fp32) on the padded batch;
* ``project_packed``: the same on the batch laid out padding-free (``labelled_head.PaddingFreeCollator``), the
  path before frozen weights were cast once;
* ``project``: as ``train_method`` runs LoRA: the batch laid out the cheaper way (padded or end to end), frozen
  linear weights and shared inputs cast to bf16 once (``frozen_weights.frozen_weights_cast``), attention as the
  training block's ``attn_implementation``.

``--profile`` adds a ``torch.profiler`` table (self CPU time by operator) for ``plain`` and ``project``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .llm import MODELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_llm")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--model", default=None, choices=list(MODELS),
                        help="default: conf/base's llm_model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import random

    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, set_seed
    from trl.trainer.utils import add_fused_lm_head

    from llm_caption.llm.chat_format import tokenize_conversations
    from llm_caption.llm.models import load_model, load_tokenizer, train_chat_template
    from llm_caption.llm.frozen_weights import frozen_weights_cast
    from llm_caption.llm.labelled_head import PaddingFreeCollator, add_labelled_head, attention_crossover
    from llm_caption.llm.training import attention_implementation, cpu_supports_bf16

    from .llm import _params, persian_conversations

    params = _params(args.model)
    spec, seed, cfg = params["spec"], params["seed"], params["llm"]
    tokenizer = load_tokenizer(spec)
    conversations = persian_conversations()
    random.Random(seed).shuffle(conversations)
    data = tokenize_conversations(tokenizer, conversations[: 4 * args.batch], train_chat_template(spec), args.seq_len)
    inputs = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(
        [data[i] for i in range(args.batch)])
    packed = PaddingFreeCollator()([data[i] for i in range(args.batch)])
    bf16 = cpu_supports_bf16()
    base = load_model(spec, quantization={})
    options = dict(cfg["methods"]["lora"]["options"])

    def lora(fused_outputs: tuple[str, ...] | None, labelled: bool = False):
        set_seed(seed)
        model = copy.deepcopy(base)
        if fused_outputs is not None:
            add_fused_lm_head(model, outputs=fused_outputs)
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **options))
        if labelled:
            add_labelled_head(model)
        model.train()
        return model

    models = {"plain": lora(None), "trl_fused": lora(("log_probs", "entropy", "is_top1")),
              "project_padded": lora(None, labelled=True), "project_packed": lora(None, labelled=True),
              "project": lora(None, labelled=True)}
    chosen = PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id, crossover=attention_crossover(models["project"]))(
        [data[i] for i in range(args.batch)])
    attention = cfg["training"].get("attn_implementation")
    cast_once = bool(cfg["training"].get("cast_frozen_once", True)) and bf16

    def step(name: str) -> float:
        model = models[name]
        project = name == "project"
        start = time.perf_counter()
        with attention_implementation(model, attention if project else None), \
                frozen_weights_cast(model, enabled=project and cast_once, share_inputs=True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if name == "plain":
                    loss = model(**inputs, num_items_in_batch=(inputs["labels"][:, 1:] != -100).sum()).loss
                elif name == "trl_fused":
                    loss = model(**inputs, fused_lm_head=True, use_cache=False).loss
                elif name == "project_padded":
                    loss = model(**inputs, labelled_head=True, use_cache=False).loss
                elif name == "project_packed":
                    loss = model(**packed, labelled_head=True, use_cache=False).loss
                else:
                    loss = model(**chosen, labelled_head=True, use_cache=False).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss)

    times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, float] = {}
    names = list(models)
    for rep in range(args.reps + 1):
        for name in names if rep % 2 == 0 else names[::-1]:
            seconds, loss = step(name)
            if rep:  # rep 0 warms up
                times[name].append(seconds)
            losses[name] = loss
    labelled = int((inputs["labels"][:, 1:] != -100).sum())
    tokens = int(inputs["attention_mask"].sum())
    print(f"batch {tuple(inputs['input_ids'].shape)}, {tokens} tokens, {labelled} labelled, bf16 autocast {bf16}, "
          f"{args.threads} threads")
    ref = sorted(times["plain"])[len(times["plain"]) // 2]
    for name, values in times.items():
        med = sorted(values)[len(values) // 2]
        print(f"{name:24s} fwd+bwd median {med:.3f} s (min {min(values):.3f}, max {max(values):.3f}) "
              f"= {med / ref:.2f}x plain | loss {losses[name]:.6f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("plain", "trl_fused", "project_packed", "project"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(name)
            print(f"\n== {name} ==")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
