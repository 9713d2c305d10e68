"""caption_training through Kedro's session (smoke env) on a small real synthetic-scenes data set."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "captioning"))
from caption_fixtures import make_caption_inputs, one_torch_thread, write_caption_inputs  # noqa: E402,F401
from conftest import run_pipeline  # noqa: E402

pytestmark = pytest.mark.slow
ARCHS = ["show_tell", "show_attend_tell", "cnn_transformer"]


def test_caption_training_smoke_run_registers_a_champion(kedro_project: Path):
    inputs = make_caption_inputs(kedro_project.parent, n_images=24, image_size=64)
    write_caption_inputs(kedro_project, inputs)
    run_pipeline(kedro_project, "caption_training", env="smoke")

    out = kedro_project / "data/07_model_output"
    results = pd.read_csv(out / "caption_model_results.csv")
    assert results["architecture"].tolist() == ARCHS
    assert list(results.columns) == ["architecture", "params", "epochs_run", "epoch_time_cached_s",
                                     "epoch_time_uncached_s", "final_train_loss", "final_val_loss",
                                     "best_val_bleu4", "train_time_s", "mlflow_run_id", "checkpoint_path"]
    assert (results["epochs_run"] == 2).all() and (results["params"] > 0).all()
    assert (results["epoch_time_uncached_s"] > results["epoch_time_cached_s"]).all()
    history = pd.read_csv(out / "caption_loss_history.csv")
    assert len(history) == 6 and set(history.columns) == {"architecture", "epoch", "train_loss", "val_loss",
                                                          "val_bleu4", "lr"}
    preds = pd.read_parquet(out / "caption_predictions.parquet")
    n_val = (inputs["caption_images"]["split"] == "val").sum()
    n_test = (inputs["caption_images"]["split"] == "test").sum()
    assert len(preds) == 3 * (n_val + n_test)
    assert set(preds["split"]) == {"val", "test"} and all(len(r) == 5 for r in preds["references"])
    sample = pd.read_pickle(out / "caption_attention_sample.pkl")
    assert sample["alphas"].shape == (len(sample["words"]), 2, 2)

    client = MlflowClient(tracking_uri="sqlite:///mlruns/mlflow.db")
    runs = {r.data.tags.get("architecture"): r for r in
            client.search_runs(client.get_experiment_by_name("llm_caption").experiment_id)}
    for arch, run_id in zip(results["architecture"], results["mlflow_run_id"]):
        run = runs[arch]
        assert run.info.run_id == run_id and "llm_caption.parent_run_id" in run.data.tags
        assert len(client.get_metric_history(run_id, "val_bleu4")) == 2
    champion = client.get_model_version_by_alias("image-captioner", "champion")
    assert str(champion.version) == "1" and champion.tags["metric_name"] == "val_bleu4"

    # Second run: the checkpoints are complete, so it resumes without training and ties the champion.
    run_pipeline(kedro_project, "caption_training", env="smoke")
    versions = client.search_model_versions("name='image-captioner'")
    assert len(versions) == 2
    assert str(client.get_model_version_by_alias("image-captioner", "champion").version) == "1"
    again = pd.read_csv(out / "caption_model_results.csv")
    pd.testing.assert_series_equal(again["best_val_bleu4"], results["best_val_bleu4"])

    cli = subprocess.run([sys.executable, "-m", "llm_caption.caption", inputs["caption_images"]["image_path"][0],
                          "--tracking-uri", "sqlite:///mlruns/mlflow.db"], capture_output=True, text=True,
                         timeout=300, cwd=kedro_project)
    assert cli.returncode == 0, cli.stderr[-2000:]
    path, caption = cli.stdout.strip().splitlines()[-1].split("\t")
    assert path.endswith(".jpg") and caption.strip()


def test_bad_caption_rows_are_named(tmp_path):
    from llm_caption.pipelines.caption_training.nodes import _validate_captions

    inputs = make_caption_inputs(tmp_path, n_images=4, image_size=32)
    captions = inputs["captions_encoded"].reset_index(drop=True)
    vocab = len(inputs["caption_vocab"]["itos"])
    _validate_captions(captions, vocab)
    short = captions.copy()
    short.at[3, "token_ids"] = list(short.at[3, "token_ids"])[:-1]
    with pytest.raises(ValueError, match="row 3 .*token ids"):
        _validate_captions(short, vocab)
    odd = captions.copy()
    odd.at[2, "split"] = "dev"
    with pytest.raises(ValueError, match="row 2 .*'dev'"):
        _validate_captions(odd, vocab)
    big = captions.copy()
    big.at[1, "token_ids"] = [1, vocab + 5] + [0] * (len(big.at[1, "token_ids"]) - 2)
    with pytest.raises(ValueError, match="row 1 .*outside the vocabulary"):
        _validate_captions(big, vocab)
