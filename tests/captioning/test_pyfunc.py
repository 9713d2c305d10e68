import base64

import mlflow
import pandas as pd
import pytest

from caption_fixtures import tiny_captioner
from llm_caption.captioning.pyfunc import ServingLimits, log_captioner
from conftest import start_run_in_current_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return tiny_captioner(tmp_path_factory.mktemp("captioner"))


def test_pyfunc_round_trip_base64_and_bad_rows(captioner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with start_run_in_current_store():
            uri = log_captioner(captioner["decoder"], captioner["config"], captioner["vocab"],
                                captioner["encoder_weights"])
        model = mlflow.pyfunc.load_model(uri)
        path = captioner["image_paths"][0]
        b64 = base64.b64encode(open(path, "rb").read()).decode()
        garbage = base64.b64encode(b"\x00garbage").decode()
        out = model.predict(pd.DataFrame({"image": [b64, "not base64 !!", garbage, path, b64]}))
    finally:
        mlflow.set_tracking_uri(None)
    assert list(out.columns) == ["caption", "error"] and len(out) == 5
    assert out["caption"][0] and out["caption"][0] == out["caption"][4]
    assert set(out["caption"][0].split()) <= set(captioner["vocab"]["itos"][4:])
    assert out["error"][0] == out["error"][4] == ""
    assert out["caption"][1] == "" and out["error"][1].startswith("row 1: not base64-encoded image bytes")
    assert out["caption"][2] == "" and "row 2" in out["error"][2] and "not an image" in out["error"][2]
    # a path of an existing image is not opened: the served model takes bytes only
    assert out["caption"][3] == "" and "not file paths" in out["error"][3]
    assert all("\n" not in e for e in out["error"])


def test_serving_limits_are_validated():
    assert ServingLimits.from_config(None) == ServingLimits()
    assert ServingLimits.from_config({"image_formats": ["png"]}).image_formats == ("PNG",)
    with pytest.raises(ValueError, match="unknown keys \\['max_pixels'\\]"):
        ServingLimits.from_config({"max_pixels": 5})
    with pytest.raises(ValueError, match="serving.max_rows must be a positive integer"):
        ServingLimits.from_config({"max_rows": 0})


def test_the_configured_serving_block_is_complete_and_valid():
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf/base/parameters_caption_training.yml"
    serving = yaml.safe_load(conf.read_text())["caption_training"]["serving"]
    assert set(serving) == set(ServingLimits().to_dict())
    assert ServingLimits.from_config(serving).max_image_pixels == 40_000_000
