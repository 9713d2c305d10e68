"""Comparison tables, the summary lines and the HTML rendering, on small real tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from llm_caption.reporting import html, tables

RESULTS = pd.DataFrame({"method": ["lora", "prefix_tuning"], "trainable_params": [460_800, 30_720],
                        "total_params": [134_975_808] * 2, "trainable_pct": [0.34, 0.023],
                        "peak_memory_mb": [950.5, 820.0], "train_time_s": [40.2, 35.1], "step_time_s": [2.3, 2.0],
                        "tokens_per_s": [220.0, 250.0], "eval_loss": [2.1, 2.9], "perplexity": [math.exp(2.1), math.exp(2.9)],
                        "persian_share": [0.9, 0.4], "mlflow_run_id": ["a", "b"], "adapter_dir": ["x", "y"]})
CHAT = pd.DataFrame({"method": ["lora", "prefix_tuning", "lora"], "stage": ["after", "after", "before"],
                     "n_answers": [3, 3, 3], "eval_loss": [2.1, 2.9, float("nan")],
                     "perplexity": [math.exp(2.1), math.exp(2.9), float("nan")], "chrf": [30.5, 12.0, 3.0],
                     "rouge_l": [0.3, 0.1, 0.0], "persian_share": [0.95, 0.5, 0.0], "distinct_1": [0.8, 0.5, 0.9],
                     "distinct_2": [0.9, 0.6, 0.95], "repetition_rate": [0.0, 0.4, 0.0], "answer_length": [9, 20, 12]})
CAPTION_RESULTS = pd.DataFrame({"architecture": ["show_tell", "transformer"], "params": [2_000_000, 3_500_000],
                                "epochs_run": [3, 3], "epoch_time_cached_s": [1.0, 1.4], "train_time_s": [3.1, 4.4],
                                "final_val_loss": [3.2, 3.0]})
CAPTION_METRICS = pd.DataFrame(
    [{"architecture": a, "split": s, "metric": m, "value": v, "implementation": "impl"}
     for a, base in (("show_tell", 0.1), ("transformer", 0.2)) for s in ("val", "test")
     for m, v in (("nltk_bleu_4", base), ("coco_bleu_4", base / 2), ("cider_d", base * 3), ("rouge_l", base * 2),
                  ("meteor", float("nan")))])


def test_chat_table_sorted_by_eval_loss_with_base_row():
    table = tables.chat_methods_table(RESULTS, CHAT)
    assert table["method"].tolist() == ["lora", "prefix_tuning", tables.BASE_ROW]
    assert list(table.columns) == list(tables.CHAT_COLUMNS)
    assert table.loc[0, "chrf"] == 30.5 and table.loc[0, "persian_share"] == 0.95  # answers' share, not training's
    assert math.isnan(table.loc[2, "eval_loss"])


def test_caption_table_uses_the_requested_split_and_keeps_missing_as_nan():
    table = tables.caption_models_table(CAPTION_RESULTS, CAPTION_METRICS, "test")
    assert table["architecture"].tolist() == ["transformer", "show_tell"]  # best CIDEr-D first
    assert table.loc[0, "cider_d"] == pytest.approx(0.6) and table["meteor"].isna().all()
    markdown, page = tables.render_table(table, tables.CAPTION_COLUMNS)
    assert "| Architecture" in markdown and "3,500,000" in markdown and "n/a" in markdown
    assert "<table" in page and "CIDEr-D" in page
    with pytest.raises(ValueError, match="no rows for split 'train'"):
        tables.caption_models_table(CAPTION_RESULTS, CAPTION_METRICS, "train")


def test_winners_name_the_best_row_per_criterion():
    chat = tables.chat_methods_table(RESULTS, CHAT)
    lines = html.winners(chat, "method", html.CHAT_CRITERIA, exclude=[tables.BASE_ROW])
    assert "lowest eval loss on the test split: lora (2.1)" in lines
    assert "fewest trainable parameters: prefix_tuning (30,720)" in lines
    caption = tables.caption_models_table(CAPTION_RESULTS, CAPTION_METRICS, "test")
    lines = html.winners(caption, "architecture", html.CAPTION_CRITERIA)
    assert "highest CIDEr-D: transformer (0.6)" in lines
    assert not any("METEOR" in line for line in lines)  # no data, no claim


def test_winners_report_ties_as_ties():
    table = pd.DataFrame({"method": ["a", "b", "c"], "chrf": [5.0, 5.0, 1.0], "rouge_l": [0.0, 0.0, 0.0]})
    lines = html.winners(table, "method", [html.Criterion("best chrF", "chrf", True),
                                           html.Criterion("best ROUGE-L", "rouge_l", True)])
    assert lines == ["best chrF: a, b (5)", "best ROUGE-L: all 3 tied at 0"]


def test_lookup_follows_dotted_keys():
    report = {"counts": {"train": 4}, "vocab_size": 9}
    assert html.lookup(report, "counts.train") == 4 and html.lookup(report, "vocab_size") == 9
    assert html.lookup(report, "counts.test") is None and html.lookup(None, "x") is None


def test_render_report_escapes_text_and_embeds_images():
    png = b"\x89PNG\r\n\x1a\nfake"
    context = {
        "title": "<Study>", "generated_at": "now", "environment": "smoke", "seed": 7, "mlflow_run_id": "r",
        "sizes": [("images", "5")], "chat_data_rows": html.flatten_report({"counts": {"train": 4, "test": 2}}),
        "caption_data_rows": [], "chat_summary": ["x"], "caption_summary": [], "caption_split": "test",
        "chat_table_html": "<table class='table'></table>", "caption_table_html": "",
        "release_table_html": "<table class='release'></table>",
        "chat_figures": [{"title": "loss", "uri": html.png_data_uri(png)}],
        "caption_figures": [{"title": "bars", "uri": None}], "eda_figures": [],
        "chat_samples": [{"method": "lora", "stage": "after", "prompt": "سلام", "answer": "<b>hi</b>", "reference": "r"}],
        "best_worst_arch": None, "best_worst": {}, "implementations": [("cider_d", "pycocoevalcap")], "notes": ["n1"],
    }
    page = html.render_report(context)
    assert "&lt;Study&gt;" in page and "&lt;b&gt;hi&lt;/b&gt;" in page
    assert 'src="data:image/png;base64,iVBORw0KGgpmYWtl"' in page
    assert "bars: not produced by this run." in page
    assert "counts.train" in page and "سلام" in page
    assert "<h3>Release model</h3>" in page and "<table class='release'></table>" in page
    page = html.render_report({**context, "release_table_html": ""})
    assert "Release model" not in page


def test_best_and_worst_by_per_image_cider():
    per_image = pd.DataFrame({"architecture": ["a"] * 4, "split": ["test"] * 4, "image_id": list("wxyz"),
                              "prediction": list("pqrs"), "references": [["ref"]] * 4, "cider_d": [0.1, 2.0, 0.5, 0.0]})
    cases = html.best_and_worst(per_image, "a", k=2)
    assert [c["image_id"] for c in cases["best"]] == ["x", "y"]
    assert [c["image_id"] for c in cases["worst"]] == ["z", "w"]
