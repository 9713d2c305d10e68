"""The plain-torch EfficientNet-lite0 and eval transform give timm's and torchvision's numbers, and captioning
(building the encoder, the eval transform and a captioner) imports neither timm nor torchvision."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm_caption.captioning.encoder import build_encoder, default_lite0_weights, load_state_dict_in_order
from llm_caption.captioning.features import load_image
from llm_caption.captioning.lite0 import EfficientNetLite0
from llm_caption.captioning.transforms import DEFAULT_SPEC, EvalTransform, build_transform, make_transform_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[2]
FLICKR_IMAGES = REPO_ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def _real_images(n: int) -> list[Image.Image]:
    """The first ``n`` Flickr8k photos (sorted by name), or [] when the shared data set is not on this machine."""
    if not FLICKR_IMAGES.is_dir():
        return []
    return [load_image(p) for p in sorted(FLICKR_IMAGES.glob("*.jpg"))[:n]]


def _synthetic(size: tuple[int, int], seed: int) -> Image.Image:
    """A noisy RGB image of ``size`` (w, h): resizing it exercises every output pixel's filter."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture(scope="module")
def models():
    timm = pytest.importorskip("timm")
    state = torch.load(default_lite0_weights(), map_location="cpu", weights_only=True)
    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = EfficientNetLite0()
    load_state_dict_in_order(theirs, state, "lite0 weights")
    load_state_dict_in_order(ours, state, "lite0 weights")
    return theirs.eval(), ours.eval()


def test_state_dict_has_timms_keys_shapes_and_order(models):
    theirs, ours = models
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the packaged weights land on the same parameters
    assert ours.num_features == theirs.num_features == 1280
    assert [len(stage) for stage in ours.blocks] == [len(stage) for stage in theirs.blocks] == [1, 2, 2, 3, 3, 4, 1]
    assert [blk.has_skip for stage in ours.blocks for blk in stage] == \
        [blk.has_skip for stage in theirs.blocks for blk in stage]


def test_feature_grids_equal_timms_on_real_photos(models):
    theirs, ours = models
    transform = build_transform(DEFAULT_SPEC, train=False)
    images = _real_images(4)
    batch = torch.stack([transform(img) for img in images]) if images else torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        a, b = theirs.forward_features(batch), ours.forward_features(batch)
        logits_a, logits_b = theirs(batch), ours(batch)
    assert a.shape == b.shape == (4, 1280, 7, 7)
    assert (a - b).abs().max().item() <= 1e-5
    assert torch.allclose(logits_a, logits_b, atol=1e-4, rtol=0)
    if images:  # real photos: the ImageNet classifier is far from uniform (1/1000), so the weights are live
        assert logits_b.softmax(-1).max(-1).values.min() > 0.02


@pytest.mark.parametrize("size", [(224, 224), (225, 191), (97, 130)])
def test_same_padding_matches_timm_on_odd_sizes(models, size):
    theirs, ours = models
    x = torch.randn(1, 3, size[1], size[0], generator=torch.Generator().manual_seed(sum(size)))
    with torch.inference_mode():
        a, b = theirs.forward_features(x), ours.forward_features(x)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5


def test_training_mode_matches_timm_in_outputs_running_stats_and_gradients(models):
    """Fine-tuning goes through batch statistics and the in-place ReLU6: the same as timm there too."""
    theirs, ours = models
    import copy

    theirs, ours = copy.deepcopy(theirs).train(), copy.deepcopy(ours).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = theirs.forward_features(x), ours.forward_features(x)
    assert (a - b).abs().max().item() <= 1e-5
    a.square().mean().backward()
    b.square().mean().backward()
    ta, tb = theirs.state_dict(), ours.state_dict()
    assert all(torch.allclose(ta[k].float(), tb[k].float(), atol=1e-6) for k in ta if "running" in k)
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("classifier"):  # not on the feature path
            continue
        assert p.grad is not None and grads[name].grad is not None, name
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4), name


