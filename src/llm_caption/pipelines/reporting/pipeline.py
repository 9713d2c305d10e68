"""The reporting pipeline: comparison tables, figures and the self-contained HTML report."""

from kedro.pipeline import Pipeline, node

from . import nodes

# Figure datasets drawn by this pipeline -> (node function, extra inputs).
_FIGURE_NODES = {
    "chat_loss_curves_plot": (nodes.plot_chat_loss_curves, ["llm_loss_history"]),
    "chat_method_bars_plot": (nodes.plot_chat_method_bars, ["llm_method_results"]),
    "caption_loss_curves_plot": (nodes.plot_caption_loss_curves, ["caption_loss_history"]),
    "caption_metric_bars_plot": (nodes.plot_caption_metric_bars, ["caption_metrics", "params:reporting"]),
    "caption_samples_grid_plot": (nodes.plot_caption_samples, ["caption_predictions", "params:reporting"]),
    "attention_heatmaps_plot": (nodes.plot_attention, ["caption_attention_sample", "params:reporting"]),
}

# The data_engineering EDA figures, read back as PNG (catalog_reporting.yml: report_eda_* entries).
EDA_FIGURES = (
    "report_eda_chat_token_length_histogram",
    "report_eda_caption_length_plot",
    "report_eda_caption_word_freq_plot",
    "report_eda_caption_word_freq_nostop_plot",
    "report_eda_caption_samples_plot",
)


def create_pipeline(**kwargs) -> Pipeline:
    figure_nodes = [node(func, inputs, output, name=f"draw_{output.removesuffix('_plot')}")
                    for output, (func, inputs) in _FIGURE_NODES.items()]
    report_inputs = {
        "params": "params:reporting", "seed": "params:seed",
        "chat_table": "chat_methods_table", "caption_table": "caption_models_table",
        "chat_table_html": "chat_methods_table_html", "caption_table_html": "caption_models_table_html",
        "caption_metrics": "caption_metrics", "caption_per_image_scores": "caption_per_image_scores",
        "caption_predictions": "caption_predictions", "llm_generations": "llm_generations",
        "chat_data_report": "chat_data_report", "caption_data_report": "caption_data_report",
        **{name: name for name in _FIGURE_NODES},
        **{name: name for name in EDA_FIGURES},
    }
    return Pipeline([
        node(nodes.make_chat_table, ["llm_method_results", "chat_metrics"],
             ["chat_methods_table", "chat_methods_table_md", "chat_methods_table_html"], name="make_chat_table"),
        node(nodes.make_caption_table, ["caption_model_results", "caption_metrics", "params:reporting"],
             ["caption_models_table", "caption_models_table_md", "caption_models_table_html"],
             name="make_caption_table"),
        *figure_nodes,
        node(nodes.build_report, report_inputs, "report_html", name="build_report"),
    ])
