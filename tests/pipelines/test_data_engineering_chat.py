"""The chat branch of data_engineering, run through Kedro's real session (kedro-mlflow hook active).

Only the branch's nodes run (tag ``chat``), on the smoke configuration, in a temp copy of the
project; outputs are read back from the catalog's files and from the MLflow sqlite store.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import data_root, run_pipeline, store_uri

GOOD_QA = [("سلام، حالت چطوره؟", "خوبم، ممنون."), ("پایتخت ایران کجاست؟", "تهران."),
           ("دو به علاوه دو چند می‌شود؟", "چهار."), ("رنگ آسمان چیست؟", "آبی.")]


def run_chat_branch(project: Path, env: str = "smoke", params: dict | None = None) -> None:
    """Run the nodes tagged ``chat`` of data_engineering as ``kedro run --pipeline=data_engineering --tags=chat``."""
    run_pipeline(project, "data_engineering", env=env, params=params, tags=["chat"])


def latest_run_metrics(project: Path) -> dict[str, float]:
    client = mlflow.MlflowClient(tracking_uri=store_uri(project))
    experiment = client.get_experiment_by_name("llm_caption")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    assert run.info.status == "FINISHED"
    return run.data.metrics


def read_rejected(project: Path) -> list[dict]:
    text = (data_root(project) / "02_intermediate" / "rejected_chat.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_smoke_run_on_the_embedded_corpus(kedro_project):
    run_chat_branch(kedro_project)

    train = pd.read_parquet(data_root(kedro_project) / "05_model_input/chat_train.parquet")
    test = pd.read_parquet(data_root(kedro_project) / "05_model_input/chat_test.parquet")
    assert (len(train), len(test)) == (54, 6)  # smoke: n_samples 60, test_size 0.1
    assert list(train.columns) == ["conversation_id", "source", "messages", "n_tokens"]
    assert set(train.conversation_id).isdisjoint(test.conversation_id)
    assert train.n_tokens.max() <= 256 and train.source.str.startswith("chatterbot_corpus/").all()
    for messages in list(train.messages) + list(test.messages):
        roles = [m["role"] for m in messages]
        assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) % 2 == 0
        assert all(a != b for a, b in zip(roles, roles[1:])) and all(m["content"] for m in messages)

    report = json.loads((data_root(kedro_project) / "08_reporting/chat_data_report.json").read_text(encoding="utf-8"))
    rejected = read_rejected(kedro_project)
    assert report["input"] == 773
    assert report["accepted"] + report["rejected"] == report["input"]
    assert report["rejected"] == len(rejected) == report["rejected_by_reason"]["too_long"]
    assert all(int(r["detail"].split()[0]) > 256 for r in rejected)
    assert report["trailing_user_turns_dropped"] == 334
    assert report["token_stats"]["train"]["count"] == 54
    assert (data_root(kedro_project) / "08_reporting/chat_token_length_histogram.png").stat().st_size > 10_000

    metrics = latest_run_metrics(kedro_project)
    assert metrics["chat_data.input"] == 773
    assert metrics["chat_data.rejected.too_long"] == len(rejected)
    assert metrics["chat_data.train"] == 54 and metrics["chat_data.test"] == 6


def _write_bad_input(path: Path) -> None:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"{q} ({i})"},
                                      {"role": "assistant", "content": a}]}, ensure_ascii=False).encode()
             for i in range(8) for q, a in GOOD_QA]                                       # lines 1-32
    lines += [
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',                      # 33 non-UTF-8 bytes
        b'{"messages": [{"role": "user", "content": "cut',                               # 34 truncated JSON
        json.dumps({"prompt": "بدون پیام"}, ensure_ascii=False).encode(),                # 35 no messages
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),           # 36 unknown role
        json.dumps({"conversations": [{"from": "human", "value": "سلام"},
                                      {"from": "gpt", "value": "  "}]}, ensure_ascii=False).encode(),  # 37 empty
        json.dumps({"messages": [{"role": "user", "content": "الف"}, {"role": "user", "content": "ب"},
                                 {"role": "assistant", "content": "ج"}]}, ensure_ascii=False).encode(),  # 38
        lines[0].replace("سلام، ".encode(), "سلام،  \u00a0 ".encode()),                 # 39 duplicate of 1 after normalisation
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_input_is_rejected_with_reasons_and_counted_in_mlflow(kedro_project):
    source = kedro_project / "data" / "01_raw" / "chat.jsonl"
    _write_bad_input(source)
    run_chat_branch(kedro_project, params={"chat_data": {
        "sources": [{"type": "file", "path": "data/01_raw/chat.jsonl"}], "n_samples": 20}})

    rejected = {r["line"]: r for r in read_rejected(kedro_project)}
    assert {line: r["reason"] for line, r in rejected.items()} == {
        33: "invalid_utf8", 34: "malformed_json", 35: "missing_messages", 36: "unknown_role",
        37: "empty_content", 38: "not_alternating", 39: "duplicate"}
    assert all(r["source"] == "data/01_raw/chat.jsonl" for r in rejected.values())
    assert rejected[39]["detail"] == "duplicate of data/01_raw/chat.jsonl:1"
    assert rejected[35]["record"] == '{"prompt": "بدون پیام"}'

    report = json.loads((data_root(kedro_project) / "08_reporting/chat_data_report.json").read_text(encoding="utf-8"))
    assert (report["input"], report["accepted"], report["rejected"]) == (39, 32, 7)
    assert (report["sampled"], report["train"], report["test"]) == (20, 18, 2)

    metrics = latest_run_metrics(kedro_project)
    assert metrics["chat_data.rejected"] == 7 and metrics["chat_data.accepted"] == 32
    for reason in ("invalid_utf8", "malformed_json", "missing_messages", "unknown_role", "empty_content",
                   "not_alternating", "duplicate"):
        assert metrics[f"chat_data.rejected.{reason}"] == 1


def test_too_many_rejections_fail_with_one_clear_message(kedro_project):
    source = kedro_project / "data" / "01_raw" / "bad.jsonl"
    source.write_bytes(b"not json\n{\"messages\": 3}\n\xff\n")
    with pytest.raises(Exception, match=r"3 of 3 chat records \(100.0%\) were rejected.*max_rejected_share"):
        run_chat_branch(kedro_project, params={"chat_data": {"sources": [{"type": "file", "path": str(source)}]}})
    # The rejected records are written before the failure, for inspection.
    assert [r["reason"] for r in read_rejected(kedro_project)] == ["malformed_json", "bad_messages", "invalid_utf8"]


def test_persian_instruct_environment_selects_the_shared_file(kedro_project):
    from kedro.config import OmegaConfigLoader

    from llm_caption.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(kedro_project / "conf"), env="persian_instruct", **CONFIG_LOADER_ARGS)
    chat_data = loader["parameters"]["chat_data"]
    assert chat_data["sources"] == [{"type": "file", "path": "../shared/data/persian_chat/chat.jsonl", "format": "openai"}]
    assert chat_data["n_samples"] == 1000 and chat_data["max_seq_len"] == 512  # the rest comes from base


def test_hostile_files_are_read_to_the_end_and_every_reject_is_written(kedro_project):
    """A BOM, CR-only line endings, a line nested 100,000 deep, an unpaired surrogate escape, a number too long
    to convert, a .json that is not a list and an empty file: the run finishes and each bad record is a reject."""
    raw = kedro_project / "data" / "01_raw"
    good = [json.dumps({"messages": [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]},
                       ensure_ascii=False).encode() for i in range(5) for q, a in GOOD_QA]  # lines 1-20
    bad = [b"[" * 100_000 + b"]" * 100_000,                                                          # 21
           b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',  # 22
           b'{"messages": ' + b"1" * 5000 + b"}"]                                                    # 23
    (raw / "hostile.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r".join(good + bad) + b"\r")
    (raw / "one.json").write_bytes(good[0])
    (raw / "empty.jsonl").write_bytes(b"")
    run_chat_branch(kedro_project, params={"chat_data": {"n_samples": 20, "sources": [
        {"type": "file", "path": "data/01_raw/hostile.jsonl"}, {"type": "file", "path": "data/01_raw/one.json"},
        {"type": "file", "path": "data/01_raw/empty.jsonl"}]}})

    rejected = {(r["source"], r["line"]): r for r in read_rejected(kedro_project)}
    assert {key: r["reason"] for key, r in rejected.items()} == {
        ("data/01_raw/hostile.jsonl", 21): "too_deeply_nested", ("data/01_raw/hostile.jsonl", 22): "invalid_unicode",
        ("data/01_raw/hostile.jsonl", 23): "malformed_json", ("data/01_raw/one.json", 1): "not_a_list"}
    assert rejected["data/01_raw/hostile.jsonl", 22]["record"] == bad[1].decode()
    report = json.loads((data_root(kedro_project) / "08_reporting/chat_data_report.json").read_text(encoding="utf-8"))
    assert (report["input"], report["accepted"], report["rejected"]) == (24, 20, 4)
    assert report["by_source"]["data/01_raw/hostile.jsonl"] == {"input": 23, "accepted": 20, "rejected": 3}
    train = pd.read_parquet(data_root(kedro_project) / "05_model_input/chat_train.parquet")
    questions = [f"{q} ({i})" for i in range(5) for q, _ in GOOD_QA]
    assert train.messages.map(lambda m: m[0]["content"]).isin(questions).all()
