import pytest

from llm_caption.llm.text_metrics import persian_share


def test_persian_share_counts_letters_only():
    assert persian_share("سلام، حالت چطوره؟ ۱۲۳") == 1.0
    assert persian_share("hello world 123") == 0.0
    # 4 Persian letters (سلام) and 2 Latin letters (hi); digits, spaces, punctuation ignored.
    assert persian_share("سلام hi! 42") == pytest.approx(4 / 6)


def test_persian_share_of_text_without_letters_is_zero():
    assert persian_share("") == 0.0
    assert persian_share("123 ... ؟") == 0.0


def test_fixed_prompt_share_separates_persian_and_english_prompts():
    from llm_caption.llm.experiment import fixed_prompt_share

    prompts = [{"prompt_kind": "fixed", "prompt": "یک شعر کوتاه بنویس"},
               {"prompt_kind": "fixed", "prompt": "Write a short poem"},
               {"prompt_kind": "test", "prompt": "سلام"}]
    answers = ["شعر کوتاه", "a poem", "hello there"]
    assert fixed_prompt_share(prompts, answers) == 1.0  # the test question's answer does not count
    assert fixed_prompt_share(prompts, answers, persian_prompts=False) == 0.0
    assert fixed_prompt_share(prompts, ["poem", "شعر", ""]) == 0.0
