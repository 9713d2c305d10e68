"""Nodes of the reporting pipeline: tables, figures and the HTML report (logic in ``llm_caption.reporting``)."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from llm_caption.reporting import html as report_html
from llm_caption.reporting import plots, tables
from llm_caption.tracking import active_run_info

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


def draw_chat_loss_curves(llm_loss_history: pd.DataFrame) -> Figure:
    """Loss curves of all chat fine-tuning methods on one figure."""
    return plots.PLOTS["chat_loss_curves"](llm_loss_history)


def draw_chat_method_bars(llm_method_results: pd.DataFrame) -> Figure:
    """Trainable parameters (log), peak memory, time and eval loss per method."""
    return plots.PLOTS["chat_method_bars"](llm_method_results)


def draw_caption_loss_curves(caption_loss_history: pd.DataFrame) -> Figure:
    """Captioning train/val loss and val BLEU-4 per epoch."""
    return plots.PLOTS["caption_loss_curves"](caption_loss_history)


def draw_caption_metric_bars(caption_metrics: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """All caption metrics per architecture on the report split."""
    return plots.PLOTS["caption_metric_bars"](caption_metrics, params["caption_split"])


def draw_caption_samples_grid(caption_predictions: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """A grid of test images with the ground truth and each model's caption."""
    return plots.PLOTS["caption_samples_grid"](caption_predictions, params["n_sample_images"], params["caption_split"])


def draw_attention_heatmaps(caption_attention_sample: dict[str, Any], params: dict[str, Any]) -> Figure:
    """Attention heatmaps, one panel per generated word."""
    return plots.PLOTS["attention_heatmaps"](caption_attention_sample, params["attention_max_words"])


def build_report(params: dict[str, Any], seed: int, chat_table: pd.DataFrame, caption_table: pd.DataFrame,
                 chat_table_html: str, caption_table_html: str, caption_metrics: pd.DataFrame,
                 caption_per_image_scores: pd.DataFrame, caption_predictions: pd.DataFrame,
                 llm_generations: pd.DataFrame, chat_data_report: dict | None, caption_data_report: dict | None,
                 llm_release_results: pd.DataFrame | None = None, **figures: bytes | None) -> str:
    """The self-contained HTML write-up of the run (``report_html``): setup, both tables, figures, samples, summary.

    ``figures`` are PNG bytes keyed by catalog name (``None``: not produced); their titles and grouping
    come from ``params['figures']``. The page's values are gathered by ``reporting.html.build_report_context``.
    """
    run_id, env = active_run_info()
    context = report_html.build_report_context(
        params, seed, run_id, env, chat_table=chat_table, caption_table=caption_table,
        chat_table_html=chat_table_html, caption_table_html=caption_table_html, caption_metrics=caption_metrics,
        caption_per_image_scores=caption_per_image_scores, caption_predictions=caption_predictions,
        llm_generations=llm_generations, chat_data_report=chat_data_report,
        caption_data_report=caption_data_report, figures=figures, llm_release_results=llm_release_results)
    page = report_html.render_report(context)
    logger.info("Report rendered: %d KB, %d figures", len(page) // 1024, len(params["figures"]))
    return page
