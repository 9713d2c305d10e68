"""The decoding settings the Persian study chose on dev answers: the penalty on tokens of other scripts and the
end-of-turn boost after a number of new tokens, and how dev_decoding reads them from the command line."""

from __future__ import annotations

import unicodedata

import pytest
import torch

from gemma_fixtures import gemma_tokenizer, tiny_gemma_spec  # noqa: F401 (fixtures)
from llm_caption.llm.dev_decoding import parse_candidate
from llm_caption.llm.generation import NonPersianPenalty, generate_answers, non_persian_tokens
from llm_caption.llm.models import load_model, load_tokenizer
from llm_caption.llm.text_metrics import is_persian_letter, persian_share

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[{"role": "user", "content": "یک شعر کوتاه درباره دانشگاه تهران بنویس"}],
           [{"role": "user", "content": "Write a short poem about a student"}]]


def other_letters(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c).startswith("L") and not is_persian_letter(c)]


def test_a_candidate_reads_pairs_and_numbers():
    assert parse_candidate("exponential_decay_length_penalty=48:1.1,non_persian_penalty=2.0") == {
        "exponential_decay_length_penalty": [48, 1.1], "non_persian_penalty": 2.0}
    assert parse_candidate("") == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_candidate("non_persian_penalty")


def test_the_penalised_tokens_are_those_with_letters_of_other_scripts(gemma_tokenizer):
    ids = set(non_persian_tokens(gemma_tokenizer).tolist())
    vocab = gemma_tokenizer.get_vocab()
    assert vocab["▁the"] in ids and vocab["in"] in ids
    persian = [t for t in ("▁دانشگاه", "▁شعر", "▁و") if t in vocab]
    assert persian and not any(vocab[t] in ids for t in persian)
    for special in ("<end_of_turn>", "<start_of_turn>", "<pad>", "<eos>"):
        assert vocab[special] not in ids
    no_letters = [t for t in ("▁", "1", "۱", "!", ".", "▁▁") if t in vocab]
    assert len(no_letters) >= 4 and not any(vocab[t] in ids for t in no_letters)  # no letters: not penalised
    scores = torch.zeros(2, len(vocab))
    out = NonPersianPenalty(non_persian_tokens(gemma_tokenizer), 2.0)(None, scores)
    assert out[0, vocab["▁the"]] == -2.0 and out[1, vocab[persian[0]]] == 0.0 and scores.abs().sum() == 0


def test_a_large_penalty_keeps_answers_in_persian_and_the_boost_ends_them(tiny_gemma_spec):
    model, tokenizer = load_model(tiny_gemma_spec).eval(), load_tokenizer(tiny_gemma_spec)
    plain = {"max_new_tokens": 16, "do_sample": False}
    free, free_ended = generate_answers(model, tokenizer, PROMPTS, plain, with_ended=True)
    assert min(persian_share(a) for a in free) < 0.5  # a random model writes every script
    steered = generate_answers(model, tokenizer, PROMPTS, {**plain, "non_persian_penalty": 100.0})
    # symbols and digits may stay; every letter is Persian/Arabic script
    assert not any(other_letters(a) for a in steered), steered
    assert any(persian_share(a) == 1.0 for a in steered), steered
    assert not any(free_ended)
    ended = generate_answers(model, tokenizer, PROMPTS, {**plain, "exponential_decay_length_penalty": [2, 50.0]},
                             with_ended=True)[1]
    assert all(ended)
