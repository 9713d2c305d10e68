"""Trains LoRA on a tiny Gemma-3 for a few steps with ``train_method``, one process or one rank of several.

``python distributed_llm_worker.py SETUP.json`` (one process) or under ``torchrun --nproc_per_node N``:
every rank writes ``rank<R>.safetensors`` (its trained LoRA weights) and ``rank<R>.json`` (losses, which
train rows each optimizer step saw on this rank, world size) into the setup's ``out`` folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "llm"))

from chat_fixtures import load_conf, persian_conversations  # noqa: E402


def main(setup_path: str) -> None:
    from safetensors.torch import save_file
    from trl import SFTTrainer

    from llm_caption import distributed
    from llm_caption.llm.chat_format import tokenize_conversations
    from llm_caption.llm.experiment import method_settings
    from llm_caption.llm.labelled_head import trim_unlabelled_tail
    from llm_caption.llm.methods import MethodContext, build_method
    from llm_caption.llm.models import load_model, load_tokenizer, train_chat_template
    from llm_caption.llm.training import train_method

    setup = json.loads(Path(setup_path).read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    distributed.ensure_process_group()
    spec, out = setup["spec"], Path(setup["out"])
    cfg = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]
    method_cfg, training = method_settings(cfg, "lora")
    tokenizer = load_tokenizer(spec)
    conversations = [(f"c{i}", c) for i, c in enumerate(persian_conversations(setup["n_conversations"]))]
    template = train_chat_template(spec)
    train = tokenize_conversations(tokenizer, conversations[:-2], template, 48)
    evaluation = tokenize_conversations(tokenizer, conversations[-2:], template, 48)
    # Rows as the collator hands them to the model: each conversation cut after its last labelled token.
    row_of = {tuple(trim_unlabelled_tail(train[i])["input_ids"]): i for i in range(len(train))}
    model = build_method(load_model(spec, quantization={}), method_cfg, MethodContext(tokenizer=tokenizer, seed=7))

    seen: list[list[int]] = []
    original = SFTTrainer.training_step

    def training_step(self, model_, inputs, *args, **kwargs):
        """Note which train rows this step's batch holds on this rank: the conversations of a padding-free row
        (split where the position ids restart), or the rows of a padded batch (padding stripped by the mask)."""
        if "attention_mask" in inputs:
            pieces = [ids[mask.bool()].tolist()
                      for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
        else:
            ids, positions = inputs["input_ids"][0].tolist(), inputs["position_ids"][0].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            pieces = [ids[a:b] for a, b in zip(starts[:-1], starts[1:])]
        rows = [row_of.get(tuple(piece), -1) for piece in pieces]
        seen.append(sorted(rows))
        return original(self, model_, inputs, *args, **kwargs)

    SFTTrainer.training_step = training_step
    settings = {**training, "max_steps": setup["max_steps"], "per_device_train_batch_size": setup["batch"],
                "per_device_eval_batch_size": 2, "bf16": False, "eval_strategy": "no", "save_strategy": "no",
                "resume": False, "lr_scheduler_type": "constant", "warmup_steps": 0}
    result = train_method(model, tokenizer, train, evaluation, settings, out / "checkpoints", seed=7)
    rank = distributed.rank()
    weights = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": distributed.world_size(), "rank": rank, "steps": result.steps, "eval_loss": result.eval_loss,
        "train_losses": [r["loss"] for r in result.loss_history if r["split"] == "train"], "batches": seen,
        "n_train": len(train), "step_time_s": result.step_time_s}))


if __name__ == "__main__":
    main(sys.argv[1])
