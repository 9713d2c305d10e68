"""The study's figures, each a function from pipeline datasets to a matplotlib ``Figure``.

Figures are built on ``matplotlib.figure.Figure`` objects (no pyplot global state) and styled
with seaborn. :data:`PLOTS` maps each figure's name to its builder.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from PIL import Image

_PALETTE = "tab10"


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, width_ratios=None):
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, width_ratios=width_ratios)
    return fig, axes


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no data: {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def chat_loss_curves(loss_history: pd.DataFrame) -> Figure:
    """Train and eval loss of every fine-tuning method over optimizer steps, on one figure."""
    fig, axes = _figure(9, 5)
    ax = axes[0, 0]
    if loss_history.empty:
        _no_data(ax, "llm_loss_history")
        return fig
    sns.lineplot(data=loss_history, x="step", y="loss", hue="method", style="split", markers=True,
                 dashes={"train": "", "eval": (4, 2)} if set(loss_history["split"]) <= {"train", "eval"} else True,
                 palette=_PALETTE, ax=ax)
    losses = loss_history["loss"].dropna()
    if len(losses) and losses.min() > 0 and losses.max() / losses.min() > 4:
        ax.set_yscale("log")  # one diverging method would flatten all other curves
    ax.set_title("Chat fine-tuning: loss per step (solid: train, dashed: eval)")
    ax.set_xlabel("optimizer step")
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    return fig


def chat_method_bars(method_results: pd.DataFrame) -> Figure:
    """Four bar charts per method: trainable parameters (log scale), peak memory, training time, eval loss."""
    panels = [("trainable_params", "trainable parameters (log scale)", True),
              ("peak_memory_mb", "peak memory (MB)", False),
              ("train_time_s", "training time (s)", False),
              ("eval_loss", "eval loss, test split (lower is better)", False)]
    fig, axes = _figure(12, 8, 2, 2)
    order = method_results.sort_values("eval_loss")["method"].tolist()
    for ax, (column, title, log) in zip(axes.flat, panels):
        if column not in method_results.columns or method_results[column].isna().all():
            _no_data(ax, column)
            continue
        sns.barplot(data=method_results, x="method", y=column, order=order, hue="method", palette=_PALETTE,
                    legend=False, ax=ax)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=35)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle("Chat fine-tuning methods: cost and result")
    return fig


def caption_loss_curves(loss_history: pd.DataFrame) -> Figure:
    """Train and validation loss per epoch of every captioning architecture, and validation BLEU-4."""
    fig, axes = _figure(13, 4.5, 1, 3)
    if loss_history.empty:
        _no_data(axes[0, 0], "caption_loss_history")
        return fig
    for ax, column, title in zip(axes.flat, ("train_loss", "val_loss", "val_bleu4"),
                                 ("train loss", "validation loss", "validation BLEU-4")):
        if column not in loss_history.columns or loss_history[column].isna().all():
            _no_data(ax, column)
            continue
        sns.lineplot(data=loss_history, x="epoch", y=column, hue="architecture", marker="o", palette=_PALETTE, ax=ax)
        ax.set_title(title)
    fig.suptitle("Captioning: learning curves")
    return fig


def caption_metric_bars(caption_metrics: pd.DataFrame, split: str = "test") -> Figure:
    """Every caption metric on ``split`` per architecture (CIDEr-D on its own axis: a different scale)."""
    data = caption_metrics[(caption_metrics["split"] == split) & caption_metrics["value"].notna()]
    fig, axes = _figure(13, 4.5, 1, 2)
    fig.get_layout_engine().set(wspace=0.05)
    left, right = axes[0, 0], axes[0, 1]
    small = data[~data["metric"].isin(["cider_d", "distinct_captions", "vocab_used"])]  # diversity: another scale
    cider = data[data["metric"] == "cider_d"]
    if small.empty:
        _no_data(left, f"caption metrics on {split}")
    else:
        sns.barplot(data=small, x="metric", y="value", hue="architecture", palette=_PALETTE, ax=left)
        left.set_title(f"BLEU / METEOR / ROUGE-L on {split}")
        left.tick_params(axis="x", rotation=35)
    if cider.empty:
        _no_data(right, "CIDEr-D")
    else:
        sns.barplot(data=cider, x="architecture", y="value", hue="architecture", palette=_PALETTE, legend=False, ax=right)
        right.set_title(f"CIDEr-D on {split}")
    return fig


def _load_image(path: str, max_side: int = 320) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side))
            return np.asarray(image)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"Cannot read image {path!r} for the report: {err}") from err


def caption_samples_grid(predictions: pd.DataFrame, n_images: int = 5, split: str = "test") -> Figure:
    """``n_images`` test images (first image ids in sorted order), one row each: the image, a ground-truth
    caption and each model's caption."""
    data = predictions[predictions["split"] == split]
    image_ids = sorted(data["image_id"].unique())[:n_images]
    rows = max(len(image_ids), 1)
    fig, axes = _figure(11, 2.3 * rows, rows, 2, width_ratios=[1, 3])
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.05)
    if not image_ids:
        _no_data(axes[0, 0], f"predictions on {split}")
        axes[0, 1].set_axis_off()
        return fig
    architectures = sorted(data["architecture"].unique())
    for (image_ax, text_ax), image_id in zip(axes, image_ids):
        rows_of_image = data[data["image_id"] == image_id]
        first = rows_of_image.iloc[0]
        image_ax.imshow(_load_image(first["image_path"]))
        image_ax.set_title(str(image_id), fontsize=9)
        lines = ["ground truth: " + textwrap.shorten(str(list(first["references"])[0]), 80)]
        for arch in architectures:
            pred = rows_of_image.loc[rows_of_image["architecture"] == arch, "prediction"]
            lines.append(f"{arch}: " + textwrap.shorten(str(pred.iloc[0]) if len(pred) else "(none)", 80))
        text_ax.text(0.0, 0.5, "\n\n".join(lines), transform=text_ax.transAxes, va="center", ha="left", fontsize=11)
        image_ax.set_axis_off()
        text_ax.set_axis_off()
    fig.suptitle(f"Sample captions on the {split} split: ground truth and each model")
    return fig


