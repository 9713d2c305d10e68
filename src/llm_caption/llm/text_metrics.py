"""Text measures of generated answers that do not need a reference."""

from __future__ import annotations

import unicodedata

# Arabic-script blocks (Persian letters included): Arabic, Arabic Supplement, Arabic Extended-A,
# Arabic Presentation Forms-A and -B.
_PERSIAN_RANGES = ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))


def is_persian_letter(char: str) -> bool:
    """True for a letter of the Persian/Arabic script."""
    code = ord(char)
    return unicodedata.category(char).startswith("L") and any(lo <= code <= hi for lo, hi in _PERSIAN_RANGES)


def has_other_script_letter(text: str) -> bool:
    """True when ``text`` holds a letter of another script than Persian/Arabic."""
    return any(unicodedata.category(c).startswith("L") and not is_persian_letter(c) for c in text)


def persian_share(text: str) -> float:
    """Share of Persian/Arabic-script letters among all letters of ``text`` (0.0 when it has no letters).

    Digits, punctuation, spaces and marks do not count as letters.
    """
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    if not letters:
        return 0.0
    return sum(is_persian_letter(c) for c in letters) / len(letters)
