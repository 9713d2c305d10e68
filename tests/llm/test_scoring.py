"""Measures that compare models across tokenizers: bits per character (checked by hand) and chrF++
(checked against the sacrebleu command line)."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from gemma_fixtures import gemma_spec, gemma_tokenizer, tiny_gemma_spec  # noqa: F401 (fixtures)
from llm_fixtures import finetuning_cfg  # noqa: F401 (fixture)
from llm_caption.evaluation.chat_metrics import chrf_pp
from llm_caption.llm.chat_format import IGNORE_INDEX, tokenize_conversation
from llm_caption.llm.models import load_model, train_chat_template
from llm_caption.llm.scoring import CharacterScore, assistant_characters, labelled_spans, score_characters


def test_character_score_arithmetic_by_hand():
    score = CharacterScore(nats=12.0, tokens=6, characters=10)
    assert math.isclose(score.bits_per_character, 12.0 / (10 * math.log(2)))  # 1.7312 bits per character
    assert math.isclose(score.bits_per_character, 1.7312340490667559)
    assert score.loss_per_token == 2.0
    assert math.isnan(CharacterScore(0.0, 0, 0).bits_per_character)
    assert labelled_spans([-100, 5, 6, -100, -100, 7, -100]) == [[5, 6], [7]]


def test_bits_per_character_on_a_hand_checked_conversation(tiny_gemma_spec, gemma_tokenizer):
    tok = gemma_tokenizer
    conversation = [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود"},
                    {"role": "user", "content": "خوبی؟"}, {"role": "assistant", "content": "بله"}]
    row = tokenize_conversation(tok, conversation, train_chat_template(tiny_gemma_spec))
    # "درود" (4 letters) and "بله" (3): 7 characters; the two <end_of_turn> tokens are scored but spell nothing.
    assert assistant_characters(tok, row["labels"]) == 7
    model = load_model(tiny_gemma_spec)
    score = score_characters(model, tok, [row])

    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    nats = -sum(float(log_probs[i - 1, label]) for i, label in enumerate(row["labels"])
                if i > 0 and label != IGNORE_INDEX)
    n_labelled = sum(label != IGNORE_INDEX for label in row["labels"])
    assert score.tokens == n_labelled and score.characters == 7
    assert math.isclose(score.nats, nats, rel_tol=1e-5)
    assert math.isclose(score.bits_per_character, nats / (7 * math.log(2)), rel_tol=1e-5)


def test_chrf_pp_equals_the_sacrebleu_command_line(tmp_path):
    hypotheses = ["تهران پایتخت ایران است.", "من دانشجوی دانشگاه تهران هستم", "hello world"]
    references = ["پایتخت ایران تهران است.", "من در دانشگاه تهران درس می‌خوانم.", "hello there world"]
    (tmp_path / "hyp.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(references) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                          "-m", "chrf", "--chrf-word-order", "2", "-b", "-w", "6"],
                         capture_output=True, text=True, check=True)
    assert math.isclose(chrf_pp(hypotheses, references), float(out.stdout.strip()), abs_tol=1e-6)
    assert chrf_pp(references, references) == 100.0


def test_batched_scoring_equals_one_conversation_at_a_time(tiny_gemma_spec, gemma_tokenizer, finetuning_cfg):
    """Padded batches (sorted by length, right padding, tails cut after the last label) give every conversation
    its own loss: the same sums as scoring one at a time, plain and through a prompt-learning adapter."""
    import copy

    from chat_fixtures import persian_conversations
    from llm_caption.llm.chat_format import tokenize_conversations
    from llm_caption.llm.methods import MethodContext, build_method
    from llm_caption.llm.experiment import method_settings

    tok = gemma_tokenizer
    data = tokenize_conversations(tok, [(f"c{i}", c) for i, c in enumerate(persian_conversations(7))],
                                  train_chat_template(tiny_gemma_spec), 96)
    assert len({len(ids) for ids in data["input_ids"]}) > 2  # batches really pad
    base = load_model(tiny_gemma_spec)
    prompt_cfg, _ = method_settings(finetuning_cfg, "prompt_tuning")
    for model in (base, build_method(copy.deepcopy(base), prompt_cfg, MethodContext(tokenizer=tok, seed=0))):
        alone = score_characters(model, tok, data, batch_size=1)
        batched = score_characters(model, tok, data, batch_size=4)
        assert (batched.tokens, batched.characters) == (alone.tokens, alone.characters)
        assert math.isclose(batched.nats, alone.nats, rel_tol=1e-5), (batched.nats, alone.nats)


def test_bf16_scoring_stays_within_bf16_rounding_of_fp32(tiny_gemma_spec, gemma_tokenizer):
    """Under bf16 autocast (as training runs) the summed loss moves by bf16 rounding only; the counts not at all."""
    from chat_fixtures import persian_conversations
    from llm_caption.llm.chat_format import tokenize_conversations

    tok = gemma_tokenizer
    data = tokenize_conversations(tok, [(f"c{i}", c) for i, c in enumerate(persian_conversations(6))],
                                  train_chat_template(tiny_gemma_spec), 96)
    model = load_model(tiny_gemma_spec)
    fp32 = score_characters(model, tok, data)
    bf16 = score_characters(model, tok, data, bf16=True)
    assert (bf16.tokens, bf16.characters) == (fp32.tokens, fp32.characters)
    assert bf16.nats != fp32.nats  # it really ran in bf16
    assert math.isclose(bf16.nats, fp32.nats, rel_tol=1e-2), (bf16.nats, fp32.nats)
