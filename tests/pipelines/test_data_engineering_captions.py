"""The caption branch of data_engineering, run through Kedro's real session (kedro-mlflow hook active),
in a temp copy of the project; outputs are read back from the catalog's files and the MLflow sqlite store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import data_root, run_pipeline, store_uri
from llm_caption.captioning.vocab import Vocabulary


def run_caption_branch(project: Path, params: dict | None = None, env: str = "smoke") -> None:
    """``kedro run --pipeline=data_engineering --tags=caption_data`` with runtime ``params``."""
    run_pipeline(project, "data_engineering", env=env, params=params, tags=["caption_data"])


def latest_run(project: Path):
    client = mlflow.MlflowClient(tracking_uri=store_uri(project))
    experiment = client.get_experiment_by_name("llm_caption")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return client, run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def jpeg_bytes(seed: int, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_bad_folder(root: Path, n_good: int = 20) -> Path:
    """Kaggle layout: good images with 2 captions each, plus a zero-byte file, a truncated JPEG,
    a caption for a missing image, an empty caption and a malformed row."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_good):
        (root / "images" / f"g{i:02d}.jpg").write_bytes(jpeg_bytes(i))
        rows += [f"g{i:02d}.jpg,A {['red', 'blue'][i % 2]} thing .", f"g{i:02d}.jpg,Something {i % 3} here ."]
    (root / "images" / "zero.jpg").write_bytes(b"")
    (root / "images" / "cut.jpg").write_bytes(jpeg_bytes(7)[:300])
    rows += ["zero.jpg,empty file .", "cut.jpg,cut file .", "ghost.jpg,no such file .", "g00.jpg,...", "g01.jpg,a,b,c"]
    (root / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_smoke_run_writes_the_contract_datasets_and_mlflow_records(kedro_project):
    run_caption_branch(kedro_project)  # the chat branch has its own tests
    data = data_root(kedro_project)

    images = pd.read_parquet(data / "03_primary/caption_images.parquet")
    assert list(images.columns) == ["image_id", "image_path", "split", "width", "height"]
    assert len(images) == 200 and images.groupby("split").size().to_dict() == {"test": 20, "train": 160, "val": 20}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in images.image_path)

    encoded = pd.read_parquet(data / "05_model_input/captions_encoded.parquet")
    assert list(encoded.columns) == ["image_id", "split", "caption_raw", "caption", "token_ids", "n_words", "truncated"]
    assert len(encoded) == 1000 and encoded.groupby("image_id").size().eq(5).all()
    assert encoded.merge(images, on="image_id").pipe(lambda m: (m.split_x == m.split_y).all())

    vocab_json = json.loads((data / "05_model_input/caption_vocab.json").read_text())
    vocab = Vocabulary.from_dict(vocab_json)
    assert vocab_json["itos"][:4] == ["<pad>", "<sos>", "<eos>", "<unk>"] and vocab_json["max_len"] == 20
    assert {"circle", "square", "triangle", "star", "red", "left", "above"} <= set(vocab.itos)
    row = encoded.iloc[0]
    assert len(row.token_ids) == 20 and row.token_ids[0] == 1
    assert vocab.decode(row.token_ids) == row.caption and not encoded.truncated.any()

    spec = json.loads((data / "05_model_input/image_transform_spec.json").read_text())
    assert spec["image_size"] == 224 and spec["mean"] == [0.5] * 3 and spec["train"]["hflip"] is False

    report = json.loads((data / "08_reporting/caption_data_report.json").read_text())
    assert report["counts"] == {"input_captions": 1000, "accepted_captions": 1000, "rejected_captions": 0,
                                "input_images": 200, "accepted_images": 200, "rejected_images": 0}
    assert report["vocab_size"] == len(vocab) and report["truncated_share"] == 0.0
    assert (data / "02_intermediate/rejected_captions.jsonl").exists()
    for name in ("caption_length_plot", "caption_word_freq_plot", "caption_word_freq_nostop_plot", "caption_samples_plot"):
        assert (data / "08_reporting" / f"{name}.png").stat().st_size > 5000

    client, run = latest_run(kedro_project)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["caption_data.accepted_captions"] == 1000
    assert run.data.metrics["caption_data.rejected_images"] == 0
    assert run.data.metrics["caption_data.vocab_size"] == len(vocab)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "caption_data")}
    assert {"caption_data/caption_data_report.json", "caption_data/caption_samples_plot.png"} <= logged


