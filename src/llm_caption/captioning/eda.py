"""Exploratory plots of a caption data set. Each function returns a ``matplotlib`` Figure
(built without pyplot, so no global figure state is left behind)."""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image


def word_counts(captions: Iterable[str], stopwords: Iterable[str] = ()) -> Counter:
    """Word frequencies over cleaned ``captions``, leaving out ``stopwords``."""
    stop = set(stopwords)
    return Counter(w for c in captions for w in c.split() if w not in stop)


def english_stopwords() -> list[str]:
    """The packaged English stop-word list (``stop-words`` package)."""
    from stop_words import get_stop_words

    return list(get_stop_words("en"))


def caption_length_figure(captions: pd.DataFrame, max_len: int) -> Figure:
    """Scatter of words vs characters per caption, and a histogram of words per caption with the
    ``max_len - 2`` word cut-off (``<sos>``/``<eos>`` take two of the ``max_len`` positions)."""
    n_words = captions["caption"].str.split().str.len().to_numpy()
    n_chars = captions["caption"].str.len().to_numpy()
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(n_words))
    ax1.scatter(n_words + jitter, n_chars, s=3, alpha=0.25)
    ax1.set(xlabel="words per caption", ylabel="characters per caption", title="Caption length")
    cut = max_len - 2
    ax2.hist(n_words, bins=np.arange(0.5, max(n_words.max(), cut) + 1.5), color="tab:blue")
    share = float((n_words > cut).mean()) if len(n_words) else 0.0
    ax2.axvline(cut + 0.5, color="tab:red", linestyle="--", label=f"max words = {cut} ({share:.1%} truncated)")
    ax2.set(xlabel="words per caption", ylabel="captions", title=f"Words per caption (n={len(n_words):,})")
    ax2.legend()
    return fig


def word_frequency_figure(captions: Iterable[str], top_k: int = 30, stopwords: Iterable[str] = (),
                          title: str = "Most frequent words") -> Figure:
    """Horizontal bar chart of the ``top_k`` most frequent words (ties alphabetical)."""
    counts = word_counts(captions, stopwords)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    fig = Figure(figsize=(7, 0.25 * max(len(top), 4) + 1.2), layout="constrained")
    ax = fig.subplots()
    words = [w for w, _ in top][::-1]
    ax.barh(words, [c for _, c in top][::-1], color="tab:green")
    ax.set(xlabel="occurrences", title=f"{title} (top {len(top)})")
    return fig


def caption_samples_figure(images: pd.DataFrame, captions: pd.DataFrame, n: int = 5, seed: int = 0,
                           split: str | None = "train") -> Figure:
    """A row of ``n`` images (seeded choice) with their captions underneath."""
    pool = images if split is None or split not in set(images["split"]) else images[images["split"] == split]
    rng = np.random.default_rng(seed)
    chosen = pool.iloc[np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    by_image = captions.groupby("image_id")["caption"].apply(list).to_dict()
    n_cols = max(len(chosen), 1)
    fig = Figure(figsize=(3.4 * n_cols, 5.6), layout="constrained")
    axes = fig.subplots(2, n_cols, squeeze=False, gridspec_kw={"height_ratios": [3, 1.6]})
    for ax in axes.ravel():
        ax.set_axis_off()
    for col, (_, row) in enumerate(chosen.iterrows()):
        with Image.open(row["image_path"]) as im:
            axes[0, col].imshow(im.convert("RGB"))
        axes[0, col].set_title(row["image_id"], fontsize=8)
        lines = [textwrap.fill(c, 40) for c in by_image.get(row["image_id"], [])]
        axes[1, col].text(0.0, 1.0, "\n".join(lines), transform=axes[1, col].transAxes,
                          va="top", ha="left", fontsize=7)
    return fig
