"""Chat metrics on real Persian sentences: script share, Persian-aware ROUGE-L, chrF, diversity, repetition."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from llm_caption.evaluation.chat_metrics import (
    answer_metrics,
    chrf,
    distinct_n,
    evaluate_chat,
    persian_share,
    repetition_rate,
    rouge_l,
    tokenize_words,
)

REF = ["پایتخت ایران تهران است.", "من حالم خوب است، ممنون."]


def test_persian_share_counts_letters_only():
    assert persian_share("سلام دوست من") == 1.0
    assert persian_share("hello") == 0.0
    assert persian_share("سلام hi") == pytest.approx(4 / 6)
    assert persian_share("123 !?") == 0.0


def test_rouge_keeps_persian_letters_where_the_default_tokenizer_scores_zero():
    from rouge_score.rouge_scorer import RougeScorer

    default = RougeScorer(["rougeL"]).score(REF[0], "تهران پایتخت ایران است")["rougeL"].fmeasure
    assert default == 0.0  # the default tokenizer deletes Persian letters
    assert rouge_l(["پایتخت ایران تهران است"], REF[:1]) == pytest.approx(1.0)
    assert 0 < rouge_l(["تهران پایتخت ایران است"], REF[:1]) < 1


def test_tokenizer_unifies_arabic_yeh_and_kaf():
    assert tokenize_words("كتاب علي") == tokenize_words("کتاب علی")


def test_chrf_ranks_closer_answers_higher():
    assert chrf(REF, REF) == pytest.approx(100.0)
    assert chrf(["پایتخت ایران تهران", "حالم خوب است"], REF) > chrf(["hello there", "I am fine"], REF)


def test_distinct_and_repetition():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert repetition_rate("من من من من من") == pytest.approx(1 - 1 / 3)
    assert repetition_rate("پایتخت ایران تهران است") == 0.0
    metrics = answer_metrics(["سلام سلام", "خوبم"])
    assert metrics["answer_length"] == 1.5 and "chrf" not in metrics


def test_evaluate_chat_rows_and_errors():
    results = pd.DataFrame({"method": ["lora"], "eval_loss": [1.2]})
    generations = pd.DataFrame({
        "method": ["lora"] * 4, "stage": ["after", "after", "before", "before"], "prompt_kind": ["test"] * 4,
        "prompt": ["پایتخت ایران کجاست؟", "حالت چطوره؟"] * 2, "reference": REF * 2,
        "answer": ["پایتخت ایران تهران است.", "خوبم", "The capital", "fine"]})
    table = evaluate_chat(results, generations).set_index("stage")
    assert math.isclose(table.loc["after", "perplexity"], math.exp(1.2))
    assert table.loc["after", "persian_share"] == 1.0 and table.loc["before", "persian_share"] == 0.0
    assert math.isnan(table.loc["before", "eval_loss"])
    broken = generations.copy()
    broken.loc[1, "reference"] = ""
    with pytest.raises(ValueError, match="row 1 .*without a reference"):
        evaluate_chat(results, broken)
    with pytest.raises(ValueError, match="no row in llm_method_results"):
        evaluate_chat(results.assign(method="dora"), generations)
