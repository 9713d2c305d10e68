"""llm_finetuning through Kedro's real session on the smoke config, with a real MLflow sqlite store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm"))
from chat_fixtures import chat_frames  # noqa: E402
from conftest import data_root, run_pipeline, store_uri  # noqa: E402

METHODS = ["base", "lora", "layer_freeze"]


@pytest.mark.slow
def write_smoke_chat_splits(root: Path, n_train: int, n_test: int) -> None:
    """Write chat_train / chat_test where the smoke catalog reads them (under ``root``)."""
    train, test = chat_frames(n_train, n_test)
    (root / "05_model_input").mkdir(parents=True, exist_ok=True)
    train.to_parquet(root / "05_model_input/chat_train.parquet")
    test.to_parquet(root / "05_model_input/chat_test.parquet")


def test_smoke_run_measures_registers_and_tracks_every_method(kedro_project):
    smoke = data_root(kedro_project, "smoke")
    write_smoke_chat_splits(smoke, n_train=16, n_test=6)
    run_pipeline(kedro_project, "llm_finetuning", env="smoke",
                 params={"llm_finetuning": {"methods_to_run": METHODS}})
    assert not (kedro_project / "mlruns/mlflow.db").exists()  # the smoke store only

    results = pd.read_csv(smoke / "07_model_output/llm_method_results.csv")
    assert list(results["method"]) == METHODS
    assert results["eval_loss"].gt(0).all() and results["perplexity"].gt(1).all()
    assert (results["status"] == "ok").all() and results["bits_per_char"].gt(0).all()
    assert results["chrf_pp"].between(0, 100).all()
    by_method = results.set_index("method")
    assert by_method.loc["base", "trainable_params"] == 0
    assert 0 < by_method.loc["lora", "trainable_pct"] < 10
    assert by_method.loc["layer_freeze", "trainable_params"] > by_method.loc["lora", "trainable_params"]
    assert (by_method.drop(index="base")["tokens_per_s"] > 0).all()

    losses = pd.read_csv(smoke / "07_model_output/llm_loss_history.csv")
    for method in METHODS[1:]:
        steps = losses[(losses["method"] == method) & (losses["split"] == "train")]["step"].tolist()
        assert steps == [1, 2]
        # eval_steps 1 of 2: the trainer's eval after step 1, then the study's own pass over the eval split after
        # step 2 (the trainer's eval there is cancelled), which is the reported eval loss
        evals = losses[(losses["method"] == method) & (losses["split"] == "eval")]
        assert evals["step"].tolist() == [1, 2]
        assert evals["loss"].iloc[-1] == pytest.approx(by_method.loc[method, "eval_loss"], rel=1e-9)

    gens = pd.read_csv(smoke / "07_model_output/llm_generations.csv", keep_default_na=False)
    assert set(gens[gens["stage"] == "before"]["method"]) == {"base"}
    after = gens[gens["stage"] == "after"]
    assert sorted(after["method"].unique()) == sorted(METHODS)
    assert set(after["prompt_kind"]) == {"fixed", "test"}
    assert (after[after["prompt_kind"] == "test"]["reference"] != "").all()

    for method in METHODS[1:]:
        assert (smoke / "06_models/llm" / method / "llm_caption_method.json").is_file()
    assert (smoke / "06_models/llm/lora/adapter_model.safetensors").is_file()
    assert (smoke / "06_models/llm/layer_freeze/trained_layers.safetensors").is_file()

    mlflow.set_tracking_uri(store_uri(kedro_project, "smoke"))
    client = MlflowClient()
    for method, run_id in zip(results["method"], results["mlflow_run_id"], strict=True):
        run = client.get_run(run_id)
        assert run.data.tags["llm_caption.method"] == method
        assert "llm_caption.parent_run_id" in run.data.tags
        for metric in ("trainable_params", "peak_memory_mb", "train_time_s", "tokens_per_s", "eval_loss",
                       "perplexity", "bits_per_char", "chrf_pp", "persian_share"):
            assert metric in run.data.metrics, (method, metric)
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert "generations.json" in artifacts
        if method != "base":
            assert len(client.get_metric_history(run_id, "train_loss")) == 2

    decision = json.loads((smoke / "07_model_output/llm_registry_decision.json").read_text())
    best = results[results["method"] != "base"].sort_values("dev_bits_per_char").iloc[0]
    assert decision["method"] == best["method"] and decision["promoted"] is True
    assert decision["metric"] == "dev_bits_per_char" and decision["value"] == best["dev_bits_per_char"]
    assert "release" not in decision  # the release stage is off in the smoke config
    champion = client.get_model_version_by_alias("persian-chat-quickstart", "champion")
    assert str(champion.version) == decision["version"]


def test_two_studies_in_one_store_keep_their_own_champions(kedro_project):
    """The default study, then a study on other data under the persian_study environment's model name, in one
    store: each champion is reachable by its documented URI and neither study took the other's."""
    from chat_fixtures import load_conf

    study_name = load_conf("conf/persian_study/parameters_llm_finetuning.yml")["llm_finetuning"]["registry"]["model_name"]
    default_name = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]["registry"]["model_name"]
    assert (default_name, study_name) == ("persian-chat-quickstart", "persian-chat-adapter")
    smoke = data_root(kedro_project, "smoke")
    write_smoke_chat_splits(smoke, n_train=16, n_test=6)
    run_pipeline(kedro_project, "llm_finetuning", env="smoke", params={"llm_finetuning": {"methods_to_run": ["base", "lora"]}})
    first = json.loads((smoke / "07_model_output/llm_registry_decision.json").read_text())

    train, test = chat_frames(40, 6)  # other conversations than the first study's
    train.iloc[16:].reset_index(drop=True).to_parquet(smoke / "05_model_input/chat_train.parquet")
    test.to_parquet(smoke / "05_model_input/chat_test.parquet")
    run_pipeline(kedro_project, "llm_finetuning", env="smoke",
                 params={"llm_finetuning": {"methods_to_run": ["base", "lora"], "registry": {"model_name": study_name}}})
    second = json.loads((smoke / "07_model_output/llm_registry_decision.json").read_text())
    assert first["model_name"] == default_name and second["model_name"] == study_name
    assert first["eval_split"] != second["eval_split"]

    mlflow.set_tracking_uri(store_uri(kedro_project, "smoke"))
    client = MlflowClient()
    for name, decision in ((default_name, first), (study_name, second)):
        versions = client.search_model_versions(f"name='{name}'")
        assert [str(v.version) for v in versions] == [decision["version"]]  # one study, one version each
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == decision["version"] and champion.run_id == client.get_model_version(
            name, decision["version"]).run_id
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
        assert info.model_uri.startswith("models:/")
    assert (client.get_model_version_by_alias(default_name, "champion").run_id
            != client.get_model_version_by_alias(study_name, "champion").run_id)