def test_build_encoder_gives_the_lite0_grid_of_timms_model(models):
    theirs, _ = models
    encoder, weights = build_encoder({"name": "efficientnet_lite0"})
    assert weights == default_lite0_weights()
    assert isinstance(encoder.trunk.model, EfficientNetLite0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (encoder(x) - theirs.forward_features(x)).abs().max().item() <= 1e-5


def test_eval_transform_equals_torchvisions_bit_for_bit():
    T = pytest.importorskip("torchvision.transforms")
    photos = _real_images(3)
    # the shared photos are all 256x256: crops of them give real content at other sizes (and 224x224, left as is)
    crops = [img.crop(box) for img, box in zip(photos, [(0, 0, 241, 173), (10, 20, 234, 244), (5, 0, 104, 255)])]
    images = photos + crops + [_synthetic((300, 200), 0), _synthetic((224, 224), 1), _synthetic((50, 61), 2),
                               _synthetic((241, 173), 3), _synthetic((99, 255), 4)]  # the crops' sizes without photos
    assert len({img.size for img in images}) >= 5
    for spec in (DEFAULT_SPEC, make_transform_spec({"image_size": 160, "mean": [0.485, 0.456, 0.406],
                                                    "std": [0.229, 0.224, 0.225]})):
        spec = make_transform_spec(spec)
        ours = build_transform(spec, train=False)
        assert isinstance(ours, EvalTransform)
        theirs = T.Compose([T.Resize((spec["image_size"], spec["image_size"]), antialias=True), T.ToTensor(),
                            T.Normalize(mean=spec["mean"], std=spec["std"])])
        for img in images:
            a, b = theirs(img), ours(img)
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            assert torch.equal(a, b), (img.size, spec["image_size"], (a - b).abs().max().item())


def test_eval_transform_names_what_it_cannot_take():
    tf = build_transform(DEFAULT_SPEC, train=False)
    with pytest.raises(ValueError, match="RGB image, got mode 'L'"):
        tf(Image.new("L", (32, 32)))
    with pytest.raises(TypeError, match="PIL image, got Tensor"):
        tf(torch.zeros(3, 32, 32))


def test_captioning_imports_neither_timm_nor_torchvision(tmp_path):
    """Building the lite0 encoder, the eval transform and a captioner, then captioning a photo, in a fresh
    interpreter: timm, torchvision and torch._dynamo (seconds of start-up) stay out of ``sys.modules``."""
    image = tmp_path / "photo.jpg"
    _synthetic((120, 90), 3).save(image, format="JPEG")
    probe = (
        "import sys\n"
        "import llm_caption.captioning.pyfunc as pyfunc\n"
        "from llm_caption.captioning import encoder, transforms\n"
        "from llm_caption.captioning.features import load_image\n"
        "from llm_caption.captioning.models import build_decoder\n"
        "enc, weights = encoder.build_encoder({'name': 'efficientnet_lite0'})\n"
        "tf = transforms.build_transform(None, train=False)\n"
        "itos = ['<pad>', '<sos>', '<eos>', '<unk>', 'a', 'dog']\n"
        "kw = {'embed_dim': 16, 'hidden_dim': 32, 'dropout': 0.0}\n"
        "dec = build_decoder('show_tell', len(itos), 1280, **kw)\n"
        "config = {'architecture': 'show_tell', 'decoder': kw, 'encoder': {'name': 'efficientnet_lite0'},\n"
        "          'transform_spec': transforms.make_transform_spec(None),\n"
        "          'decoding': {'beam_size': 2, 'max_len': 5}}\n"
        "cap = pyfunc.Captioner(config, dec.state_dict(), itos, weights)\n"
        f"out = cap.caption([load_image({str(image)!r})])\n"
        "assert len(out) == 1 and isinstance(out[0], str), out\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
