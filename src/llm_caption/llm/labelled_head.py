"""The causal-LM loss over labelled positions only, with the output layer in the autocast dtype.

Chat SFT scores assistant tokens only, and padding scores nothing, yet a causal LM's own forward projects
every position through its output layer (SmolLM2: 49,152 x 576; Gemma-3-270m: 262,144 x 640, 168M of its
268M parameters) and throws most of those logits away. Here the backbone runs as usual, then only the hidden
states whose *shifted* label is not ``-100`` are gathered and projected, under whatever autocast is active (the
Trainer's bf16 autocast when training asks for bf16), and the cross-entropy is taken in fp32. Run without
autocast it equals the model's own loss to float rounding (tested, 1e-5 per token).

:func:`add_labelled_head` patches a model so that ``model(..., labels=..., labelled_head=True)`` returns that
loss (and no logits); the flag passes through PEFT wrappers (LoRA-family models and prompt learning alike:
PEFT prefixes the labels of virtual tokens with ``-100``, so they are skipped). Without the flag the model is
unchanged, so generation and saving see the original forward.

:class:`PaddingFreeCollator` removes padding from the batches: a batch's conversations are laid end to end in
one row, with ``position_ids`` restarting at 0 for each, and no attention mask; transformers then builds a
block-diagonal causal mask from the position ids, so no token attends across a conversation boundary and
every conversation gets the loss it gets alone (tested, 1e-5). Prompt learning (virtual tokens or a prefix
cache, which belong to one conversation) keeps padded batches (:class:`TailTrimmingCollator`).

Both collators also drop the tokens after a conversation's last labelled token (a user turn cut by
``max_seq_len``, say): in a causal model they can neither be scored nor change a scored position, so the loss
and gradients are those of the whole row (tested) for less work.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .chat_format import IGNORE_INDEX
from .frozen_weights import cast_weight

logger = logging.getLogger(__name__)

# Above this many logits (labelled tokens x vocabulary) in one projection, the head runs in token chunks whose
# logits are recomputed in the backward pass, so that only one chunk's logits are alive at a time.
CHUNK_LOGITS = 64 * 2**20


def _head_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              softcap: float | None, scale: float) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` under ``hidden @ weight.T`` (the autocast dtype for the
    projection, fp32 for the softmax)."""
    logits = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def labelled_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module, softcap: float | None = None,
                 scale: float = 1.0, chunk_logits: int = CHUNK_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of scored tokens) of the next-token labels: position ``t`` predicts ``labels[t + 1]``.

    ``hidden`` is ``[batch, seq, dim]`` (the backbone's last hidden state), ``labels`` ``[batch, seq]`` with
    ``-100`` where nothing is scored. A batch with no label gives a differentiable zero.
    """
    shifted = labels[:, 1:].to(hidden.device)
    mask = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    targets = shifted[mask]
    count = mask.sum()
    weight, bias = cast_weight(lm_head), getattr(lm_head, "bias", None)
    n, step = targets.numel(), max(1, chunk_logits // weight.shape[0])
    if n == 0:
        return hidden.sum() * 0.0, count
    if n <= step:
        return _head_nll(selected, weight, bias, targets, softcap, scale), count
    chunks = [(selected[i:i + step], targets[i:i + step]) for i in range(0, n, step)]
    if not torch.is_grad_enabled():
        return sum(_head_nll(h, weight, bias, t, softcap, scale) for h, t in chunks), count
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in chunks:
        total = total + checkpoint(_head_nll, h, weight, bias, t, softcap, scale, use_reentrant=False)
    return total, count


def _logit_transform(config) -> tuple[float | None, float]:
    """(final logit softcap, logit scale) of a model config (Gemma-2 caps logits; most models do neither)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    return softcap, 1.0 if scale is None else float(scale)


def add_labelled_head(model: torch.nn.Module) -> torch.nn.Module:
    """Patch the causal LM under ``model`` (a PEFT model's base model, or the model itself) in place so that a
    forward with ``labelled_head=True`` returns the loss over labelled positions only; returns ``model``.

    The loss is divided by ``num_items_in_batch`` when given (the Trainer's token count over gradient
    accumulation), else by the number of scored tokens. Patching twice is harmless.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(target, "_llm_caption_labelled_head", False):
        return model
    original = target.forward
    # The original forward is called on the model it runs for, not on ``target``: a deep copy of a patched model
    # (generation merges adapters into a copy) must run the copy's weights, not the original's.
    original_func = original.__func__ if getattr(original, "__self__", None) is target else None
    softcap, scale = _logit_transform(target.config)
    backbone_name = getattr(target, "base_model_prefix", "model")

    # A bound method, like the forward it replaces: accelerate's autocast wrapper rebinds ``forward.__func__``.
    @functools.wraps(type(target).forward)
    def forward(self, *args, labelled_head: bool = False, labels=None, num_items_in_batch=None, **kwargs):
        if not labelled_head:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_func(self, *args, **kwargs) if original_func is not None else original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None:
            raise ValueError("labelled_head=True needs labels")
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)
        hidden = getattr(self, backbone_name)(*args, **kwargs).last_hidden_state
        total, count = labelled_nll(hidden, labels, self.get_output_embeddings(), softcap, scale)
        denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        return CausalLMOutputWithPast(loss=total / denominator)

    target.forward = types.MethodType(forward, target)
    target._llm_caption_labelled_head = True
    return model


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """True for PEFT prompt tuning, P-tuning and prefix tuning (virtual tokens or a prefix cache per sequence)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def trim_unlabelled_tail(feature: Mapping[str, Any]) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of a tokenized conversation up to its last labelled token (the whole row when
    nothing is labelled); raises ``ValueError`` when the two lists differ in length."""
    ids, labels = list(feature["input_ids"]), list(feature["labels"])
    if len(ids) != len(labels):
        raise ValueError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    end = end or len(labels)
    return {"input_ids": ids[:end], "labels": labels[:end]}


class TailTrimmingCollator:
    """Another collator (padding, e.g. TRL's) applied to the features cut by :func:`trim_unlabelled_tail`."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, features: Sequence[Mapping[str, Any]]):
        return self.inner([{**feature, **trim_unlabelled_tail(feature)} for feature in features])


# Attention's multiply-adds run at about half the rate of the linear layers' on this CPU (SDPA with an explicit
# mask, softmax in fp32): SmolLM2 LoRA on full 96-token rows, batch 4, took 1.68 s/step padded and 2.00 s/step
# laid end to end in one 384-token row; :func:`attention_crossover` counts them twice.
ATTENTION_COST = 2.0


def attention_crossover(model: torch.nn.Module) -> float | None:
    """The row length at which a token's attention work equals its other work: the body's weights (every
    parameter but the input embeddings, and the output layer when it has its own weights, which only labelled
    positions use either way) over ``ATTENTION_COST x 2 x layers x attention width`` (a query's dot products
    with every key of its row and the weighted sum of the values, in every layer). ``None`` when the config
    does not say."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            skip.add(id(module.weight))
    body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return body / (ATTENTION_COST * 2 * layers * heads * head_dim)


def layout_cost(tokens: int, row_length: int, crossover: float) -> float:
    """Relative cost of a batch of ``tokens`` positions in rows of ``row_length``: per-token work, plus
    attention growing with the row (``crossover``: :func:`attention_crossover`)."""
    return tokens * (1.0 + row_length / crossover)


class PaddingFreeCollator:
    """Batches without padding: a batch's tokenized conversations (``input_ids``, ``labels``) end to end in one row.

    Each conversation is first cut after its last labelled token (:func:`trim_unlabelled_tail`). Returns
    ``input_ids``, ``labels`` and ``position_ids`` of shape ``[1, total tokens]``; the first label of each
    conversation is ``-100`` (the token before it belongs to another conversation). No attention mask:
    transformers derives the block-diagonal causal mask from the restarting position ids.

    One row saves the padding's work but pays attention over the whole row (a conversation's tokens are masked
    from the others', not skipped). With ``crossover`` (:func:`attention_crossover`) and ``pad_token_id`` each
    batch takes the cheaper layout by :func:`layout_cost`: end to end, or padded on the right to its longest
    conversation (``attention_mask``, labels ``-100`` on padding), which is the cheaper one when the
    conversations are of about one length. Either way every conversation gets the loss it gets alone.
    """

    def __init__(self, pad_token_id: int | None = None, crossover: float | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.crossover = crossover
        self.layouts = {"padding_free": 0, "padded": 0}  # batches laid out each way (logged by the trainer)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [row for row in (trim_unlabelled_tail(f) for f in features) if row["input_ids"]]
        if self.crossover and self.pad_token_id is not None and len(rows) > 1:
            total = sum(len(r["input_ids"]) for r in rows)
            longest = max(len(r["input_ids"]) for r in rows)
            if layout_cost(len(rows) * longest, longest, self.crossover) < layout_cost(total, total, self.crossover):
                self.layouts["padded"] += 1
                return self.padded(rows, longest)
        self.layouts["padding_free"] += 1
        ids, labels, positions = [], [], []
        for row in rows:
            row_ids, row_labels = row["input_ids"], row["labels"]
            ids.extend(row_ids)
            labels.extend([IGNORE_INDEX, *row_labels[1:]])
            positions.extend(range(len(row_ids)))
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long)}

    def padded(self, rows: Sequence[Mapping[str, list[int]]], length: int) -> dict[str, torch.Tensor]:
        return pad_right(rows, self.pad_token_id, length)


def pad_right(rows: Sequence[Mapping[str, list[int]]], pad_token_id: int, length: int | None = None,
              device=None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` and ``attention_mask`` of ``rows`` padded on the right to ``length`` (default: the
    longest row): ``pad_token_id`` in the ids, ``-100`` in the labels, 0 in the mask."""
    length = max(len(r["input_ids"]) for r in rows) if length is None else length
    ids = [r["input_ids"] + [pad_token_id] * (length - len(r["input_ids"])) for r in rows]
    labels = [r["labels"] + [IGNORE_INDEX] * (length - len(r["labels"])) for r in rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows]
    return {"input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "labels": torch.tensor(labels, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=device)}
