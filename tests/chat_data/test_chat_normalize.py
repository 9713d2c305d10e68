"""The Persian normaliser: each step, its switches and its configuration errors."""

import pytest

from llm_caption.chat_data.normalize import PersianNormalizer

ZWNJ = "\u200c"


def test_arabic_letters_become_persian():
    assert PersianNormalizer()("علي كتاب مى") == "علی کتاب می"
    assert PersianNormalizer(unify_arabic_letters=False)("علي") == "علي"


@pytest.mark.parametrize("policy, text, expected", [
    ("keep", "٣ ۳ 3", "٣ ۳ 3"),
    ("arabic_to_persian", "٣ ۳ 3", "۳ ۳ 3"),
    ("to_persian", "٣ ۳ 3", "۳ ۳ ۳"),
    ("to_latin", "٣ ۳ 3", "3 3 3"),
])
def test_digit_policies(policy, text, expected):
    assert PersianNormalizer(digits=policy)(text) == expected


def test_zwnj_collapsed_and_removed_next_to_spaces():
    n = PersianNormalizer()
    assert n(f"می{ZWNJ}{ZWNJ}{ZWNJ}روم") == f"می{ZWNJ}روم"
    assert n(f"خانه{ZWNJ} ها") == "خانه ها"
    assert n(f"خانه {ZWNJ}ها") == "خانه ها"
    assert n(f"{ZWNJ}سلام{ZWNJ}") == "سلام"
    assert n("می\u200bروم") == f"می{ZWNJ}روم"  # zero-width space used as a joiner-breaker
    assert PersianNormalizer(fix_zwnj=False)(f"می{ZWNJ}{ZWNJ}روم") == f"می{ZWNJ}{ZWNJ}روم"


def test_tatweel_and_diacritics_are_switches():
    text = "كِتـــاب خانهٔ"
    assert PersianNormalizer()(text) == "کتاب خانهٔ"  # the ezafe hamza is kept
    kept = PersianNormalizer(remove_tatweel=False, remove_diacritics=False)(text)
    assert "ـ" in kept and "\u0650" in kept


def test_whitespace_cleanup_keeps_line_breaks():
    assert PersianNormalizer()(" سلام \t\u00a0 دنیا  \r\n\r\n\r\n\n  خداحافظ ") == "سلام دنیا\n\nخداحافظ"
    assert PersianNormalizer()("الف\nب") == "الف\nب"


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="digits='roman'"):
        PersianNormalizer.from_config({"digits": "roman"})
    with pytest.raises(ValueError, match="lowercase"):
        PersianNormalizer.from_config({"lowercase": True})
    assert PersianNormalizer.from_config(None) == PersianNormalizer()
