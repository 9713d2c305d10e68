import base64

import mlflow
import pandas as pd
import pytest

from caption_fixtures import tiny_captioner, one_torch_thread  # noqa: F401
from llm_caption.captioning.pyfunc import log_captioner


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return tiny_captioner(tmp_path_factory.mktemp("captioner"))


def test_pyfunc_round_trip_paths_base64_and_bad_rows(captioner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run():
            uri = log_captioner(captioner["decoder"], captioner["config"], captioner["vocab"],
                                captioner["encoder_weights"])
        model = mlflow.pyfunc.load_model(uri)
        path = captioner["image_paths"][0]
        b64 = base64.b64encode(open(path, "rb").read()).decode()
        bad_file = tmp_path / "bad.jpg"
        bad_file.write_bytes(b"\x00garbage")
        out = model.predict(pd.DataFrame({"image": [path, b64, "not base64 !!", str(bad_file), path]}))
    finally:
        mlflow.set_tracking_uri(None)
    assert list(out.columns) == ["caption", "error"] and len(out) == 5
    assert out["caption"][0] and out["caption"][0] == out["caption"][1] == out["caption"][4]
    assert set(out["caption"][0].split()) <= set(captioner["vocab"]["itos"][4:])
    assert out["error"][0] == out["error"][1] == ""
    assert out["caption"][2] == "" and "row 2" in out["error"][2] and "base64" in out["error"][2]
    assert out["caption"][3] == "" and "bad.jpg" in out["error"][3]
