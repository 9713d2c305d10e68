import torch
from PIL import Image

from llm_caption.captioning.transforms import DEFAULT_SPEC, build_transform, make_transform_spec


def _image():
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 150, 200))  # left half blue
    return img


def test_eval_transform_resizes_and_normalises():
    out = build_transform(DEFAULT_SPEC, train=False)(_image())
    assert out.shape == (3, 224, 224)
    # (x - 0.5) / 0.5 maps [0, 1] onto [-1, 1]
    assert torch.isclose(out.max(), torch.tensor(1.0)) and torch.isclose(out.min(), torch.tensor(-1.0))
    assert out[2, 100, 10] > 0.9 and out[0, 100, 10] < -0.9  # blue on the left


def test_train_transform_augments_and_is_seedable():
    spec = make_transform_spec({"image_size": 64, "train": {"hflip": True, "random_resized_crop": {"scale": [0.5, 1.0]}}})
    tf = build_transform(spec, train=True)
    torch.manual_seed(0)
    a = [tf(_image()) for _ in range(8)]
    torch.manual_seed(0)
    b = [tf(_image()) for _ in range(8)]
    assert all(x.shape == (3, 64, 64) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(a[0], x) for x in a[1:])
    # flipped at least once: blue ends up on the right
    assert any(x[2, 32, -1] > 0.9 for x in a)


def test_spec_without_augmentation_is_deterministic():
    spec = make_transform_spec({"image_size": 32, "train": {"hflip": False, "random_resized_crop": None}})
    assert spec["train"] == {"hflip": False, "random_resized_crop": None}
    tf = build_transform(spec, train=True)
    assert torch.equal(tf(_image()), build_transform(spec, train=False)(_image()))
