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


def score_characters(model, tokenizer, dataset) -> CharacterScore:
    """Summed assistant-token loss of ``model`` over the tokenized conversations of ``dataset`` (rows with
    ``input_ids`` and ``labels``), one conversation per forward pass (no padding), in the model's dtype, the output
    layer applied to the scored positions only (:mod:`.labelled_head`; the same loss as the full projection)."""
    from .labelled_head import add_labelled_head

    add_labelled_head(model)
    was_training = model.training
    model.eval()
    nats, tokens, characters = 0.0, 0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for row in dataset:
                ids = torch.tensor([row["input_ids"]], device=device)
                labels = torch.tensor([row["labels"]], device=device)
                n_scored = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the causal shift drops position 0
                if n_scored == 0:
                    continue
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, labelled_head=True)
                nats += float(out.loss) * n_scored
                tokens += n_scored
                characters += assistant_characters(tokenizer, row["labels"][1:])
    finally:
        model.train(was_training)
    return CharacterScore(nats=nats, tokens=tokens, characters=characters)
