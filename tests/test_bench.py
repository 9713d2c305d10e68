"""The benchmark harness (``make bench``) in miniature, so that it cannot rot: ``python -m benchmarks --tiny``
end to end (table, JSON, MLflow run), and the tutorial's per-image beam search against the project's batched one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.caption import _strip, caption_image_beam_search  # noqa: E402
from benchmarks.common import Series, alternate, count_flops  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One ``python -m benchmarks --tiny`` run into a temporary folder and store."""
    root = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--threads", "1",
                          "--out", str(root / "results.md"), "--tracking-uri", f"sqlite:///{root}/mlflow.db",
                          "--chat-store", ""],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    return {"run": run, "root": root}


@pytest.mark.slow
def test_tiny_bench_writes_the_table_the_json_and_an_mlflow_run(tiny_bench):
    run, root = tiny_bench["run"], tiny_bench["root"]
    assert run.returncode == 0, run.stderr[-3000:]
    table = (root / "results.md").read_text(encoding="utf-8")
    for label in ("1 LLM LoRA fine-tuning", "2 captioner training", "3 beam search", "4 latency", "5 machine peak",
                  "tokens/s vs peer A", "tokens/s vs peer B", "caption command, cold"):
        assert label in table, label
    raw = json.loads((root / "results.json").read_text(encoding="utf-8"))
    metrics = raw["metrics"]
    for key in ("peak_fp32_gflops", "peak_bf16_gflops", "caption_train_ratio", "beam_ratio", "latency_torch_s",
                "latency_caption_s",
                *(f"{prefix}_{side}_{figure}" for prefix in ("llm", "llm_gemma") for side in ("project", "peer_a", "peer_b")
                  for figure in ("tokens_per_s", "whole_s"))):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert "Gemma-3-270m" in table and "whole training call" in table
    for model in ("llm", "llm_gemma"):
        llm = raw["series"][model]
        # Same batches on every path: the peers' non-padding tokens agree exactly; the project's padding-free rows
        # leave out only the tokens after each conversation's last label.
        assert llm["peer_a"]["tokens_total"] == llm["peer_b"]["tokens_total"]
        assert 0.5 * llm["peer_a"]["tokens_total"][0] < llm["project"]["tokens_total"][0] <= llm["peer_a"]["tokens_total"][0]
        # Same loss up to bf16 rounding (padded and padding-free rows, all or labelled positions in the head).
        assert llm["project"]["eval_loss"][0] == pytest.approx(llm["peer_a"]["eval_loss"][0], rel=1e-2), model
        assert llm["project"]["eval_loss"][0] == pytest.approx(llm["peer_b"]["eval_loss"][0], rel=1e-2), model
    n = raw["settings"]["caption"]["beam_images"]
    assert metrics["beam_identical"] == n

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("benchmarks")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    assert runs[0].data.metrics["beam_ratio"] == pytest.approx(metrics["beam_ratio"])
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"results.md", "results.json"}


def test_tutorial_beam_search_gives_the_projects_batched_captions():
    """The per-image peer written out in benchmarks/ and the batched beam search agree token for token, on a small
    decoder trained to tell twelve feature grids apart by captions of 2 to 5 words."""
    from llm_caption.captioning.decoding import beam_search
    from llm_caption.captioning.models import build_decoder, caption_loss

    torch.manual_seed(3)
    vocab = ["<pad>", "<sos>", "<eos>", "<unk>", *[f"w{i}" for i in range(10)]]
    model = build_decoder("show_attend_tell", len(vocab), 16, embed_dim=8, hidden_dim=16, attention_dim=8,
                          feature_proj=12, dropout=0.0)
    feats = torch.randn(12, 9, 16)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(12, 8, dtype=torch.long)
    for i in range(12):
        n = int(torch.randint(2, 6, (1,), generator=generator))
        tokens[i, 0], tokens[i, n + 1] = 1, 2
        tokens[i, 1: n + 1] = torch.randint(4, len(vocab), (n,), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        loss = caption_loss(model, feats, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    word_map = {w: i for i, w in enumerate(vocab)}
    batched = beam_search(model, feats, beam_size=3, max_len=51, length_penalty=0.0).tokens
    with torch.no_grad():
        single = [_strip(caption_image_beam_search(model, feats[i: i + 1], word_map, 3), 1, 2) for i in range(12)]
    assert single == batched
    assert len({tuple(t) for t in batched}) > 6 and {len(t) for t in batched} >= {2, 5}


def test_alternate_interleaves_the_sides_and_series_report_median_and_half_range():
    calls = []
    out = alternate({"a": lambda rep: calls.append(("a", rep)) or rep, "b": lambda rep: calls.append(("b", rep))}, 3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert out["a"] == [0, 1, 2]
    series = Series([3.0, 1.0, 2.0])
    assert (series.median, series.spread) == (2.0, 1.0)


def test_count_flops_counts_a_matmul_forward_and_backward():
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    assert count_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 8 * 16 * 4


def test_commands_resolve_a_registered_model_in_a_sqlite_store_to_the_folder_mlflow_loads(tmp_path):
    """The commands' start-up shortcut (one read-only query of the registry tables) finds the folder of the version
    an alias or a version number names, the same files MLflow itself loads; anything else is left to MLflow."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from llm_caption.caption import load_registered, local_registered_model

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"echo": list(model_input["x"])})

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # load_registered below also sets the registry URI; conftest puts both back
    try:
        experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            first = mlflow.pyfunc.log_model(name="m", python_model=Echo(), pip_requirements=[])
            second = mlflow.pyfunc.log_model(name="m", python_model=Echo(), pip_requirements=[])
        client = MlflowClient(uri)
        for info in (first, second):
            mlflow.register_model(info.model_uri, "echo")
        client.set_registered_model_alias("echo", "champion", "1")
        folder = local_registered_model(uri, "models:/echo@champion")
        assert folder is not None and Path(folder, "MLmodel").is_file()
        assert Path(folder) == Path(mlflow.artifacts.download_artifacts(client.get_model_version_download_uri("echo", "1")))
        assert local_registered_model(uri, "models:/echo/2") != folder
        assert local_registered_model(uri, "models:/echo/2") is not None
        assert local_registered_model(uri, "models:/echo@nobody") is None
        assert local_registered_model(uri, "models:/echo/9") is None
        assert local_registered_model(uri, first.model_uri) is None  # a logged-model URI: MLflow resolves it
        assert local_registered_model("http://127.0.0.1:1", "models:/echo@champion") is None
        model = load_registered(uri, "models:/echo@champion")
        assert model.predict(pd.DataFrame({"x": [1, 2]}))["echo"].tolist() == [1, 2]
    finally:
        mlflow.set_tracking_uri(previous)
