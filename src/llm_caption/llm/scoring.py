"""Bits per character: a loss that compares models with different tokenizers.

Eval loss is the mean negative log-likelihood *per token*, and a token of SmolLM2 (0.93 tokens per Persian
character) holds far less Persian text than one of Gemma-3 (0.33). Bits per character divides the summed
loss of the assistant tokens by the number of characters those tokens spell::

    bits/char = sum over assistant tokens of -ln p(token) / (characters of the assistant text * ln 2)

The characters are counted on the decoded assistant spans (special tokens such as the end-of-turn token
are scored but spell no character), so two models scored on the same conversations divide by nearly the
same number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .chat_format import IGNORE_INDEX
from .frozen_weights import frozen_weights_cast


@dataclass(frozen=True)
class CharacterScore:
    """Summed loss (nats) over the assistant tokens, their number and the characters they spell."""

    nats: float
    tokens: int
    characters: int

    @property
    def bits_per_character(self) -> float:
        return self.nats / (self.characters * math.log(2)) if self.characters else float("nan")

    @property
    def loss_per_token(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")


def labelled_spans(labels: Sequence[int]) -> list[list[int]]:
    """The runs of consecutive labelled token ids (one per assistant turn)."""
    spans: list[list[int]] = []
    current: list[int] = []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            current.append(int(label))
    if current:
        spans.append(current)
    return spans


def assistant_characters(tokenizer, labels: Sequence[int]) -> int:
    """Characters spelled by the labelled (assistant) tokens, decoded span by span, special tokens skipped."""
    return sum(len(tokenizer.decode(span, skip_special_tokens=True)) for span in labelled_spans(labels))


def score_characters(model, tokenizer, dataset, batch_size: int = 8, bf16: bool = False) -> CharacterScore:
    """Summed assistant-token loss of ``model`` over the tokenized conversations of ``dataset`` (rows with
    ``input_ids`` and ``labels``), in the model's dtype, the output layer applied to the scored positions only
    (:mod:`.labelled_head`; the same loss as the full projection).

    Conversations are scored ``batch_size`` at a time, sorted by length and padded on the right to the longest of
    their batch (attention mask; padding is neither attended to nor scored), each cut after its last labelled
    token (nothing after it changes a scored position): every conversation gets the loss it gets alone, to float
    rounding (tested). ``bf16``: under bf16 autocast, as training runs (for CPUs with native bf16; the
    cross-entropy stays fp32): faster, the loss within bf16 rounding of fp32 (tested)."""
    from contextlib import nullcontext

    from .labelled_head import add_labelled_head, pad_right, trim_unlabelled_tail

    add_labelled_head(model)
    rows = [trim_unlabelled_tail(row) for row in dataset]
    rows = [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"][1:])]
    rows.sort(key=lambda row: len(row["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    nats, tokens, characters = 0.0, 0, 0
    device = next(model.parameters()).device
    try:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.no_grad(), autocast, frozen_weights_cast(model, enabled=bf16, share_inputs=True):
            step = max(1, int(batch_size))
            for start in range(0, len(rows), step):
                batch = rows[start:start + step]
                padded = pad_right(batch, pad, device=device)
                ids, labels, mask = padded["input_ids"], padded["labels"], padded["attention_mask"]
                # num_items_in_batch=1: the loss is the batch's summed NLL (the causal shift drops position 0)
                out = model(input_ids=ids, attention_mask=mask, labels=labels, labelled_head=True,
                            num_items_in_batch=1)
                nats += float(out.loss)
                tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
                characters += sum(assistant_characters(tokenizer, r["labels"][1:]) for r in batch)
    finally:
        model.train(was_training)
    return CharacterScore(nats=nats, tokens=tokens, characters=characters)
