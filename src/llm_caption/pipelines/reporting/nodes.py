"""Nodes of the reporting pipeline: tables, figures and the HTML report (logic in ``llm_caption.reporting``)."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from llm_caption.reporting import html as report_html
from llm_caption.reporting import plots, tables

logger = logging.getLogger(__name__)


def make_chat_table(llm_method_results: pd.DataFrame, chat_metrics: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """Chat methods comparison table as CSV data, Markdown and HTML."""
    table = tables.chat_methods_table(llm_method_results, chat_metrics)
    markdown, html = tables.render_table(table, tables.CHAT_COLUMNS)
    return table, markdown, html


def make_caption_table(caption_model_results: pd.DataFrame, caption_metrics: pd.DataFrame,
                       params: dict[str, Any]) -> tuple[pd.DataFrame, str, str]:
    """Captioning architectures comparison table (metrics on ``params['caption_split']``) as CSV, Markdown, HTML."""
    table = tables.caption_models_table(caption_model_results, caption_metrics, params["caption_split"])
    markdown, html = tables.render_table(table, tables.CAPTION_COLUMNS)
    return table, markdown, html


def plot_chat_loss_curves(llm_loss_history: pd.DataFrame) -> Figure:
    """Loss curves of all chat fine-tuning methods on one figure."""
    return plots.PLOTS["chat_loss_curves"](llm_loss_history)


def plot_chat_method_bars(llm_method_results: pd.DataFrame) -> Figure:
    """Trainable parameters (log), peak memory, time and eval loss per method."""
    return plots.PLOTS["chat_method_bars"](llm_method_results)


def plot_caption_loss_curves(caption_loss_history: pd.DataFrame) -> Figure:
    """Captioning train/val loss and val BLEU-4 per epoch."""
    return plots.PLOTS["caption_loss_curves"](caption_loss_history)


def plot_caption_metric_bars(caption_metrics: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """All caption metrics per architecture on the report split."""
    return plots.PLOTS["caption_metric_bars"](caption_metrics, params["caption_split"])


def plot_caption_samples(caption_predictions: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """A grid of test images with the ground truth and each model's caption."""
    return plots.PLOTS["caption_samples_grid"](caption_predictions, params["n_sample_images"], params["caption_split"])


def plot_attention(caption_attention_sample: dict[str, Any], params: dict[str, Any]) -> Figure:
    """Attention heatmaps, one panel per generated word."""
    return plots.PLOTS["attention_heatmaps"](caption_attention_sample, params["attention_max_words"])


def _run_info() -> tuple[str, str | None]:
    """(MLflow run id, Kedro environment tag) of the active run; placeholders outside an MLflow run."""
    run = mlflow.active_run()
    if run is None:
        return "none (no active MLflow run)", None
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    return run.info.run_id, tags.get("env")


def _chat_samples(generations: pd.DataFrame, per_method: int) -> list[dict[str, str]]:
    test = generations[generations["prompt_kind"] == "test"].fillna({"answer": "", "reference": "", "prompt": ""})
    test = test.sort_values(["stage", "method"], kind="stable")
    samples = []
    before = test[test["stage"] == "before"]
    if not before.empty:
        first = before.groupby("prompt", sort=False).head(1).head(per_method)
        samples += [{"method": "base model", "stage": "before", "prompt": str(r.prompt),
                     "answer": str(r.answer), "reference": str(r.reference)} for r in first.itertuples()]
    for method, group in test[test["stage"] == "after"].groupby("method", sort=True):
        samples += [{"method": str(method), "stage": "after", "prompt": str(r.prompt), "answer": str(r.answer),
                     "reference": str(r.reference)} for r in group.head(per_method).itertuples()]
    return samples


