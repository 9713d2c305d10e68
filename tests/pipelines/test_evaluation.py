"""The evaluation pipeline through Kedro's runner, on upstream datasets written to their contract paths.

``write_upstream`` writes small but real upstream outputs (docs/datasets.md) into a project
copy: Pillow images, English captions, Persian answers, and MLflow runs for each model, so
that the evaluation and reporting pipelines can run without training anything.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import data_root, run_pipeline, store_uri

# Where each upstream dataset lives (docs/datasets.md); used only when no catalog declares it yet.
UPSTREAM = {
    "caption_predictions": ("pandas.ParquetDataset", "data/smoke/07_model_output/caption_predictions.parquet"),
    "caption_model_results": ("pandas.CSVDataset", "data/smoke/07_model_output/caption_model_results.csv"),
    "caption_loss_history": ("pandas.CSVDataset", "data/smoke/07_model_output/caption_loss_history.csv"),
    "caption_attention_sample": ("pickle.PickleDataset", "data/smoke/07_model_output/caption_attention_sample.pkl"),
    "llm_method_results": ("pandas.CSVDataset", "data/smoke/07_model_output/llm_method_results.csv"),
    "llm_loss_history": ("pandas.CSVDataset", "data/smoke/07_model_output/llm_loss_history.csv"),
    "llm_generations": ("pandas.CSVDataset", "data/smoke/07_model_output/llm_generations.csv"),
    "chat_data_report": ("json.JSONDataset", "data/smoke/08_reporting/chat_data_report.json"),
    "caption_data_report": ("json.JSONDataset", "data/smoke/08_reporting/caption_data_report.json"),
}

CAPTIONS = {
    "red_square.png": (["a red square on a white background", "a big red block", "red square in the middle"],
                       (220, 30, 30)),
    "blue_circle.png": (["a blue circle on a white background", "a round blue shape", "blue disc in the centre"],
                        (30, 30, 220)),
    "green_bar.png": (["a green bar across the image", "a long green stripe", "green band on white"], (30, 180, 30)),
    "yellow_dot.png": (["a small yellow dot", "a yellow spot on white", "tiny yellow circle"], (230, 210, 20)),
    "black_line.png": (["a thin black line", "a black stroke on white", "one black line across"], (0, 0, 0)),
}
PREDICTIONS = {
    "show_tell": {"red_square.png": "a red square on a white background", "blue_circle.png": "a blue shape",
                  "green_bar.png": "a green stripe", "yellow_dot.png": "a yellow dot on white",
                  "black_line.png": "a line"},
    "show_attend_tell": {"red_square.png": "a red block", "blue_circle.png": "a blue circle on a white background",
                         "green_bar.png": "a long green stripe", "yellow_dot.png": "a small yellow dot",
                         "black_line.png": "a thin black line"},
}
PERSIAN_QA = [
    ("سلام، حالت چطوره؟", "سلام، من خوبم. ممنون که پرسیدی."),
    ("پایتخت ایران کجاست؟", "پایتخت ایران تهران است."),
    ("چه کتابی پیشنهاد می‌کنی؟", "شاهنامه فردوسی را پیشنهاد می‌کنم."),
]
METHOD_ANSWERS = {
    "lora": ["سلام، من خوبم. ممنون.", "پایتخت ایران تهران است.", "کتاب شاهنامه را بخوان."],
    "prompt_tuning": ["hello hello hello hello hello", "Tehran Tehran Tehran is is", "من من من من من من"],
}


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    array = np.full((48, 64, 3), 255, dtype=np.uint8)
    array[12:36, 16:48] = colour
    Image.fromarray(array).save(path)


def write_upstream(project: Path) -> dict[str, str]:
    """Write every upstream dataset the evaluation and reporting pipelines read; return the model run ids."""
    declared: set[str] = set()
    for path in (project / "conf" / "base").glob("catalog*.yml"):
        declared |= set((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).keys())
    stubs = {name: {"type": kind, "filepath": filepath} for name, (kind, filepath) in UPSTREAM.items()
             if name not in declared}
    if stubs:
        (project / "conf" / "smoke" / "catalog_upstream_stub.yml").write_text(yaml.safe_dump(stubs), encoding="utf-8")

    images = project / "data" / "01_raw" / "images"
    images.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(store_uri(project))
    experiment = mlflow.set_experiment("upstream_fixture")
    client = MlflowClient()
    run_ids = {}
    for name in list(PREDICTIONS) + list(METHOD_ANSWERS):
        run_ids[name] = client.create_run(experiment.experiment_id, run_name=name).info.run_id

    rows = []
    for image_id, (refs, colour) in CAPTIONS.items():
        _image(images / image_id, colour)
        for arch, preds in PREDICTIONS.items():
            for split in ("val", "test"):
                rows.append({"architecture": arch, "split": split, "image_id": image_id,
                             "image_path": str(images / image_id), "prediction": preds[image_id], "references": refs})
    out = data_root(project) / "07_model_output"
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "caption_predictions.parquet")
    pd.DataFrame([{"architecture": arch, "params": 1_000_000 * (i + 2), "epochs_run": 2, "epoch_time_cached_s": 1.5,
                   "epoch_time_uncached_s": 9.0, "final_train_loss": 2.0 - i, "final_val_loss": 2.5 - i,
                   "best_val_bleu4": 0.1 + i / 10, "train_time_s": 3.0 + i, "mlflow_run_id": run_ids[arch],
                   "eval_split": "val-split"} for i, arch in enumerate(PREDICTIONS)]
                 ).to_csv(out / "caption_model_results.csv", index=False)
    pd.DataFrame([{"architecture": arch, "epoch": e, "train_loss": 3.0 - e - i / 2, "val_loss": 3.2 - e - i / 3,
                   "val_bleu4": 0.05 * e + i / 20, "lr": 1e-3} for i, arch in enumerate(PREDICTIONS) for e in (1, 2)]
                 ).to_csv(out / "caption_loss_history.csv", index=False)
    alphas = np.random.default_rng(0).random((3, 7, 7))
    with open(out / "caption_attention_sample.pkl", "wb") as handle:
        pickle.dump({"image_path": str(images / "red_square.png"), "words": ["a", "red", "square"], "alphas": alphas},
                    handle)

    results, history, generations = [], [], []
    for i, (method, answers) in enumerate(METHOD_ANSWERS.items()):
        loss = 1.5 + i
        results.append({"method": method, "trainable_params": 10 ** (5 - i), "total_params": 134_515_008,
                        "trainable_pct": 100 * 10 ** (5 - i) / 134_515_008, "peak_memory_mb": 900.0 + 50 * i,
                        "train_time_s": 20.0 + i, "step_time_s": 2.0, "tokens_per_s": 200.0 - 10 * i,
                        "eval_loss": loss, "perplexity": math.exp(loss), "persian_share": 0.9 - 0.5 * i,
                        "mlflow_run_id": run_ids[method], "adapter_dir": f"data/06_models/{method}"})
        for step in (1, 2, 3):
            history.append({"method": method, "step": step, "split": "train", "loss": 3.0 - step / 2 + i})
        history.append({"method": method, "step": 3, "split": "eval", "loss": loss})
        for (prompt, reference), answer in zip(PERSIAN_QA, answers):
            generations.append({"method": method, "stage": "after", "prompt_kind": "test", "prompt": prompt,
                                "reference": reference, "answer": answer})
            generations.append({"method": method, "stage": "before", "prompt_kind": "test", "prompt": prompt,
                                "reference": reference, "answer": "I am a helpful assistant."})
        generations.append({"method": method, "stage": "after", "prompt_kind": "fixed", "prompt": "خودت را معرفی کن",
                            "reference": "", "answer": answers[0]})
    pd.DataFrame(results).to_csv(out / "llm_method_results.csv", index=False)
    pd.DataFrame(history).to_csv(out / "llm_loss_history.csv", index=False)
    pd.DataFrame(generations).to_csv(out / "llm_generations.csv", index=False)
    pd.DataFrame([{"method": "base", "role": "untuned", "train_steps": 0, "bits_per_char": 2.5, "chrf_pp": 10.0,
                   "ended_rate": 0.0, "answer_chars": 400.0, "n_test_answers": 3},
                  {"method": "lora-release", "role": "release", "train_steps": 120, "bits_per_char": 1.25,
                   "chrf_pp": 20.5, "ended_rate": 0.97, "answer_chars": 80.0, "n_test_answers": 3}]
                 ).to_csv(out / "llm_release_results.csv", index=False)
    reporting = data_root(project) / "08_reporting"
    reporting.mkdir(parents=True, exist_ok=True)
    (reporting / "chat_data_report.json").write_text(json.dumps({"input": 10, "accepted": 8, "train": 5, "test": 3}),
                                                     encoding="utf-8")
    (reporting / "caption_data_report.json").write_text(json.dumps({
        "counts": {"accepted_images": 15, "accepted_captions": 45},
        "split_images": {"train": 5, "val": 5, "test": 5}, "vocab_size": 42}), encoding="utf-8")
    return run_ids


def test_evaluation_pipeline_scores_and_logs_on_model_runs(kedro_project):
    run_ids = write_upstream(kedro_project)
    run_pipeline(kedro_project, "evaluation")

    metrics = pd.read_csv(data_root(kedro_project) / "08_reporting" / "caption_metrics.csv")
    assert set(metrics["architecture"]) == set(PREDICTIONS) and set(metrics["split"]) == {"val", "test"}
    expected = {f"{impl}_bleu_{n}" for impl in ("nltk", "coco") for n in range(1, 5)} | {"meteor", "rouge_l", "cider_d"}
    assert set(metrics["metric"]) == expected | {"distinct_captions", "vocab_used"}
    assert metrics["value"].notna().all() and metrics["implementation"].str.len().gt(0).all()
    test = metrics[metrics["split"] == "test"].set_index(["architecture", "metric"])["value"]
    # show_attend_tell's captions are closer to the references in this fixture
    assert test[("show_attend_tell", "cider_d")] > test[("show_tell", "cider_d")]
    assert test[("show_attend_tell", "meteor")] > test[("show_tell", "meteor")]
    # diversity: distinct captions per image and distinct words, counted from the fixture's own captions
    for arch, captions in PREDICTIONS.items():
        assert test[(arch, "distinct_captions")] == 1.0  # five different captions for five images
        assert test[(arch, "vocab_used")] == len({w for c in captions.values() for w in c.split()})

    per_image = pd.read_parquet(data_root(kedro_project) / "08_reporting" / "caption_per_image_scores.parquet")
    assert len(per_image) == 2 * 2 * len(CAPTIONS)
    assert {"bleu_4", "cider_d", "meteor", "rouge_l", "image_path"} <= set(per_image.columns)

    chat = pd.read_csv(data_root(kedro_project) / "08_reporting" / "chat_metrics.csv")
    after = chat[chat["stage"] == "after"].set_index("method")
    assert after.loc["lora", "persian_share"] == 1.0
    assert after.loc["lora", "chrf"] > after.loc["prompt_tuning", "chrf"]
    assert after.loc["prompt_tuning", "repetition_rate"] > after.loc["lora", "repetition_rate"]
    assert math.isclose(after.loc["prompt_tuning", "perplexity"], math.exp(2.5))

    client = MlflowClient(tracking_uri=store_uri(kedro_project))
    lora_metrics = client.get_run(run_ids["lora"]).data.metrics
    assert math.isclose(lora_metrics["test_chrf"], after.loc["lora", "chrf"])
    sat = client.get_run(run_ids["show_attend_tell"]).data.metrics
    assert math.isclose(sat["test_cider_d"], test[("show_attend_tell", "cider_d")])
    assert "val_coco_bleu_4" in sat
    evaluation_runs = client.search_runs([client.get_experiment_by_name("llm_caption").experiment_id])
    assert any("eval.chat.lora.test_chrf" in run.data.metrics for run in evaluation_runs)


def test_evaluation_metric_names_are_valid_for_mlflow_whatever_the_model_is_called():
    """The SCST row is ``show_attend_tell+scst``: MLflow refuses ``+`` in a metric name, so the evaluation run's
    names carry ``show_attend_tell-scst``; the figures are those of the table."""
    from mlflow.utils.validation import validate_param_and_metric_name

    from llm_caption.pipelines.evaluation.nodes import log_evaluation_metrics, metric_name_part

    caption_metrics = pd.DataFrame({"architecture": ["show_attend_tell+scst", "show_tell"], "split": ["test", "val"],
                                    "metric": ["cider_d", "coco_bleu_4"], "value": [0.51, 0.16], "implementation": "x"})
    results = pd.DataFrame({"architecture": ["show_attend_tell+scst", "show_tell"], "mlflow_run_id": [None, None]})
    chat_metrics = pd.DataFrame({"method": ["lora+x"], "stage": ["after"], "chrf": [12.5]})
    llm_results = pd.DataFrame({"method": ["lora+x"], "mlflow_run_id": [None]})
    out = log_evaluation_metrics(caption_metrics, chat_metrics, results, llm_results)
    assert out == {"caption.show_attend_tell-scst.test_cider_d": {"value": 0.51, "step": 0},
                   "caption.show_tell.val_coco_bleu_4": {"value": 0.16, "step": 0},
                   "chat.lora-x.test_chrf": {"value": 12.5, "step": 0}}
    assert all(validate_param_and_metric_name(f"eval.{name}") for name in out)
    assert not validate_param_and_metric_name("eval.caption.show_attend_tell+scst.test_cider_d")
    assert metric_name_part("cnn_transformer") == "cnn_transformer"

    clash = pd.DataFrame({"architecture": ["a+b", "a-b"], "mlflow_run_id": [None, None]})
    with pytest.raises(ValueError, match="architectures 'a\\+b' and 'a-b' get the same MLflow metric names"):
        log_evaluation_metrics(caption_metrics.iloc[:0], chat_metrics, clash, llm_results)
