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


@pytest.fixture(scope="module")
def registered(logged):
    """The logged captioner registered as ``image-captioner`` with the alias ``champion`` in the same store."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(logged["tracking"])
    try:
        version = mlflow.register_model(logged["uri"], "image-captioner").version
        mlflow.MlflowClient().set_registered_model_alias("image-captioner", "champion", version)
    finally:
        mlflow.set_tracking_uri(previous)
    return {**logged, "alias_uri": "models:/image-captioner@champion",
            "version_uri": f"models:/image-captioner/{version}"}


def test_cli_on_a_registered_alias_loads_the_folder_without_mlflow_and_prints_the_same(registered):
    """``models:/name@alias`` in a local sqlite store: the captioner is built from its folder's files (no
    ``mlflow.pyfunc``, no unpickling) and prints what the model loaded through MLflow prints."""
    paths = registered["cap"]["image_paths"][:3]
    through_mlflow = _cli(registered, *paths)
    assert through_mlflow.returncode == 0, through_mlflow.stderr[-2000:]
    for uri in (registered["alias_uri"], registered["version_uri"]):
        run = subprocess.run([sys.executable, "-m", "llm_caption.caption", *paths, "--model-uri", uri,
                              "--tracking-uri", registered["tracking"]], capture_output=True, text=True, timeout=300,
                             cwd=registered["root"])
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout == through_mlflow.stdout
    probe = ("import sys\n"
             "from llm_caption.caption import caption_files, load_registered\n"
             f"model = load_registered({registered['tracking']!r}, {registered['alias_uri']!r})\n"
             f"out = caption_files(model, {paths[:1]!r})\n"
             "print(type(model).__name__, 'mlflow.pyfunc' in sys.modules, bool(out[0][0]), out[0][1] == '')\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=registered["root"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["LocalCaptioner", "False", "True", "True"]


def test_load_local_leaves_other_models_to_mlflow(registered, tmp_path):
    """A folder whose pickled python model is not this project's captioner (or that is not a model folder)
    is not loaded by hand: ``load_local`` says None and the command goes through ``mlflow.pyfunc``."""
    import pickle
    import shutil
    from collections import OrderedDict

    from llm_caption.caption import local_registered_model
    from llm_caption.captioning.pyfunc import CaptionerPredictor, load_local

    folder = local_registered_model(registered["tracking"], registered["alias_uri"])
    assert folder is not None
    assert isinstance(load_local(folder), CaptionerPredictor)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "python_model.pkl").write_bytes(pickle.dumps(OrderedDict()))
    assert load_local(other) is None
    (other / "MLmodel").write_text("flavors: {}\n")
    assert load_local(other) is None
    assert load_local(tmp_path / "missing") is None
    # an MLmodel whose artifact path leads out of the folder is not followed
    import yaml

    outside = tmp_path / "outside"
    shutil.copytree(folder, outside)
    mlmodel = yaml.safe_load((outside / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["artifacts"]["vocab"]["path"] = "../secret.json"
    (tmp_path / "secret.json").write_text("{}")
    (outside / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    assert load_local(outside) is None
