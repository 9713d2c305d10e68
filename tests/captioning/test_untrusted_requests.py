"""The served captioner treats every request as hostile: no server paths, no decompression bombs, bounded work."""

import base64
import io
import json
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from caption_fixtures import tiny_captioner
from llm_caption.captioning.pyfunc import ServingLimits, log_captioner, open_image_bytes
from conftest import start_run_in_current_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = {"max_rows": 4, "batch_size": 2}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(side: int = 12000) -> bytes:
    """A PNG of side x side pixels in a few hundred KB: 1-bit, all black (decoded as RGB: ~4 bytes per pixel)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return tiny_captioner(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="module")
def model(captioner, tmp_path_factory):
    """The captioner logged with small serving limits and loaded back through MLflow."""
    root = tmp_path_factory.mktemp("store")
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the artifact store (./mlruns) lands in the temporary folder
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        try:
            with start_run_in_current_store():
                uri = log_captioner(captioner["decoder"], captioner["config"], captioner["vocab"],
                                    captioner["encoder_weights"], serving=LIMITS)
            return mlflow.pyfunc.load_model(uri)
        finally:
            mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def image_b64(captioner):
    with open(captioner["image_paths"][0], "rb") as handle:
        return b64(handle.read())


def test_server_paths_are_never_opened_and_errors_do_not_tell_whether_they_exist(model, captioner, tmp_path):
    existing = captioner["image_paths"][0]                # a real, readable image on the server
    missing = existing[:-5] + "X.jpg"                     # same length, no such file
    assert len(existing) == len(missing)
    out = model.predict(pd.DataFrame({"image": [existing, missing]}))
    assert out["caption"].tolist() == ["", ""]
    assert out["error"][0].removeprefix("row 0: ") == out["error"][1].removeprefix("row 1: ")
    assert "not file paths" in out["error"][0]


def test_a_decompression_bomb_is_that_rows_error_and_the_other_rows_are_captioned(model, image_b64):
    bomb = bomb_png()
    assert len(bomb) < 300_000
    out = model.predict(pd.DataFrame({"image": [b64(bomb), image_b64]}))
    assert out["caption"][0] == ""
    assert out["error"][0] == ("row 0: image is 12000x12000 (144.0 MP): over the 40 MP limit per image; "
                               "not decoded")
    assert out["caption"][1] and out["error"][1] == ""


def test_a_bomb_is_refused_from_its_header_without_allocating_its_pixels():
    """Peak memory of a fresh process that is sent the 12000x12000 PNG: the pixels (~576 MB) are never allocated."""
    script = (
        "import base64, resource, sys\n"
        "sys.path[:0] = sys.argv[1:3]\n"
        "from test_untrusted_requests import bomb_png\n"
        "from llm_caption.captioning.pyfunc import ServingLimits, decode_request_value, open_image_bytes\n"
        "limits = ServingLimits()\n"
        "data = base64.b64encode(bomb_png()).decode()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    open_image_bytes(decode_request_value(data, limits), limits)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
        "print('grew_mb', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    import os
    here = os.path.dirname(__file__)
    run = subprocess.run([sys.executable, "-c", script, here, os.path.dirname(here)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: image is 12000x12000" in run.stdout
    grew = float(run.stdout.split("grew_mb")[1])
    assert grew < 50, f"peak memory grew by {grew:.0f} MB"


def test_pillows_own_bomb_guard_is_a_row_error_too():
    """Over twice Pillow's MAX_IMAGE_PIXELS Pillow refuses at open; that is reported like any bad row."""
    limits = ServingLimits(max_image_pixels=10**10)
    with pytest.raises(ValueError, match="decompression bomb"):
        open_image_bytes(bomb_png(20000), limits)


def test_too_many_rows_is_refused_in_one_line(model, image_b64):
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame({"image": [image_b64] * 5}))
    assert "the request has 5 rows; this model takes at most 4 per request" in error.value.message
    assert "\n" not in error.value.message
    out = model.predict(pd.DataFrame({"image": [image_b64] * 4}))
    assert (out["error"] == "").all() and out["caption"].nunique() == 1


def test_images_are_encoded_in_bounded_batches(model, image_b64):
    encoder = model.unwrap_python_model().captioner.encoder
    sizes = []
    hook = encoder.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    try:
        model.predict(pd.DataFrame({"image": [image_b64, "%%%", image_b64, image_b64]}))
    finally:
        hook.remove()
    assert sizes and max(sizes) <= LIMITS["batch_size"] and sum(sizes) == 3


def test_malformed_values_are_row_errors(model, image_b64):
    python_model = model.unwrap_python_model()
    out = python_model.predict(None, pd.DataFrame({"image": [5, None, "", image_b64]}))
    assert out["error"][0] == "row 0: expected base64-encoded image bytes (a string), got int"
    assert out["error"][1] == "row 1: expected base64-encoded image bytes (a string), got NoneType"
    assert out["error"][2] == "row 2: empty value: expected base64-encoded image bytes"
    assert out["error"][3] == "" and out["caption"][3]
    raw = python_model.predict(None, pd.DataFrame({"image": [b"\x89PNG"]}))
    assert raw["error"][0].startswith("row 0: the 4 bytes are not an image in an accepted format")
    with pytest.raises(MlflowException, match="needs an 'image' column .* got columns \\['path'\\]"):
        python_model.predict(None, pd.DataFrame({"path": [image_b64]}))
    with pytest.raises(MlflowException, match="expected a DataFrame"):
        python_model.predict(None, {"image": image_b64})


def test_only_the_configured_image_formats_are_opened(model):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PPM")
    out = model.predict(pd.DataFrame({"image": [b64(buffer.getvalue())]}))
    assert out["caption"][0] == "" and "not an image in an accepted format (JPEG, PNG" in out["error"][0]


def test_oversized_payload_is_refused_before_decoding(captioner, tmp_path):
    limits = ServingLimits(max_image_bytes=1000)
    from llm_caption.captioning.pyfunc import decode_request_value

    with pytest.raises(ValueError, match="over the 1,000-byte limit per image"):
        decode_request_value("A" * 5000, limits)
    with pytest.raises(ValueError, match="2,000 bytes: over the 1,000-byte limit"):
        decode_request_value(b"\x00" * 2000, limits)


def test_the_logged_config_holds_the_complete_limits(model):
    config_path = model.unwrap_python_model().captioner.config
    assert config_path["serving"] == {**ServingLimits().to_dict(), **LIMITS}
    json.dumps(config_path["serving"])
