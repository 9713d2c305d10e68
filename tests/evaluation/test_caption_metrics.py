"""Caption metrics on real captions: known values, implementation names, and clear errors on bad input."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from llm_caption.evaluation.caption_metrics import (
    CAPTION_SCORERS,
    CiderDScorer,
    CocoBleuScorer,
    NltkBleuScorer,
    RougeLScorer,
    evaluate_captions,
    tokenize_caption,
)

GTS = {
    "dog.jpg": ["A black dog runs across the grass.", "a dog running on green grass", "the black dog is running"],
    "bike.jpg": ["A man rides a bicycle down the street.", "a person riding a bike", "man on a bike in the city"],
    "beach.jpg": ["Two children play on the beach.", "kids playing in the sand", "two kids on a sandy beach"],
}


def test_identical_prediction_scores_perfectly_and_implementations_differ():
    res = {i: refs[0] for i, refs in GTS.items()}
    nltk = NltkBleuScorer().score(GTS, res)
    coco = CocoBleuScorer().score(GTS, res)
    assert nltk.corpus["bleu_4"] == pytest.approx(1.0)
    assert coco.corpus["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert RougeLScorer().score(GTS, res).corpus["rouge_l"] == pytest.approx(1.0)
    assert nltk.implementation != coco.implementation and "SmoothingFunction.method1" in nltk.implementation


def test_scores_rank_a_better_caption_higher():
    good = {"dog.jpg": "a black dog running on the grass", "bike.jpg": "a man riding a bike",
            "beach.jpg": "two kids playing on the beach"}
    bad = {"dog.jpg": "a cat sleeping", "bike.jpg": "a bowl of fruit", "beach.jpg": "a city at night"}
    for scorer, metric in ((NltkBleuScorer(), "bleu_1"), (CocoBleuScorer(), "bleu_1"), (RougeLScorer(), "rouge_l"),
                           (CiderDScorer(), "cider_d")):
        assert scorer.score(GTS, good).corpus[metric] > scorer.score(GTS, bad).corpus[metric], type(scorer).__name__
    per_image = CiderDScorer().score(GTS, good).per_image["cider_d"]
    assert set(per_image) == set(GTS) and all(v > 0 for v in per_image.values())


def test_nltk_bleu_matches_hand_computed_unigram_precision():
    # hypothesis "a dog a dog" vs reference "a dog runs": clipped unigram precision 2/4, brevity penalty 1
    result = NltkBleuScorer().score({"x": ["a dog runs"]}, {"x": "a dog a dog"})
    assert result.corpus["bleu_1"] == pytest.approx(0.5)


def test_tokenizer_lowercases_and_drops_punctuation():
    assert tokenize_caption("A Dog, running!  Fast.") == ["a", "dog", "running", "fast"]


def test_meteor_without_java_is_recorded_missing(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on this PATH
    frame = pd.DataFrame({"architecture": ["cnn_lstm"] * 3, "split": ["test"] * 3, "image_id": list(GTS),
                          "prediction": ["a dog", "a man on a bike", "kids"], "references": list(GTS.values())})
    metrics, per_image = evaluate_captions(frame, ["meteor", "cider_d"])
    meteor = metrics[metrics["metric"] == "meteor"].iloc[0]
    assert math.isnan(meteor["value"]) and meteor["implementation"] == "missing: java not on PATH"
    assert "METEOR is recorded as missing" in caplog.text
    assert "meteor" not in per_image.columns and per_image["cider_d"].notna().all()


@pytest.mark.parametrize("bad, message", [
    ({"references": [[], ["a b"], ["c d"]]}, r"row 0 .*image_id='dog.jpg'.*no non-empty reference"),
    ({"image_id": ["dog.jpg", "dog.jpg", "beach.jpg"]}, r"row 1 .*appears twice"),
    ({"prediction": [None, "x", "y"]}, r"row 0 .*prediction is missing"),
])
def test_bad_rows_are_named(bad, message):
    frame = pd.DataFrame({"architecture": ["a"] * 3, "split": ["test"] * 3, "image_id": list(GTS),
                          "prediction": ["x", "y", "z"], "references": list(GTS.values())})
    for column, values in bad.items():
        frame[column] = values
    with pytest.raises(ValueError, match=message):
        evaluate_captions(frame, ["cider_d"])


def test_unknown_scorer_and_missing_columns():
    frame = pd.DataFrame({"architecture": ["a"], "split": ["test"], "image_id": ["x"], "prediction": ["p"],
                          "references": [["r"]]})
    with pytest.raises(KeyError, match="spice"):
        evaluate_captions(frame, ["spice"])
    with pytest.raises(ValueError, match="lacks columns \\['references'\\]"):
        evaluate_captions(frame.drop(columns=["references"]), ["cider_d"])
    assert set(CAPTION_SCORERS) == {"nltk_bleu", "coco_bleu", "meteor", "rouge_l", "cider_d", "diversity"}


def test_diversity_counts_distinct_captions_and_words():
    frame = pd.DataFrame({"architecture": ["a"] * 4, "split": ["test"] * 4, "image_id": ["w", "x", "y", "z"],
                          "prediction": ["A dog runs.", "a dog runs", "a cat", "two dogs"],
                          "references": [["a dog"]] * 4})
    metrics, per_image = evaluate_captions(frame, ["diversity"])
    values = dict(zip(metrics["metric"], metrics["value"]))
    assert values == {"distinct_captions": 3 / 4, "vocab_used": 6.0}  # "A dog runs." normalises to "a dog runs"
    assert len(per_image) == 4