def build_report(params: dict[str, Any], seed: int, chat_table: pd.DataFrame, caption_table: pd.DataFrame,
                 chat_table_html: str, caption_table_html: str, caption_metrics: pd.DataFrame,
                 caption_per_image_scores: pd.DataFrame, caption_predictions: pd.DataFrame,
                 llm_generations: pd.DataFrame, chat_data_report: dict | None, caption_data_report: dict | None,
                 **figures: bytes | None) -> str:
    """The self-contained HTML write-up of the run: setup, both tables, figures, samples, summary.

    ``figures`` are PNG bytes keyed by catalog name (``None``: not produced); their titles
    and grouping come from ``params['figures']``.
    """
    run_id, env = _run_info()
    # Rows without trainable parameters (the untouched base model) are references, not contenders.
    untrained = chat_table.loc[pd.to_numeric(chat_table["trainable_params"], errors="coerce") == 0, "method"].tolist()
    split = params["caption_split"]
    answers_per_method = llm_generations[(llm_generations["prompt_kind"] == "test")
                                         & (llm_generations["stage"] == "after")].groupby("method").size()
    test_preds = caption_predictions[caption_predictions["split"] == split]
    sizes = [
        ("chat fine-tuning methods (without the untrained base model)",
         int((~chat_table["method"].isin([tables.BASE_ROW, *untrained])).sum())),
        ("chat test answers scored per method", int(answers_per_method.max()) if len(answers_per_method) else 0),
        ("captioning architectures", len(caption_table)),
        *[(f"caption {s} images scored", int(caption_predictions[caption_predictions["split"] == s]["image_id"].nunique()))
          for s in sorted(caption_predictions["split"].unique())],
        (f"reference captions per {split} image (mean)",
         report_html.fmt(float(test_preds["references"].map(len).mean())) if len(test_preds) else "n/a"),
    ]
    reports = {"chat_data_report": chat_data_report, "caption_data_report": caption_data_report}
    for entry in params.get("data_sizes", []):
        value = report_html.lookup(reports.get(entry["report"]), entry["key"])
        sizes.append((entry["label"], "n/a (not in " + entry["report"] + ")" if value is None else value))
    sections: dict[str, list[dict[str, Any]]] = {"chat": [], "caption": [], "eda": []}
    for name, spec in params["figures"].items():
        if name not in figures:
            raise KeyError(f"reporting.figures names {name!r}, which is not an input of build_report")
        sections[spec["section"]].append({"title": spec["title"], "uri": report_html.png_data_uri(figures[name])})
    best_arch = str(caption_table.iloc[0]["architecture"]) if len(caption_table) else None
    implementations = (caption_metrics[["metric", "implementation"]].drop_duplicates("metric")
                       .sort_values("metric").itertuples(index=False, name=None))
    notes = list(params.get("notes", []))
    missing = caption_metrics[caption_metrics["value"].isna()]
    for row in missing.drop_duplicates("metric").itertuples():
        notes.append(f"{row.metric} was not computed in this run ({row.implementation}).")
    context = {
        "title": params["title"], "generated_at": report_html.generated_at(),
        "environment": env or params.get("default_environment_label", "local"), "seed": seed,
        "mlflow_run_id": run_id, "sizes": [(k, report_html.fmt(v)) for k, v in sizes],
        "chat_data_rows": report_html.flatten_report(chat_data_report),
        "caption_data_rows": report_html.flatten_report(caption_data_report),
        "chat_summary": report_html.winners(chat_table, "method", report_html.CHAT_CRITERIA,
                                            exclude=[tables.BASE_ROW, *untrained]),
        "caption_summary": report_html.winners(caption_table, "architecture", report_html.CAPTION_CRITERIA),
        "caption_split": split, "chat_table_html": chat_table_html, "caption_table_html": caption_table_html,
        "chat_figures": sections["chat"], "caption_figures": sections["caption"], "eda_figures": sections["eda"],
        "chat_samples": _chat_samples(llm_generations, params["n_chat_samples"]),
        "best_worst_arch": best_arch,
        "best_worst": report_html.best_and_worst(caption_per_image_scores, best_arch, split) if best_arch else {},
        "implementations": list(implementations), "notes": notes,
    }
    page = report_html.render_report(context)
    logger.info("Report rendered: %d KB, %d figures", len(page) // 1024, sum(len(v) for v in sections.values()))
    return page