def attention_heatmaps(sample: Mapping[str, Any], max_words: int = 12) -> Figure:
    """One panel per generated word: the soft-attention map over the image (``show_attend_tell``)."""
    words = list(sample.get("words", []))[:max_words]
    alphas = np.asarray(sample.get("alphas", np.zeros((0, 1, 1))), dtype=float)
    if alphas.ndim != 3 or len(words) == 0:
        fig, axes = _figure(6, 3)
        _no_data(axes[0, 0], "attention sample")
        return fig
    if alphas.shape[0] < len(words):
        raise ValueError(f"attention sample has {len(words)} words but {alphas.shape[0]} attention maps")
    image = _load_image(sample["image_path"], max_side=256)
    height, width = image.shape[:2]
    cols = min(4, len(words) + 1)
    rows = math.ceil((len(words) + 1) / cols)
    fig, axes = _figure(3 * cols, 3 * rows, rows, cols)
    flat = list(axes.flat)
    flat[0].imshow(image)
    flat[0].set_title("image")
    for ax, word, alpha in zip(flat[1:], words, alphas):
        heat = Image.fromarray((alpha / (alpha.max() or 1.0) * 255).astype(np.uint8)).resize((width, height),
                                                                                          Image.BILINEAR)
        ax.imshow(image)
        ax.imshow(np.asarray(heat), cmap="magma", alpha=0.6)
        ax.set_title(word)
    for ax in flat:
        ax.set_axis_off()
    fig.suptitle("Show, Attend and Tell: where the model looks for each word")
    return fig


#: Figure name -> builder (the reporting pipeline wires one node per entry).
PLOTS: dict[str, Callable[..., Figure]] = {
    "chat_loss_curves": chat_loss_curves,
    "chat_method_bars": chat_method_bars,
    "caption_loss_curves": caption_loss_curves,
    "caption_metric_bars": caption_metric_bars,
    "caption_samples_grid": caption_samples_grid,
    "attention_heatmaps": attention_heatmaps,
}
