"""The one training set-up shared by the resume test and its subprocess worker."""

from __future__ import annotations

from pathlib import Path

from chat_fixtures import persian_conversations
from chat_fixtures import load_conf

MAX_STEPS = 4


def run_training(base_model, tokenizer, spec: dict, output_dir: Path) -> dict:
    """LoRA (configured options), 4 steps, checkpoint every step, resume from the last complete checkpoint."""
    from llm_caption.llm.adapters import save_finetuned
    from llm_caption.llm.chat_format import tokenize_conversations
    from llm_caption.llm.experiment import method_settings
    from llm_caption.llm.methods import MethodContext, build_method
    from llm_caption.llm.models import train_chat_template
    from llm_caption.llm.training import train_method

    cfg = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]
    method_cfg, training = method_settings(cfg, "lora")
    template = train_chat_template(spec)
    conversations = [(f"c{i}", c) for i, c in enumerate(persian_conversations(14))]
    # 9 usable conversations at 64 tokens, batch 2: the 4 steps stay within the first epoch.
    train = tokenize_conversations(tokenizer, conversations[:12], template, 64)
    evaluation = tokenize_conversations(tokenizer, conversations[12:], template, 64)
    model = build_method(base_model, method_cfg, MethodContext(tokenizer=tokenizer, seed=42))
    settings = {**training, "max_steps": MAX_STEPS, "per_device_train_batch_size": 2, "eval_strategy": "no",
                "save_strategy": "steps", "save_steps": 1, "save_total_limit": None, "resume": True}
    result = train_method(model, tokenizer, train, evaluation, settings, output_dir / "checkpoints", seed=42)
    save_finetuned(model, output_dir / "adapter", "lora", method_cfg, spec)
    return {"eval_loss": result.eval_loss, "steps": result.steps, "resumed_from": result.resumed_from,
            "loss_history": result.loss_history}
