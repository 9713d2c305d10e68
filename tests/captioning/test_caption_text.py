from llm_caption.captioning.text import clean_caption, tokenize


def test_clean_caption_lowercases_strips_punctuation_digits_and_spaces():
    assert clean_caption("  A Dog's   ball, 2 times!\t") == "a dog s ball times"
    assert clean_caption("Two-3 dogs.") == "two dogs"
    assert clean_caption("...") == ""


def test_clean_caption_is_idempotent_and_tokenize_splits():
    raw = "A child in a pink dress is climbing up a set of stairs in an entry way ."
    once = clean_caption(raw)
    assert clean_caption(once) == once
    assert tokenize(raw)[:3] == ["a", "child", "in"]
    assert tokenize(raw)[-1] == "way"
