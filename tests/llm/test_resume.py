"""A training process killed with SIGKILL resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resume_setup import MAX_STEPS

WORKER = Path(__file__).resolve().parent / "resume_worker.py"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _start_worker(output_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(output_dir)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter_and_loss(tmp_path):
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

    resumed = _start_worker(interrupted)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    result = json.loads((interrupted / "result.json").read_text())
    assert result["resumed_from"] is not None and int(result["resumed_from"].split("-")[-1]) >= 2
    assert result["steps"] == MAX_STEPS - int(result["resumed_from"].split("-")[-1])

    # The uninterrupted reference runs in a fresh process too, like the interrupted one.
    uninterrupted = _start_worker(tmp_path / "reference")
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err.decode()[-2000:]
    reference = json.loads((tmp_path / "reference" / "result.json").read_text())
    assert reference["resumed_from"] is None and reference["steps"] == MAX_STEPS

    assert result["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-5)
    final_train = [r["loss"] for r in result["loss_history"] if r["split"] == "train"]
    reference_train = [r["loss"] for r in reference["loss_history"] if r["split"] == "train"]
    assert final_train == pytest.approx(reference_train, abs=1e-4)
    got = load_file(str(interrupted / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name
