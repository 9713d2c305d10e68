"""Answer chat prompts with a (fine-tuned) model: batched, left-padded, greedy by default."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def generate_answers(model, tokenizer, conversations: Sequence[list[dict[str, str]]],
                     generation: Mapping[str, Any], batch_size: int = 8) -> list[str]:
    """The model's reply to each conversation (rendered with the tokenizer's chat template + generation prompt)."""
    settings = dict(generation)
    settings.setdefault("max_new_tokens", 48)
    settings.setdefault("do_sample", False)
    answers: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc="generate", leave=False):
            batch = conversations[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **settings)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            answers.extend(tokenizer.decode(t, skip_special_tokens=True).strip() for t in new_tokens)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers
