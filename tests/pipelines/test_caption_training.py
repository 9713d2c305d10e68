"""caption_training through Kedro's session (smoke env) on a small real synthetic-scenes data set."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import torch
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from caption_fixtures import make_caption_inputs
from conftest import data_root, run_pipeline, store_uri

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
ARCHS = ["show_tell", "show_attend_tell", "cnn_transformer"]
# A serving limit unlike the default (64 rows): the registered model must carry what the parameters say.
SERVING = {"caption_training": {"serving": {"max_rows": 2}}}


def write_smoke_caption_inputs(root: Path, inputs: dict) -> None:
    """Write data_engineering's caption outputs where the smoke catalog reads them (under ``root``)."""
    for layer in ("03_primary", "05_model_input"):
        (root / layer).mkdir(parents=True, exist_ok=True)
    inputs["caption_images"].to_parquet(root / "03_primary/caption_images.parquet", index=False)
    inputs["captions_encoded"].to_parquet(root / "05_model_input/captions_encoded.parquet", index=False)
    (root / "05_model_input/caption_vocab.json").write_text(json.dumps(inputs["caption_vocab"]))
    (root / "05_model_input/image_transform_spec.json").write_text(json.dumps(inputs["image_transform_spec"]))


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def test_caption_training_smoke_run_registers_a_champion(kedro_project: Path):
    inputs = make_caption_inputs(kedro_project.parent, n_images=24, image_size=64)
    smoke = data_root(kedro_project, "smoke")
    assert smoke == kedro_project / "data/smoke"
    write_smoke_caption_inputs(smoke, inputs)
    default_data = files_under(kedro_project / "data") - {f"smoke/{f}" for f in files_under(smoke)}
    run_pipeline(kedro_project, "caption_training", env="smoke", params=SERVING)

    # The smoke run wrote only under its own data root and into its own store.
    assert files_under(kedro_project / "data") - {f"smoke/{f}" for f in files_under(smoke)} == default_data
    assert not (kedro_project / "mlruns/mlflow.db").exists()
    assert (kedro_project / "mlruns/smoke.db").is_file()
    uri = store_uri(kedro_project, "smoke")
    out = smoke / "07_model_output"
    results = pd.read_csv(out / "caption_model_results.csv")
    # The three cross-entropy captioners, then SCST of the best of them (first on ties) as one more row.
    best_ce = results.iloc[:3].sort_values("best_val_bleu4", ascending=False, kind="stable")["architecture"].iloc[0]
    scst = f"{best_ce}+scst"
    assert results["architecture"].tolist() == ARCHS + [scst]
    assert list(results.columns) == ["architecture", "params", "epochs_run", "epoch_time_cached_s",
                                     "epoch_time_uncached_s", "final_train_loss", "final_val_loss",
                                     "best_val_bleu4", "train_time_s", "mlflow_run_id", "eval_split"]
    assert results["eval_split"].nunique() == 1
    assert results["epochs_run"].tolist() == [2, 2, 2, 1] and (results["params"] > 0).all()
    ce = results.iloc[:3]
    assert (ce["epoch_time_uncached_s"] > ce["epoch_time_cached_s"]).all()
    assert results["best_val_bleu4"].iloc[3] >= results.loc[results["architecture"] == best_ce, "best_val_bleu4"].iloc[0]
    history = pd.read_csv(out / "caption_loss_history.csv")
    assert history.loc[history["architecture"] == scst, "epoch"].tolist() == [0, 1]  # the starting point, then SCST
    assert len(history) == 8 and set(history.columns) == {"architecture", "epoch", "train_loss", "val_loss",
                                                          "val_bleu4", "lr"}
    preds = pd.read_parquet(out / "caption_predictions.parquet")
    n_val = (inputs["caption_images"]["split"] == "val").sum()
    n_test = (inputs["caption_images"]["split"] == "test").sum()
    assert len(preds) == 4 * (n_val + n_test)
    assert set(preds["split"]) == {"val", "test"} and all(len(r) == 5 for r in preds["references"])
    sample = pd.read_pickle(out / "caption_attention_sample.pkl")
    assert sample["alphas"].shape == (len(sample["words"]), 2, 2)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = {r.data.tags.get("architecture"): r for r in
            client.search_runs(client.get_experiment_by_name("llm_caption").experiment_id)}
    for arch, run_id in zip(results["architecture"], results["mlflow_run_id"]):
        run = runs[arch]
        assert run.info.run_id == run_id and "llm_caption.parent_run_id" in run.data.tags
        assert len(client.get_metric_history(run_id, "val_bleu4")) == 2
    scst_metrics = runs[scst].data.metrics
    for key in ("sample_reward", "greedy_reward", "val_cider_d", "val_distinct_captions", "val_vocab_used"):
        assert key in scst_metrics, key
    assert runs[scst].data.tags["base_architecture"] == best_ce
    champion = client.get_model_version_by_alias("image-captioner", "champion")
    assert str(champion.version) == "1" and champion.tags["metric_name"] == "val_bleu4"
    assert champion.tags["champion_decision"] == "promoted: no champion yet"
    # The validation split is fingerprinted once, by training, and the registry records that fingerprint.
    assert champion.tags["eval_split"] == results["eval_split"][0]
    assert {f"{a}/best.pt" for a in ARCHS + [scst]} <= files_under(smoke / "06_models/caption_training")
    # smoke's show_attend_tell fine-tunes the encoder top (cut before stage 6): its weights travel with the decoder's
    sat = torch.load(smoke / "06_models/caption_training/show_attend_tell/best.pt", weights_only=True)["model"]
    assert any(k.startswith("top.blocks.0.0.") for k in sat) and any(k.startswith("decoder.") for k in sat)

    # Second run: the checkpoints are complete, so it resumes without training and ties the champion.
    run_pipeline(kedro_project, "caption_training", env="smoke", params=SERVING)
    versions = client.search_model_versions("name='image-captioner'")
    assert len(versions) == 2
    assert str(client.get_model_version_by_alias("image-captioner", "champion").version) == "1"
    again = pd.read_csv(out / "caption_model_results.csv")
    pd.testing.assert_series_equal(again["best_val_bleu4"], results["best_val_bleu4"])

    # The SCST sweep reads the same environment's features and cross-entropy checkpoints; nothing is tracked.
    sweep = subprocess.run([sys.executable, "-m", "llm_caption.captioning.scst_sweep", "--env=smoke",
                            f"--architecture={best_ce}", "--set", "lr=1.0e-3,2.0e-3", "--epochs=1",
                            f"--out={kedro_project.parent / 'sweep'}"],
                           capture_output=True, text=True, timeout=300, cwd=kedro_project)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    table = pd.read_csv(kedro_project.parent / "sweep/scst_sweep.csv")
    assert table[["variant", "epoch"]].values.tolist() == [["lr=1.0e-3", 0], ["lr=1.0e-3", 1], ["lr=2.0e-3", 0],
                                                           ["lr=2.0e-3", 1]]
    # epoch 0 of every variant is the same starting point, the pipeline's SCST row started from
    assert table["val_bleu4"][0] == table["val_bleu4"][2]
    assert len(client.search_model_versions("name='image-captioner'")) == 2

    # The dev-split comparison of a frozen encoder and a trainable top (nothing tracked either).
    sweep = subprocess.run([sys.executable, "-m", "llm_caption.captioning.top_sweep", "--env=smoke",
                            "--variant=frozen", "--variant=cut_stage=6 top_lr=1.0e-3", "--epochs=1",
                            f"--out={kedro_project.parent / 'top_sweep'}"],
                           capture_output=True, text=True, timeout=300, cwd=kedro_project)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    table = pd.read_csv(kedro_project.parent / "top_sweep/top_sweep.csv")
    assert table["variant"].tolist() == ["frozen", "cut_stage=6 top_lr=1.0e-3"]
    assert table["trainable_params"][1] > table["trainable_params"][0]
    assert {"val_bleu4", "val_cider_d", "val_loss"} <= set(table.columns)

    image_path = inputs["caption_images"]["image_path"][0]
    cli = subprocess.run([sys.executable, "-m", "llm_caption.caption", image_path, "--tracking-uri", uri],
                         capture_output=True, text=True, timeout=300, cwd=kedro_project)
    assert cli.returncode == 0, cli.stderr[-2000:]
    path, caption = cli.stdout.strip().splitlines()[-1].split("\t")
    assert path == image_path

    champion_model = load_champion(uri)
    image_b64 = base64.b64encode(Path(image_path).read_bytes()).decode("ascii")
    served = champion_model.predict(pd.DataFrame({"image": [image_b64]}))
    assert served["error"].tolist() == [""]
    assert caption == served["caption"][0]
    words = caption.split()
    assert words and set(words) <= set(inputs["caption_vocab"]["itos"][3:]), caption  # no <pad> <sos> <eos>

    # The registered model carries the limits of the run's parameters: 3 rows are over its 2.
    assert champion_model.unwrap_python_model().limits.max_rows == 2
    with pytest.raises(MlflowException, match="the request has 3 rows; this model takes at most 2 per request"):
        champion_model.predict(pd.DataFrame({"image": [image_b64] * 3}))
    assert champion_model.predict(pd.DataFrame({"image": [image_b64] * 2}))["caption"].tolist() == [caption] * 2


def load_champion(uri: str):
    """``models:/image-captioner@champion`` of the store ``uri``, loaded through MLflow's registry."""
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as patch:
        # set_tracking_uri / set_registry_uri export these variables; put them back afterwards.
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            return mlflow.pyfunc.load_model("models:/image-captioner@champion")
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])


def test_bad_caption_rows_are_named(tmp_path):
    from llm_caption.captioning.experiment import validate_captions as _validate_captions

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


def test_torch_threads_hook_sets_and_restores_the_thread_count():
    import torch
    from kedro.pipeline import node

    from llm_caption.hooks import TorchThreadsHook

    hook, before = TorchThreadsHook(), torch.get_num_threads()
    step = node(lambda params: params, "params:caption_training", "out", name="step")
    wanted = 1 if before != 1 else 2
    hook.before_node_run(step, {"params:caption_training": {"torch_num_threads": wanted}})
    assert torch.get_num_threads() == wanted
    hook.on_node_error(step)
    assert torch.get_num_threads() == before
    hook.before_node_run(step, {"params:caption_training": {"torch_num_threads": None}, "other": 3})
    assert torch.get_num_threads() == before
    hook.after_node_run(step)
    assert torch.get_num_threads() == before
