"""Caption text cleaning: the one definition of how a caption becomes a list of words."""

from __future__ import annotations

import re
import string

_STRIP = str.maketrans({ch: " " for ch in string.punctuation + string.digits})
_SPACES = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Lower-case ``text``, replace punctuation and digits by spaces and collapse runs of whitespace.

    Idempotent: ``clean_caption(clean_caption(t)) == clean_caption(t)``.

    >>> clean_caption("A dog's  ball, 2 times!")
    'a dog s ball times'
    """
    return _SPACES.sub(" ", str(text).lower().translate(_STRIP)).strip()


def tokenize(text: str) -> list[str]:
    """The words of ``text`` after :func:`clean_caption`."""
    return clean_caption(text).split()
