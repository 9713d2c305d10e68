"""Each study figure draws from small real tables and images into a PNG."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from llm_caption.reporting import plots
from llm_caption.reporting.datasets import FigurePNGDataset


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:, :30] = (200, 40, 40)
    Image.fromarray(array).save(path)
    return str(path)


def _png_size(fig) -> tuple[int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).size


def test_all_figures_draw(photo):
    history = pd.DataFrame({"method": ["lora"] * 3 + ["dora"] * 3, "step": [1, 2, 2] * 2,
                            "split": ["train", "train", "eval"] * 2, "loss": [3, 2, 2.2, 3.1, 2.5, 2.4]})
    results = pd.DataFrame({"method": ["lora", "dora"], "trainable_params": [1e5, 1.1e5], "peak_memory_mb": [900, 950],
                            "train_time_s": [30, 40], "eval_loss": [2.2, 2.4]})
    caption_history = pd.DataFrame({"architecture": ["st", "st"], "epoch": [1, 2], "train_loss": [4, 3],
                                    "val_loss": [4.2, 3.5], "val_bleu4": [0.01, 0.03], "lr": [1e-3, 1e-3]})
    metrics = pd.DataFrame({"architecture": ["st", "st"], "split": ["test", "test"], "metric": ["coco_bleu_4", "cider_d"],
                            "value": [0.1, 0.4], "implementation": ["x", "y"]})
    predictions = pd.DataFrame({"architecture": ["st"], "split": ["test"], "image_id": ["photo.png"],
                                "image_path": [photo], "prediction": ["a red wall"], "references": [["a red and black picture"]]})
    attention = {"image_path": photo, "words": ["a", "red", "wall"], "alphas": np.random.default_rng(0).random((3, 7, 7))}
    figures = {
        "chat_loss_curves": plots.chat_loss_curves(history),
        "chat_method_bars": plots.chat_method_bars(results),
        "caption_loss_curves": plots.caption_loss_curves(caption_history),
        "caption_metric_bars": plots.caption_metric_bars(metrics),
        "caption_samples_grid": plots.caption_samples_grid(predictions),
        "attention_heatmaps": plots.attention_heatmaps(attention),
    }
    assert set(figures) == set(plots.PLOTS)
    for name, fig in figures.items():
        width, height = _png_size(fig)
        assert width > 300 and height > 200, name
    assert len(figures["attention_heatmaps"].axes) == 4  # image + one panel per word


def test_attention_mismatch_and_missing_image_are_clear_errors(photo):
    with pytest.raises(ValueError, match="3 words but 2 attention maps"):
        plots.attention_heatmaps({"image_path": photo, "words": ["a", "b", "c"], "alphas": np.ones((2, 7, 7))})
    with pytest.raises(FileNotFoundError, match="nope.png"):
        plots.attention_heatmaps({"image_path": "nope.png", "words": ["a"], "alphas": np.ones((1, 7, 7))})


def test_figure_dataset_round_trip_and_optional_missing(tmp_path):
    dataset = FigurePNGDataset(filepath=str(tmp_path / "fig.png"))
    dataset.save(plots.caption_metric_bars(pd.DataFrame(columns=["architecture", "split", "metric", "value"])))
    assert dataset.load()[:4] == b"\x89PNG"
    assert FigurePNGDataset(filepath=str(tmp_path / "absent.png"), allow_missing=True).load() is None
    with pytest.raises(Exception, match="absent.png"):
        FigurePNGDataset(filepath=str(tmp_path / "absent.png")).load()
