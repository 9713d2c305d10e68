"""``python -m llm_caption.caption`` on local files: the same captions as the model gives for those files' bytes."""

import base64
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from caption_fixtures import tiny_captioner
from llm_caption.captioning.pyfunc import log_captioner
from conftest import start_run_in_current_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny captioner logged (2 rows per request, so the command must split 3 files) in a temporary store."""
    root = tmp_path_factory.mktemp("cli")
    cap = tiny_captioner(root / "data")
    tracking = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        mlflow.set_tracking_uri(tracking)
        try:
            with start_run_in_current_store():
                uri = log_captioner(cap["decoder"], cap["config"], cap["vocab"], cap["encoder_weights"],
                                    serving={"max_rows": 2})
            model = mlflow.pyfunc.load_model(uri)
        finally:
            mlflow.set_tracking_uri(previous)
    return {"cap": cap, "uri": uri, "tracking": tracking, "root": root, "model": model}


def _cli(logged, *paths):
    return subprocess.run([sys.executable, "-m", "llm_caption.caption", *map(str, paths), "--model-uri", logged["uri"],
                           "--tracking-uri", logged["tracking"]], capture_output=True, text=True, timeout=300,
                          cwd=logged["root"])


def test_cli_captions_files_like_the_model_does_for_their_bytes(logged):
    paths = logged["cap"]["image_paths"][:3]
    run = _cli(logged, *paths)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line.split("\t") for line in run.stdout.strip().splitlines()]
    assert [p for p, _ in lines] == paths
    expected = logged["model"].predict(pd.DataFrame(
        {"image": [base64.b64encode(open(p, "rb").read()).decode() for p in paths[:2]]}))["caption"].tolist()
    expected += logged["model"].predict(pd.DataFrame(
        {"image": [base64.b64encode(open(paths[2], "rb").read()).decode()]}))["caption"].tolist()
    assert [c for _, c in lines] == expected
    itos = logged["cap"]["vocab"]["itos"]
    words_of_the_vocabulary = set(itos[4:])  # after <pad> <sos> <eos> <unk>
    for _, caption in lines:
        words = caption.split()
        assert set(words) <= words_of_the_vocabulary | {"<unk>"}, caption
        assert sum(w in words_of_the_vocabulary for w in words) >= 3, caption


def test_cli_names_a_file_it_cannot_read_and_captions_the_rest(logged, tmp_path):
    good = logged["cap"]["image_paths"][0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00 not an image")
    run = _cli(logged, tmp_path / "missing.jpg", good, broken)
    assert run.returncode == 1
    lines = run.stdout.strip().splitlines()
    assert lines[0] == f"{tmp_path / 'missing.jpg'}\tERROR: cannot read the file: No such file or directory"
    path, caption = lines[1].split("\t")
    assert path == good and caption and not caption.startswith("ERROR")
    assert lines[2].startswith(f"{broken}\tERROR: the 14 bytes are not an image in an accepted format")
