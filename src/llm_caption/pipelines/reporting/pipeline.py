"""The reporting pipeline: comparison tables, figures and the self-contained HTML report.

A new figure: a drawing function in ``reporting/plots.py``, a node below whose output ends in ``_plot``
(the catalog's ``"{name}_plot"`` factory stores it), and its title in ``parameters_reporting.yml``
(``reporting.figures``); see docs/architecture.md.
"""

from kedro.pipeline import Pipeline, node

from .nodes import (build_report, draw_attention_heatmaps, draw_caption_loss_curves, draw_caption_metric_bars,
                    draw_caption_samples_grid, draw_chat_loss_curves, draw_chat_method_bars, make_caption_table,
                    make_chat_table)

# data_engineering's EDA figures, read back as PNG through the catalog's "report_eda_{name}" factory.
EDA_FIGURES = ("report_eda_chat_token_length_histogram", "report_eda_caption_length_plot",
               "report_eda_caption_word_freq_plot", "report_eda_caption_word_freq_nostop_plot",
               "report_eda_caption_samples_plot")
FIGURES = ("chat_loss_curves_plot", "chat_method_bars_plot", "caption_loss_curves_plot", "caption_metric_bars_plot",
           "caption_samples_grid_plot", "attention_heatmaps_plot")


def create_pipeline(**kwargs) -> Pipeline:
    report_inputs = {
        "params": "params:reporting", "seed": "params:seed",
        "chat_table": "chat_methods_table", "caption_table": "caption_models_table",
        "chat_table_html": "chat_methods_table_html", "caption_table_html": "caption_models_table_html",
        "caption_metrics": "caption_metrics", "caption_per_image_scores": "caption_per_image_scores",
        "caption_predictions": "caption_predictions", "llm_generations": "llm_generations",
        "chat_data_report": "chat_data_report", "caption_data_report": "caption_data_report",
        "llm_release_results": "llm_release_results",
        **{name: name for name in FIGURES + EDA_FIGURES},
    }
    return Pipeline([
        node(make_chat_table, ["llm_method_results", "chat_metrics"],
             ["chat_methods_table", "chat_methods_table_md", "chat_methods_table_html"], name="make_chat_table"),
        node(make_caption_table, ["caption_model_results", "caption_metrics", "params:reporting"],
             ["caption_models_table", "caption_models_table_md", "caption_models_table_html"],
             name="make_caption_table"),
        node(draw_chat_loss_curves, "llm_loss_history", "chat_loss_curves_plot", name="draw_chat_loss_curves"),
        node(draw_chat_method_bars, "llm_method_results", "chat_method_bars_plot", name="draw_chat_method_bars"),
        node(draw_caption_loss_curves, "caption_loss_history", "caption_loss_curves_plot",
             name="draw_caption_loss_curves"),
        node(draw_caption_metric_bars, ["caption_metrics", "params:reporting"], "caption_metric_bars_plot",
             name="draw_caption_metric_bars"),
        node(draw_caption_samples_grid, ["caption_predictions", "params:reporting"], "caption_samples_grid_plot",
             name="draw_caption_samples_grid"),
        node(draw_attention_heatmaps, ["caption_attention_sample", "params:reporting"], "attention_heatmaps_plot",
             name="draw_attention_heatmaps"),
        node(build_report, report_inputs, "report_html", name="build_report"),
    ])
