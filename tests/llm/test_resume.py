"""A training process killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted run ends;
a damaged checkpoint is named and skipped for the one before it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_caption.llm.training import last_checkpoint
from resume_setup import MAX_STEPS

WORKER = Path(__file__).resolve().parent / "resume_worker.py"
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _start_worker(output_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(output_dir)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run_worker(output_dir: Path) -> tuple[dict, str]:
    worker = _start_worker(output_dir)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err.decode()[-2000:]
    return json.loads((output_dir / "result.json").read_text()), err.decode()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run in a fresh process (checkpoints 1..MAX_STEPS kept), like the interrupted ones."""
    folder = tmp_path_factory.mktemp("reference")
    result, _ = _run_worker(folder)
    assert result["resumed_from"] is None and result["steps"] == MAX_STEPS
    return folder


def _assert_same_as_reference(result: dict, output_dir: Path, reference: Path) -> None:
    want_result = json.loads((reference / "result.json").read_text())
    assert result["eval_loss"] == pytest.approx(want_result["eval_loss"], abs=1e-5)
    final_train = [r["loss"] for r in result["loss_history"] if r["split"] == "train"]
    reference_train = [r["loss"] for r in want_result["loss_history"] if r["split"] == "train"]
    assert final_train == pytest.approx(reference_train, abs=1e-4)
    got = load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name


def test_killed_run_resumes_to_the_same_adapter_and_loss(tmp_path, reference):
    interrupted = tmp_path / "interrupted"
    worker = _start_worker(interrupted)
    checkpoint = interrupted / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():
        assert worker.poll() is None, f"worker ended before checkpoint-2: {worker.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint-2 within 300 s"
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert not (interrupted / "result.json").exists()

    result, _ = _run_worker(interrupted)
    assert result["resumed_from"] is not None and int(result["resumed_from"].split("-")[-1]) >= 2
    assert result["steps"] == MAX_STEPS - int(result["resumed_from"].split("-")[-1])
    _assert_same_as_reference(result, interrupted, reference)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_checkpoints_are_named_and_skipped(tmp_path, reference, caplog):
    damaged = tmp_path / "damaged"
    shutil.copytree(reference / "checkpoints", damaged / "checkpoints")
    checkpoints = damaged / "checkpoints"
    assert last_checkpoint(checkpoints) == str(checkpoints / f"checkpoint-{MAX_STEPS}")
    _truncate(checkpoints / "checkpoint-4" / "adapter_model.safetensors")   # cut while being written
    _truncate(checkpoints / "checkpoint-3" / "trainer_state.json")
    with caplog.at_level(logging.WARNING, logger="llm_caption.llm.training"):
        assert last_checkpoint(checkpoints) == str(checkpoints / "checkpoint-2")
    assert f"{checkpoints / 'checkpoint-4' / 'adapter_model.safetensors'} is truncated" in caplog.text
    assert f"{checkpoints / 'checkpoint-3' / 'trainer_state.json'} is not a complete trainer state" in caplog.text

    # the run resumes from checkpoint-2 (no crash on the damaged ones) and ends where the reference ends
    result, log = _run_worker(damaged)
    assert result["resumed_from"] == str(checkpoints / "checkpoint-2") and result["steps"] == MAX_STEPS - 2
    assert "Ignoring checkpoint" in log and "adapter_model.safetensors is truncated" in log
    _assert_same_as_reference(result, damaged, reference)


def test_unusable_optimizer_state_or_pickle_payload_means_start_fresh(tmp_path, reference, caplog):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", checkpoints)
    marker = tmp_path / "payload-ran"
    for step in range(1, MAX_STEPS + 1):
        folder = checkpoints / f"checkpoint-{step}"
        if step % 2:
            _truncate(folder / "optimizer.pt")
        else:
            torch.save({"state": _Payload(marker)}, folder / "rng_state.pth")
    with caplog.at_level(logging.WARNING, logger="llm_caption.llm.training"):
        assert last_checkpoint(checkpoints) is None
    assert not marker.exists()
    assert f"{checkpoints / 'checkpoint-1' / 'optimizer.pt'} cannot be loaded safely" in caplog.text
    assert f"{checkpoints / 'checkpoint-2' / 'rng_state.pth'} cannot be loaded safely" in caplog.text
    assert "training starts fresh" in caplog.text


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
