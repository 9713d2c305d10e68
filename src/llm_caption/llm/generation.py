"""Answer chat prompts with a (fine-tuned) model: batched, left-padded, greedy by default.

Adapters change how fast a model generates, not what it computes, so generation takes the
fast route to the same function:

* LoRA-family adapters (LoRA, rsLoRA, DoRA, LoHa ...) on unquantised weights are merged into a
  copy of the model (``merge_and_unload``): one matmul per layer instead of base + adapter
  (DoRA also recomputes its weight norm every token). The trained model itself is untouched.
* Soft prompts (prompt tuning, P-tuning) are computed once and prepended as input embeddings to
  the base model's own ``generate``; prefix tuning's prefixes are handed to it as a filled key/value
  cache. Positions and attention then match the forward pass the method was trained with (a test
  checks the answers against greedy decoding with that forward pass). With the pinned
  transformers/PEFT pair, ``PeftModel.generate`` for these methods answers differently from that
  forward pass after the first token, and 3-4x slower for the soft prompts.

``fast=False`` generates with the adapter model as it is (PEFT's own generation path).

Stop tokens: an answer ends at the tokenizer's eos or at any token of ``stop_tokens``: the generation setting
``stop_tokens`` (a list of token strings) together with the model spec's ``stop_tokens``, which
:func:`~llm_caption.llm.models.load_tokenizer` records on the tokenizer (Gemma-3: ``<start_of_turn>``, beside its
eos ``<end_of_turn>``). They are resolved to ids and handed to ``generate`` as a list of eos ids, so every route
above stops at them; the answer is the text before the first of them (the stop token itself is never decoded).
An unknown token string is a ``ValueError`` naming it and the model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .models import is_4bit

logger = logging.getLogger(__name__)

STOP_TOKENS_ATTR = "llm_caption_stop_tokens"  # the model spec's stop tokens, set on the tokenizer by load_tokenizer
_MERGEABLE = {"LORA", "LOHA", "LOKR", "ADALORA", "IA3"}
_SOFT_PROMPTS = {"PROMPT_TUNING", "P_TUNING"}


def _peft_type(model) -> str | None:
    config = getattr(model, "active_peft_config", None)
    peft_type = getattr(config, "peft_type", None)
    return None if peft_type is None else str(getattr(peft_type, "value", peft_type)).upper()


def generation_model(model):
    """The model to generate with: a merged copy for mergeable adapters on unquantised weights, else ``model``."""
    if _peft_type(model) in _MERGEABLE and not any(is_4bit(p) for p in model.parameters()):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _generate(model, enc: dict[str, torch.Tensor], settings: Mapping[str, Any], fast: bool) -> torch.Tensor:
    """New token ids of each row of ``enc``."""
    peft_type = _peft_type(model) if fast else None
    if peft_type in _SOFT_PROMPTS:
        base = model.get_base_model()
        batch = enc["input_ids"].shape[0]
        embeds = base.get_input_embeddings()(enc["input_ids"])
        prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
        mask = torch.cat([torch.ones(prompts.shape[:2], dtype=enc["attention_mask"].dtype, device=embeds.device),
                          enc["attention_mask"]], dim=1)
        # With inputs_embeds only, generate returns just the new tokens.
        return base.generate(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, **settings)
    if peft_type == "PREFIX_TUNING":
        # The prefix is a ready key/value cache of n positions. generate() takes input ids that include the
        # cached positions, so n placeholder ids stand for the prefix; the attention mask covers it, and the
        # prompt gets positions n, n+1, ... as in training.
        base = model.get_base_model()
        batch = enc["input_ids"].shape[0]
        cache = model.get_prompt(batch_size=batch)
        n_prefix = model.active_peft_config.num_virtual_tokens
        placeholder = torch.full((batch, n_prefix), settings["pad_token_id"], dtype=enc["input_ids"].dtype,
                                 device=enc["input_ids"].device)
        input_ids = torch.cat([placeholder, enc["input_ids"]], dim=1)
        mask = torch.cat([torch.ones_like(placeholder, dtype=enc["attention_mask"].dtype), enc["attention_mask"]], dim=1)
        out = base.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **settings)
        return out[:, input_ids.shape[1]:]
    out = model.generate(**enc, **settings)
    return out[:, enc["input_ids"].shape[1]:]


def check_stop_tokens(value: Any, where: str) -> list[str]:
    """``value`` as a list of token strings (null: none); anything else is a ``ValueError`` naming ``where``."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{where} must be a list of token strings (e.g. ['<end_of_turn>']), got {value!r}"[:300])
    return list(value)


def stop_token_ids(tokenizer, stop_tokens: Sequence[str] = (), model=None) -> list[int]:
    """Ids generation stops at: the tokenizer's eos, the spec's stop tokens recorded on the tokenizer, then
    ``stop_tokens`` (duplicates dropped). A token string the tokenizer does not have is a ``ValueError``."""
    vocab = tokenizer.get_vocab()
    name = (getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(tokenizer, "name_or_path", "")
            or type(tokenizer).__name__)
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for token in [*getattr(tokenizer, STOP_TOKENS_ATTR, ()), *check_stop_tokens(stop_tokens, "generation.stop_tokens")]:
        if token not in vocab:
            raise ValueError(f"stop token {token!r} is not a token of the model {name!r} (not in its tokenizer's "
                             f"vocabulary of {len(vocab):,}); generation.stop_tokens and the model spec's "
                             "stop_tokens take whole token strings such as '<end_of_turn>'")
        token_id = int(vocab[token])
        if token_id not in ids:
            ids.append(token_id)
    return ids


def _until_stop(ids: torch.Tensor, stops: set[int]) -> list[int]:
    """The ids of one generated row before its first stop id."""
    row = ids.tolist()
    return next((row[:i] for i, t in enumerate(row) if t in stops), row)


def generate_answers(model, tokenizer, conversations: Sequence[list[dict[str, str]]],
                     generation: Mapping[str, Any], batch_size: int = 8, fast: bool = True,
                     with_ended: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """The model's reply to each conversation (rendered with the tokenizer's chat template + generation prompt).

    ``generation`` holds ``generate`` settings plus ``stop_tokens`` (token strings an answer also ends at, beside
    the tokenizer's eos and the model spec's stop tokens); the answer is the text before the first stop id.
    ``seed`` (sampling only) seeds torch before each batch, so the same settings give the same answers.
    ``with_ended``: also return, per answer, whether it ended on its own (a stop id before ``max_new_tokens``).
    """
    settings = dict(generation)
    stops = stop_token_ids(tokenizer, settings.pop("stop_tokens", None) or (), model)
    settings.setdefault("max_new_tokens", 48)
    settings.setdefault("do_sample", False)
    settings.update(pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops[0] if len(stops) == 1 else (stops or None))
    stop_set = set(stops)
    seed = settings.pop("seed", None)
    answers: list[str] = []
    ended: list[bool] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    runner = generation_model(model) if fast else model  # a merged copy of an eval-mode model is in eval mode
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc="generate", leave=False):
            batch = conversations[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            if seed is not None:
                torch.manual_seed(int(seed) + start)
            with torch.no_grad():
                new_tokens = _generate(runner, enc, settings, fast)
            for row in new_tokens:
                kept = _until_stop(row, stop_set)
                answers.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
                ended.append(len(kept) < len(row))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return (answers, ended) if with_ended else answers
