"""The captioners on two processes (``torchrun --nproc_per_node 2``, gloo on CPU, one thread each).

``train_architectures`` for one epoch on smoke-sized data (synthetic scenes' captions, random fp16 feature
grids with two views): DDP with a ``DistributedSampler`` over the cached features at 4 captions per rank
ends with the same weights on both ranks and matches one process at 8 captions per step (each rank's loss is
weighted by its share of the step's target tokens, so the averaged gradient is the one-process gradient).
Tolerance: 2e-4 absolute on every weight (measured 1.6e-7 for show_tell and 6.5e-5 for cnn_transformer after
3 AdamW steps at learning rate 3e-3: where the exact gradient is zero, e.g. position rows past a rank's
longest caption, rounding noise of ~1e-10 divided by Adam's eps of 1e-8 moves a weight by ~1e-2 x lr; the
validation loss is identical) and 1e-5 on the epoch's train/val loss (measured 2.6e-7 and 0); dropout is
off so that neither side draws random masks. Rank 0 alone opens MLflow runs: the fresh
store holds exactly one run per architecture, and both ranks report its id.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from caption_fixtures import make_caption_inputs
from test_distributed_llm import BIN, REPO_ROOT, launch_env, torchrun

WORKER = Path(__file__).resolve().parent / "distributed_caption_worker.py"
ARCHS = ["show_tell", "cnn_transformer"]
ATOL = 2e-4
LOSS_ATOL = 1e-5
N_TRAIN = 24  # a multiple of 8: every step of both runs is full

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("captions")
    made = make_caption_inputs(root, n_images=12, image_size=32)
    captions = made["captions_encoded"]
    train = captions[captions["split"] == "train"].iloc[:N_TRAIN]
    assert len(train) == N_TRAIN
    captions = pd.concat([captions[captions["split"] != "train"], train], ignore_index=True)
    captions.to_parquet(root / "captions.parquet")
    (root / "vocab.json").write_text(json.dumps(made["caption_vocab"]))
    ids = sorted(made["caption_images"]["image_id"])
    torch.manual_seed(0)
    torch.save({"features": torch.randn(len(ids), 2, 4, 16).half(), "image_ids": ids}, root / "grids.pt")
    return {"captions": str(root / "captions.parquet"), "vocab": str(root / "vocab.json"),
            "features": str(root / "grids.pt")}


def params(checkpoints: Path, batch: int) -> dict:
    return {"architectures": ARCHS, "checkpoint_dir": str(checkpoints), "resume": False,
            "decoders": {"show_tell": {"embed_dim": 16, "hidden_dim": 32, "dropout": 0.0},
                         "cnn_transformer": {"d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64,
                                             "dropout": 0.0}},
            "training": {"epochs": 1, "batch_size": batch, "lr": 3e-3, "max_decode_len": 8, "eval_batch_size": 16}}


def train(inputs: dict, out: Path, nproc: int, batch: int) -> list[dict]:
    import subprocess

    out.mkdir(parents=True)
    setup = out / "setup.json"
    setup.write_text(json.dumps({**inputs, "params": params(out / "checkpoints", batch), "out": str(out)}))
    env = {**launch_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    command = torchrun(nproc, str(WORKER), str(setup)) if nproc > 1 else [sys.executable, str(WORKER), str(setup)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def test_two_ranks_train_captioners_like_one_process_at_twice_the_batch(tmp_path, inputs):
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    ranks = train(inputs, tmp_path / "ddp", nproc=2, batch=4)
    single, = train(inputs, tmp_path / "single", nproc=1, batch=8)
    assert [r["world_size"] for r in ranks] == [2, 2]

    gaps = {}
    for arch in ARCHS:
        weights = [r["models"][arch] for r in ranks]
        assert all(float((weights[0][k] - weights[1][k]).abs().max()) == 0.0 for k in weights[0]), arch
        gaps[arch] = max(float((weights[0][k] - single["models"][arch][k]).abs().max()) for k in weights[0])
    losses = {k: max(abs(a - b) for a, b in zip(ranks[0]["history"][k], single["history"][k], strict=True))
              for k in ("train_loss", "val_loss")}
    print(f"ranks identical; two ranks vs one process: weights {gaps}, losses {losses}; "
          f"{time.perf_counter() - start:.0f}s")
    assert max(gaps.values()) <= ATOL and max(losses.values()) <= LOSS_ATOL
    assert ranks[0]["history"] == ranks[1]["history"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ddp' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["architecture"] for r in runs) == sorted(ARCHS)
    run_ids = {r.info.run_id for r in runs}
    assert set(ranks[0]["results"]["mlflow_run_id"]) == set(ranks[1]["results"]["mlflow_run_id"]) == run_ids
    assert all(len(client.get_metric_history(r.info.run_id, "train_loss")) == 1 for r in runs)


def test_caption_pipeline_under_torchrun_tracks_and_registers_once(tmp_path, monkeypatch):
    """``kedro run --pipeline caption_training`` on two processes: one pipeline run, one child run per
    architecture (rank 0's), one registered version; both ranks joined the process group."""
    # The run gets no MLFLOW_TRACKING_URI (launch_env); neither may the store this test reads (store_uri honours it).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    import re
    import subprocess

    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(Path(__file__).resolve().parent / "pipelines"))
    from conftest import data_root, make_project_copy, store_uri
    from test_caption_training import ARCHS as PIPELINE_ARCHS, write_smoke_caption_inputs

    project = make_project_copy(tmp_path / "project")
    write_smoke_caption_inputs(data_root(project, "smoke"), make_caption_inputs(tmp_path, n_images=24, image_size=64))
    start = time.perf_counter()
    done = subprocess.run(torchrun(2, str(BIN / "kedro"), "run", "--pipeline=caption_training", "--env=smoke"),
                          cwd=project, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"torchrun kedro run --pipeline caption_training: {time.perf_counter() - start:.0f}s")
    log = re.sub(r"\s+", "", done.stdout + done.stderr)  # Kedro's console log wraps lines anywhere
    assert "Processgroup:rank0of2" in log and "Processgroup:rank1of2" in log
    assert "caption_registration(MemoryDataset)" in log  # rank 1's decision stays in memory

    uri = store_uri(project, "smoke")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "llm_caption.parent_run_id" not in r.data.tags]
    children = [r for r in runs if "llm_caption.parent_run_id" in r.data.tags]
    trained = sorted(r.data.tags["architecture"] for r in children)
    scst = [a for a in trained if a.endswith("+scst")]  # smoke trains SCST of the best architecture too (rank 0 logs)
    assert len(parents) == 1 and len(scst) == 1 and sorted(set(trained) - set(scst)) == sorted(PIPELINE_ARCHS)
    assert {r.data.tags["llm_caption.parent_run_id"] for r in children} == {parents[0].info.run_id}
    models = client.search_registered_models()
    assert [m.name for m in models] == ["image-captioner"]
    versions = client.search_model_versions("name='image-captioner'")
    assert len(versions) == 1 and {k: str(v) for k, v in models[0].aliases.items()} == {"champion": "1"}
