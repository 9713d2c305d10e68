"""A small, documented Persian text normaliser.

hazm, the usual Persian toolkit, needs Python >= 3.12 from version 0.11 on, and its 0.10 release
pins numpy 1.24 and pulls gensim and fasttext; so the few steps needed here are written out.

Each step is one switch in ``chat_data.normalize`` (parameters_data_engineering_chat.yml):

``unify_arabic_letters``
    Arabic Yeh ``ي`` (U+064A) and Alef Maksura ``ى`` (U+0649) become Persian Yeh ``ی``
    (U+06CC); Arabic Kaf ``ك`` (U+0643) becomes Persian Keheh ``ک`` (U+06A9). Keyboards and
    web sources mix them; the tokenizer sees them as different characters.
``digits``
    One of :data:`DIGIT_POLICIES`: ``keep``; ``arabic_to_persian`` (Arabic-Indic ``٠..٩`` ->
    Persian ``۰..۹``, Latin digits untouched, so code and numbers in English stay as they are);
    ``to_persian`` (Arabic-Indic and Latin -> Persian); ``to_latin`` (Arabic-Indic and Persian
    -> ``0..9``).
``remove_tatweel``
    Drop the kashida ``ـ`` (U+0640), a purely typographic stretch.
``remove_diacritics``
    Drop the Arabic harakat U+064B..U+0652 (fathatan .. sukun). The hamza above of ezafe
    (``ۀ``, ``هٔ``) is a letter mark and is kept.
``fix_zwnj``
    Zero-width non-joiner (U+200C, *nim-fasele*): other zero-width characters used in its
    place (U+200B, U+FEFF) become ZWNJ, runs of ZWNJ collapse to one, and a ZWNJ next to
    whitespace or at either end of the text is removed (it joins nothing there).
``collapse_whitespace``
    ``\\r\\n`` -> ``\\n``; other Unicode spaces (no-break, thin, ...) and tabs -> one space;
    runs of spaces collapse to one; spaces at line ends are stripped; three or more newlines
    collapse to a blank line; the text is stripped. Line breaks inside a message are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ZWNJ = "\u200c"
TATWEEL = "\u0640"

_ARABIC_LETTERS = str.maketrans({"\u064a": "\u06cc", "\u0649": "\u06cc", "\u0643": "\u06a9"})
_ARABIC_DIGITS = "٠١٢٣٤٥٦٧٨٩"
_PERSIAN_DIGITS = "۰۱۲۳۴۵۶۷۸۹"
_LATIN_DIGITS = "0123456789"

#: Digit policy name -> translation table applied to the text.
DIGIT_POLICIES: dict[str, dict[int, str]] = {
    "keep": {},
    "arabic_to_persian": str.maketrans(_ARABIC_DIGITS, _PERSIAN_DIGITS),
    "to_persian": str.maketrans(_ARABIC_DIGITS + _LATIN_DIGITS, _PERSIAN_DIGITS * 2),
    "to_latin": str.maketrans(_ARABIC_DIGITS + _PERSIAN_DIGITS, _LATIN_DIGITS * 2),
}

_DIACRITICS = re.compile("[\u064b-\u0652]")
_OTHER_ZERO_WIDTH = re.compile("[\u200b\ufeff]")
_ZWNJ_RUN = re.compile(ZWNJ + "{2,}")
_ZWNJ_NEAR_SPACE = re.compile(rf"{ZWNJ}+(?=\s)|(?<=\s){ZWNJ}+|\A{ZWNJ}+|{ZWNJ}+\Z")
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace except newline (tabs, NBSP, thin space, ...)
_SPACE_AT_LINE_END = re.compile(r" *\n *")
_MANY_NEWLINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class PersianNormalizer:
    """Normalise Persian text; each field switches one step on or off (see the module docstring)."""

    unify_arabic_letters: bool = True
    digits: str = "arabic_to_persian"
    remove_tatweel: bool = True
    remove_diacritics: bool = True
    fix_zwnj: bool = True
    collapse_whitespace: bool = True

    def __post_init__(self) -> None:
        if self.digits not in DIGIT_POLICIES:
            raise ValueError(f"chat_data.normalize.digits={self.digits!r} is not a digit policy; "
                             f"expected one of {sorted(DIGIT_POLICIES)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> PersianNormalizer:
        """Build from the ``chat_data.normalize`` mapping; unknown keys are an error, missing keys take defaults."""
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown chat_data.normalize option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**config)

    def __call__(self, text: str) -> str:
        """The normalised ``text``."""
        if self.unify_arabic_letters:
            text = text.translate(_ARABIC_LETTERS)
        text = text.translate(DIGIT_POLICIES[self.digits])
        if self.remove_tatweel:
            text = text.replace(TATWEEL, "")
        if self.remove_diacritics:
            text = _DIACRITICS.sub("", text)
        if self.collapse_whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            text = _SPACES.sub(" ", text)
        if self.fix_zwnj:
            text = _OTHER_ZERO_WIDTH.sub(ZWNJ, text)
            text = _ZWNJ_RUN.sub(ZWNJ, text)
            text = _ZWNJ_NEAR_SPACE.sub("", text)
        if self.collapse_whitespace:
            text = _SPACES.sub(" ", text)
            text = _SPACE_AT_LINE_END.sub("\n", text)
            text = _MANY_NEWLINES.sub("\n\n", text)
            text = text.strip()
        return text
