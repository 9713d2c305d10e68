"""Comparison tables: chat fine-tuning methods and captioning architectures.

Each table is a DataFrame (saved as CSV) plus its Markdown and HTML renderings
(:func:`render_table`). Numbers are copied from the pipeline datasets, never typed in.
"""

from __future__ import annotations

import math
import numbers

import pandas as pd

# Column in the chat table -> (source table, source column, heading).
CHAT_COLUMNS: dict[str, str] = {
    "method": "Method",
    "status": "Status",
    "trainable_params": "Trainable params",
    "trainable_pct": "Trainable %",
    "peak_memory_mb": "Peak memory (MB)",
    "train_steps": "Steps",
    "train_time_s": "Train time (s)",
    "tokens_per_s": "Tokens/s",
    "eval_loss": "Eval loss",
    "perplexity": "Perplexity",
    "bits_per_char": "Bits/char",
    "dev_bits_per_char": "Bits/char (dev)",
    "chrf_pp": "chrF++",
    "n_test_answers": "Test answers",
    "ended_rate": "Ended",
    "answer_chars": "Answer chars",
    "chrf": "chrF",
    "rouge_l": "ROUGE-L",
    "persian_share": "Persian share",
    "distinct_2": "Distinct-2",
    "repetition_rate": "Repetition",
    "answer_length": "Answer length",
}

#: llm_release_results: the untuned model, the study champion and the release model on every test question.
RELEASE_COLUMNS: dict[str, str] = {
    "role": "Model",
    "method": "Method",
    "train_steps": "Steps",
    "train_time_s": "Train time (s)",
    "bits_per_char": "Bits/char",
    "dev_bits_per_char": "Bits/char (dev)",
    "chrf_pp": "chrF++",
    "test_persian_share": "Persian share",
    "ended_rate": "Ended",
    "answer_chars": "Answer chars",
    "n_test_answers": "Test answers",
}

#: Method name of the row that describes the base model before any training.
BASE_ROW = "base model (before training)"

CAPTION_COLUMNS: dict[str, str] = {
    "architecture": "Architecture",
    "params": "Params",
    "epochs_run": "Epochs",
    "train_time_s": "Train time (s)",
    "epoch_time_cached_s": "Epoch time, cached (s)",
    "final_val_loss": "Final val loss",
    "nltk_bleu_1": "BLEU-1 (nltk)",
    "nltk_bleu_2": "BLEU-2 (nltk)",
    "nltk_bleu_3": "BLEU-3 (nltk)",
    "nltk_bleu_4": "BLEU-4 (nltk)",
    "coco_bleu_1": "BLEU-1 (coco)",
    "coco_bleu_2": "BLEU-2 (coco)",
    "coco_bleu_3": "BLEU-3 (coco)",
    "coco_bleu_4": "BLEU-4 (coco)",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider_d": "CIDEr-D",
    "distinct_captions": "Distinct captions / image",
    "vocab_used": "Words used",
}


def chat_methods_table(method_results: pd.DataFrame, chat_metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per fine-tuning method (test split), fewest bits per character first (eval loss for older results).

    When no method row describes the untrained model (``trainable_params == 0``), the answers of the
    ``before`` stage are added as a last reference row.
    """
    after = chat_metrics[chat_metrics["stage"] == "after"].drop(columns=["stage", "eval_loss", "perplexity"],
                                                                 errors="ignore")
    results = method_results.drop(columns=["persian_share"], errors="ignore")
    table = results.merge(after, on="method", how="left", validate="one_to_one")
    if "perplexity" not in table.columns or table["perplexity"].isna().all():
        table["perplexity"] = table["eval_loss"].map(lambda v: math.exp(v) if pd.notna(v) else float("nan"))
    table = table.sort_values("bits_per_char" if "bits_per_char" in table.columns else "eval_loss", kind="stable")
    before = chat_metrics[chat_metrics["stage"] == "before"]
    has_untrained_row = bool((pd.to_numeric(table.get("trainable_params"), errors="coerce") == 0).any())
    if not before.empty and not has_untrained_row:
        # The base model answers the same prompts before any training: one reference row.
        base = before.drop(columns=["stage"]).mean(numeric_only=True).to_dict()
        base["method"] = BASE_ROW
        table = pd.concat([table, pd.DataFrame([base])], ignore_index=True)
    return table.reindex(columns=list(CHAT_COLUMNS)).reset_index(drop=True)


def caption_models_table(model_results: pd.DataFrame, caption_metrics: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per captioning architecture: size, time and every metric on ``split``, best CIDEr-D first."""
    on_split = caption_metrics[caption_metrics["split"] == split]
    if on_split.empty:
        raise ValueError(f"caption_metrics has no rows for split {split!r}; splits: {sorted(caption_metrics['split'].unique())}")
    wide = on_split.pivot_table(index="architecture", columns="metric", values="value", aggfunc="first",
                                dropna=False).reset_index()
    wide.columns.name = None
    table = model_results.merge(wide, on="architecture", how="left", validate="one_to_one")
    if "cider_d" in table.columns:
        table = table.sort_values("cider_d", ascending=False, kind="stable")
    return table.reindex(columns=list(CAPTION_COLUMNS)).reset_index(drop=True)


def _format_value(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def render_table(table: pd.DataFrame, headings: dict[str, str]) -> tuple[str, str]:
    """Markdown and HTML renderings of ``table`` with readable headings and formatted numbers (n/a for missing)."""
    shown = table.rename(columns=headings)
    shown = shown.apply(lambda col: col.map(_format_value))
    markdown = shown.to_markdown(index=False)
    html = shown.to_html(index=False, classes="table", border=0, escape=True)
    return markdown, html
