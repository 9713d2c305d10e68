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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .models import STOP_TOKENS_ATTR, check_stop_tokens, is_4bit  # noqa: F401 - both re-exported

logger = logging.getLogger(__name__)

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


class _TextCallback:
    """A ``generate`` streamer (one conversation) that hands each new piece of the answer's text to ``on_text`` as
    soon as it is whole: the prompt is skipped, nothing from the first stop id on is shown, text ending in an
    incomplete character or in white space waits for the next token. The pieces joined are the returned answer."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt ids first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stopped or int(token) in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        piece = text.strip()[self.shown:]  # stripped like the returned answer: trailing space waits
        if piece:
            self.shown += len(piece)
            self.on_text(piece)


def non_persian_tokens(tokenizer) -> torch.Tensor:
    """Ids of the tokens that hold a letter of another script than Persian/Arabic (special and added tokens
    excluded), worked out once per tokenizer."""
    cached = getattr(tokenizer, "_llm_caption_non_persian", None)
    if cached is not None:
        return cached
    from .text_metrics import has_other_script_letter

    special = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    ids = []
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special or token.startswith("<0x"):
            continue
        if has_other_script_letter(token):
            ids.append(token_id)
    result = torch.tensor(sorted(ids), dtype=torch.long)
    tokenizer._llm_caption_non_persian = result
    return result


class NonPersianPenalty:
    """A logits processor: ``penalty`` subtracted from the logits of tokens that hold non-Persian letters
    (:func:`non_persian_tokens`), so answers keep to Persian unless another script is much more likely."""

    def __init__(self, token_ids: torch.Tensor, penalty: float) -> None:
        self.token_ids = token_ids
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = self.token_ids[self.token_ids < scores.shape[-1]].to(scores.device)
        scores = scores.clone()
        scores[:, ids] -= self.penalty
        return scores


def generate_answers(model, tokenizer, conversations: Sequence[list[dict[str, str]]],
                     generation: Mapping[str, Any], batch_size: int = 8, fast: bool = True,
                     with_ended: bool = False, on_text: Callable[[str], None] | None = None
                     ) -> list[str] | tuple[list[str], list[bool]]:
    """The model's reply to each conversation (rendered with the tokenizer's chat template + generation prompt).

    ``generation`` holds ``generate`` settings plus ``stop_tokens`` (token strings an answer also ends at, beside
    the tokenizer's eos and the model spec's stop tokens); the answer is the text before the first stop id.
    ``seed`` (sampling only) seeds torch before each batch, so the same settings give the same answers.
    ``non_persian_penalty`` (default 0: off) is subtracted from the logits of tokens with letters of other scripts
    (:class:`NonPersianPenalty`).
    ``with_ended``: also return, per answer, whether it ended on its own (a stop id before ``max_new_tokens``).
    ``on_text``: stream the answer of a single conversation, each new piece of text handed to it as it is
    generated (the returned answer is the same text).
    """
    if on_text is not None and len(conversations) != 1:
        raise ValueError(f"streaming (on_text) answers one conversation at a time, got {len(conversations)}")
    settings = dict(generation)
    stops = stop_token_ids(tokenizer, settings.pop("stop_tokens", None) or (), model)
    settings.setdefault("max_new_tokens", 48)
    settings.setdefault("do_sample", False)
    settings.update(pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops[0] if len(stops) == 1 else (stops or None))
    stop_set = set(stops)
    seed = settings.pop("seed", None)
    penalty = float(settings.pop("non_persian_penalty", 0.0) or 0.0)
    if penalty:
        from transformers import LogitsProcessorList

        ids = non_persian_tokens(tokenizer)
        settings["logits_processor"] = LogitsProcessorList([NonPersianPenalty(ids[~torch.isin(ids, torch.tensor(
            stops, dtype=torch.long))] if stops else ids, penalty)])
    answers: list[str] = []
    ended: list[bool] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    runner = generation_model(model) if fast else model  # a merged copy of an eval-mode model is in eval mode
    try:
        # a streamed answer is its own progress: no bar beside it
        for start in tqdm(range(0, len(conversations), batch_size), desc="generate", leave=False,
                          disable=on_text is not None):
            batch = conversations[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            if seed is not None:
                torch.manual_seed(int(seed) + start)
            streamer = None if on_text is None else _TextCallback(tokenizer, on_text, stop_set)
            with torch.no_grad():
                new_tokens = _generate(runner, enc, {**settings, "streamer": streamer} if streamer else settings, fast)
            for row in new_tokens:
                kept = _until_stop(row, stop_set)
                answers.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
                ended.append(len(kept) < len(row))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return (answers, ended) if with_ended else answers
