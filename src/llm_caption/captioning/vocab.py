"""Caption vocabulary: words <-> indices, and fixed-length encoding.

Indices 0..3 are reserved for ``<pad> <sos> <eos> <unk>``. An encoded caption has exactly
``max_len`` ids: ``<sos> w1 .. wn <eos> <pad> ...``; a caption longer than ``max_len - 2``
words is cut to ``max_len - 2`` words (and still ends with ``<eos>``).
The JSON form (``to_dict``) is the ``caption_vocab`` dataset of docs/datasets.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .decoding import EOS as EOS_ID
from .decoding import PAD as PAD_ID
from .decoding import SOS as SOS_ID
from .decoding import SPECIAL_TOKENS, ids_to_words
from .decoding import UNK as UNK_ID
from .text import tokenize

PAD, SOS, EOS, UNK = SPECIAL_TOKENS  # the words; their ids are decoding's PAD, SOS, EOS, UNK (0..3)


@dataclass
class Vocabulary:
    """A caption vocabulary.

    Attributes:
        itos: index -> word; the first four entries are ``<pad> <sos> <eos> <unk>``.
        min_count: the minimum train-split count a word needed to be kept.
        max_len: the fixed length of encoded captions (``<sos>`` and ``<eos>`` included).
    """

    itos: list[str]
    min_count: int = 1
    max_len: int = 32
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.itos[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {list(SPECIAL_TOKENS)}, got {self.itos[:4]}")
        if len(set(self.itos)) != len(self.itos):
            dupes = sorted(w for w, c in Counter(self.itos).items() if c > 1)
            raise ValueError(f"vocabulary has duplicate words: {dupes[:10]}")
        if self.max_len < 3:
            raise ValueError(f"max_len must be at least 3 (<sos> word <eos>), got {self.max_len}")
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    # -- construction ---------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_len: int = 32) -> "Vocabulary":
        """Build from (train-split) captions: words seen at least ``min_count`` times,
        most frequent first, ties broken alphabetically (deterministic)."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                      key=lambda w: (-counts[w], w))
        return cls(itos=list(SPECIAL_TOKENS) + kept, min_count=min_count, max_len=max_len)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"itos": [...], "min_count": int, "max_len": int}``."""
        return {"itos": list(self.itos), "min_count": int(self.min_count), "max_len": int(self.max_len)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Vocabulary":
        """Inverse of :meth:`to_dict`."""
        return cls(itos=list(data["itos"]), min_count=int(data.get("min_count", 1)),
                   max_len=int(data.get("max_len", 32)))

    # -- use --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def sos_id(self) -> int:
        return SOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``<sos> words <eos> <pad>...`` of length ``max_len`` (default: ``self.max_len``).

        ``text`` is cleaned with :func:`llm_caption.captioning.text.clean_caption`; unknown
        words map to ``<unk>``; words beyond ``max_len - 2`` are dropped.
        """
        ids, _ = self.encode_with_info(text, max_len)
        return ids

    def encode_with_info(self, text: str, max_len: int | None = None) -> tuple[list[int], bool]:
        """Like :meth:`encode`, also returning whether the caption was truncated."""
        length = int(max_len if max_len is not None else self.max_len)
        if length < 3:
            raise ValueError(f"max_len must be at least 3, got {length}")
        words = tokenize(text)
        truncated = len(words) > length - 2
        body = [self.stoi.get(w, UNK_ID) for w in words[: length - 2]]
        ids = [SOS_ID, *body, EOS_ID]
        return ids + [PAD_ID] * (length - len(ids)), truncated

    def decode(self, ids: Sequence[int], join: bool = True) -> str | list[str]:
        """Words of ``ids`` up to the first ``<eos>``, skipping ``<pad>`` and ``<sos>``.

        Accepts any sequence of ints (list, numpy array, 1-D tensor). Returns a string
        (words joined by spaces) or, with ``join=False``, the list of words.
        """
        known = [int(i) if 0 <= int(i) < len(self.itos) else UNK_ID for i in ids]
        words = ids_to_words(known, self.itos)
        return " ".join(words) if join else words