def test_bad_inputs_are_rejected_recorded_and_counted(kedro_project, tmp_path):
    bad = make_bad_folder(tmp_path / "bad")
    run_caption_branch(kedro_project, {"caption_data": {"source": "folder", "data_dir": str(bad)}})

    rejected = read_jsonl(data_root(kedro_project) / "02_intermediate/rejected_captions.jsonl")
    reasons = {(r["kind"], r["image"] or r["line"]): r["reason"].split(":")[0] for r in rejected}
    assert reasons == {
        ("image", "zero.jpg"): "empty_file", ("image", "cut.jpg"): "corrupt_image",
        ("image", "ghost.jpg"): "missing_image",
        ("caption", "zero.jpg"): "image_rejected", ("caption", "cut.jpg"): "image_rejected",
        ("caption", "ghost.jpg"): "unknown_image", ("caption", "g00.jpg"): "empty_caption",
        ("caption", 46): "malformed_row"}
    assert all(r["source"].startswith(str(bad)) for r in rejected)

    report = json.loads((data_root(kedro_project) / "08_reporting/caption_data_report.json").read_text())
    counts = report["counts"]
    assert counts["accepted_captions"] + counts["rejected_captions"] == counts["input_captions"] == 45
    assert counts["accepted_images"] + counts["rejected_images"] == counts["input_images"] == 23
    assert report["split_images"]["train"] + report["split_images"]["val"] + report["split_images"]["test"] == 20

    _, run = latest_run(kedro_project)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert (metrics["caption_data.rejected_captions"], metrics["caption_data.rejected_images"]) == (5, 3)
    assert metrics["caption_data.rejected_images.corrupt_image"] == 1
    assert metrics["caption_data.rejected_captions.malformed_row"] == 1


def test_too_many_rejections_fail_once_after_the_rejections_are_written(kedro_project, tmp_path):
    bad = make_bad_folder(tmp_path / "bad", n_good=4)
    with pytest.raises(Exception, match=r"Too much caption data rejected: .* > caption_data.max_rejected_share=0.2"):
        run_caption_branch(kedro_project, {"caption_data": {"source": "folder", "data_dir": str(bad)}})
    assert len(read_jsonl(data_root(kedro_project) / "02_intermediate/rejected_captions.jsonl")) == 8
    assert not (data_root(kedro_project) / "05_model_input/captions_encoded.parquet").exists()



def test_hostile_caption_file_is_read_to_the_end_and_every_reject_is_written(kedro_project, tmp_path):
    """A BOM, CR-only line endings, a Latin-1 byte, an unclosed quote and repeated lines: the run finishes, each
    bad line is a reject with its line number, and accepted + rejected = lines read."""
    root = tmp_path / "hostile"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(20):
        (root / "images" / f"g{i:02d}.jpg").write_bytes(jpeg_bytes(i))
        rows += [f"g{i:02d}.jpg,A {['red', 'blue'][i % 2]} thing .".encode(),
                 f"g{i:02d}.jpg,Something {i} here .".encode()]
    rows += ["g00.jpg,A café .".encode("latin-1"),   # line 42: not UTF-8
             b'g01.jpg,"An unclosed, quote .',        # line 43
             rows[0], rows[0]]                        # lines 44, 45: repeats of line 2
    (root / "captions.txt").write_bytes(b"\xef\xbb\xbfimage,caption\r" + b"\r".join(rows) + b"\r")
    run_caption_branch(kedro_project, {"caption_data": {"source": "folder", "data_dir": str(root)}})

    rejected = read_jsonl(data_root(kedro_project) / "02_intermediate/rejected_captions.jsonl")
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejected] == [
        (42, "invalid_utf8"), (43, "malformed_row"), (44, "duplicate_caption"), (45, "duplicate_caption")]
    assert rejected[0]["record"] == "g00.jpg,A caf\\xe9 ." and rejected[2]["reason"].startswith(
        "duplicate_caption: duplicate of line 2")
    report = json.loads((data_root(kedro_project) / "08_reporting/caption_data_report.json").read_text())
    assert report["counts"] == {"input_captions": 44, "accepted_captions": 40, "rejected_captions": 4,
                                "input_images": 20, "accepted_images": 20, "rejected_images": 0}
