"""The evaluation and reporting pipelines chained through Kedro's runner: tables, figures, one offline HTML report."""

from __future__ import annotations

import re

import pandas as pd
from mlflow.tracking import MlflowClient
from test_evaluation import METHOD_ANSWERS, PREDICTIONS, write_upstream

from conftest import data_root, run_pipeline, store_uri
from llm_caption.evaluation.caption_metrics import evaluate_captions
from llm_caption.evaluation.chat_metrics import evaluate_chat

FIGURES = ("chat_loss_curves", "chat_method_bars", "caption_loss_curves", "caption_metric_bars",
           "caption_samples_grid", "attention_heatmaps")


def test_reporting_pipeline_writes_tables_figures_and_offline_report(kedro_project):
    write_upstream(kedro_project)
    reporting = data_root(kedro_project) / "08_reporting"
    # One EDA figure exists (as data_engineering would write it), the others are missing.
    (reporting / "caption_length_plot.png").write_bytes(
        (kedro_project / "data" / "01_raw" / "images" / "red_square.png").read_bytes())
    # The evaluation outputs, computed by the evaluation code (METEOR left out here: its pipeline test covers it).
    predictions = pd.read_parquet(data_root(kedro_project) / "07_model_output" / "caption_predictions.parquet")
    metrics, per_image = evaluate_captions(predictions, ["nltk_bleu", "coco_bleu", "rouge_l", "cider_d"])
    metrics.to_csv(reporting / "caption_metrics.csv", index=False)
    keys = ["architecture", "split", "image_id"]
    per_image.merge(predictions[keys + ["image_path"]], on=keys).to_parquet(reporting / "caption_per_image_scores.parquet")
    output = data_root(kedro_project) / "07_model_output"
    evaluate_chat(pd.read_csv(output / "llm_method_results.csv"), pd.read_csv(output / "llm_generations.csv")
                  ).to_csv(reporting / "chat_metrics.csv", index=False)
    run_pipeline(kedro_project, "reporting")

    chat = pd.read_csv(reporting / "chat_methods_table.csv")
    assert chat["method"].tolist()[:2] == ["lora", "prompt_tuning"]  # sorted by eval loss
    assert chat["method"].iloc[-1].startswith("base model")
    caption = pd.read_csv(reporting / "caption_models_table.csv")
    assert set(caption["architecture"]) == set(PREDICTIONS)
    assert caption[["coco_bleu_4", "nltk_bleu_4", "cider_d", "rouge_l", "params"]].notna().all().all()
    assert caption["meteor"].isna().all()  # not computed here: shown as n/a, never invented
    assert "| Method" in (reporting / "chat_methods_table.md").read_text(encoding="utf-8")
    for name in FIGURES:
        assert (reporting / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    page = (reporting / "report.html").read_text(encoding="utf-8")
    # self-contained: no external resources
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page
    images = re.findall(r'<img src="data:image/png;base64,', page)
    assert len(images) == len(FIGURES) + 1  # + the one EDA figure present
    assert page.count("not produced by this run") == 4  # the four missing EDA figures
    # numbers come from the run's datasets
    cider = caption.set_index("architecture")["cider_d"]
    best = cider.idxmax()
    assert f"highest CIDEr-D: {best} ({cider[best]:.4g})" in page
    assert "lowest eval loss on the test split: lora (1.5)" in page
    for method in METHOD_ANSWERS:
        assert method in page
    assert "Kedro environment: <b>smoke</b>" in page and "seed: <b>42</b>" in page
    assert "SPICE" in page
    assert "<tr><td>chat conversations for training</td><td>5</td></tr>" in page
    assert "<tr><td>caption vocabulary size</td><td>42</td></tr>" in page
    assert "پایتخت ایران" in page  # Persian samples are embedded
    assert "<h3>Release model</h3>" in page and "lora-release" in page and "0.97" in page

    client = MlflowClient(tracking_uri=store_uri(kedro_project))
    experiment = client.get_experiment_by_name("llm_caption")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert "report.html" in artifacts
    figures = [a.path for a in client.list_artifacts(runs[0].info.run_id, "reporting/figures")]
    assert {f"reporting/figures/{name}.png" for name in FIGURES} <= set(figures)
