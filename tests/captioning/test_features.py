import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from caption_fixtures import solid_image
from llm_caption.captioning.encoder import build_encoder, encoder_fingerprint
from llm_caption.captioning.features import FeatureCache
from llm_caption.captioning.transforms import build_transform, make_transform_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = make_transform_spec({"image_size": 64})


@pytest.fixture(scope="module")
def encoder():
    enc, weights = build_encoder({"name": "efficientnet_lite0"})
    return enc, encoder_fingerprint({"name": "efficientnet_lite0"}, weights)


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 220, 30), (120, 30, 160)]
    return [str(solid_image(folder / f"img{i}.jpg", colours[i % 5])) for i in range(n)]


def test_cache_builds_once_and_is_reused(tmp_path, encoder):
    enc, fp = encoder
    paths = _images(tmp_path / "imgs", 4)
    ids = [p.rsplit("/", 1)[1] for p in paths]
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids, paths, views=2, batch_size=3)
    assert first.built and first.features.dtype == torch.float16
    assert first.features.shape == (4, 2, 4, 1280)  # 64 px -> 2x2 grid; view 1 = flipped image
    assert first.grid_hw == (2, 2)
    again = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids, paths, views=2, batch_size=3)
    assert not again.built and again.key == first.key
    assert torch.equal(again.features, first.features)
    # the flipped view is the flipped image's features, not a copy
    assert not torch.equal(first.features[:, 0], first.features[:, 1])


def test_cache_invalidates_when_the_image_list_changes(tmp_path, encoder):
    enc, fp = encoder
    paths = _images(tmp_path / "imgs", 5)
    ids = [p.rsplit("/", 1)[1] for p in paths]
    cache = FeatureCache(tmp_path / "cache")
    a = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids[:4], paths[:4])
    b = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids, paths)
    assert b.built and b.key != a.key and b.features.shape[0] == 5
    torch.testing.assert_close(b.features[:4], a.features)  # same images, same numbers
    other_spec = make_transform_spec({"image_size": 96})
    c = cache.get_or_build(enc, fp, build_transform(other_spec), other_spec, ids, paths)
    assert c.built and c.key not in (a.key, b.key) and c.grid_hw == (3, 3)
    assert cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids[:4], paths[:4]).built is False


def test_unreadable_image_is_named(tmp_path, encoder):
    enc, fp = encoder
    paths = _images(tmp_path / "imgs", 2)
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(b"not an image")
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    with pytest.raises(ValueError, match="broken.jpg"):
        FeatureCache(cache_root).get_or_build(enc, fp, build_transform(SPEC), SPEC, ["a", "b", "c"],
                                              [*paths, str(broken)])
    assert list(cache_root.iterdir()) == []  # no entry, not even a partial one


def _bmp(path, colour):
    """An uncompressed 64x64 BMP: every such file has the same size whatever its colours."""
    img = Image.new("RGB", (64, 64), colour)
    img.paste((255, 255, 255), (0, 0, 16, 64))
    img.save(path, format="BMP")
    return str(path)


def test_a_replaced_image_of_the_same_size_and_mtime_is_encoded_again(tmp_path, encoder):
    enc, fp = encoder
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = [_bmp(folder / f"img{i}.bmp", c) for i, c in enumerate([(220, 20, 20), (20, 200, 20), (20, 20, 220)])]
    ids = ["a", "b", "c"]
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids, paths)
    stat = os.stat(paths[0])
    _bmp(paths[0], (230, 220, 30))  # another picture in the same place
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or rsync -a would leave it
    assert os.path.getsize(paths[0]) == stat.st_size and os.stat(paths[0]).st_mtime_ns == stat.st_mtime_ns
    second = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids, paths)
    assert second.built and second.key != first.key
    assert not torch.equal(second.features[0], first.features[0])  # the new picture's features
    assert torch.equal(second.features[1:], first.features[1:])


def test_an_unreadable_cache_entry_is_named_and_rebuilt(tmp_path, encoder, caplog):
    enc, fp = encoder
    paths = _images(tmp_path / "imgs", 2)
    ids = ["a", "b"]
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids, paths)
    features_file = cache.path(first.key) / "features.npy"
    raw = features_file.read_bytes()
    features_file.write_bytes(raw[: len(raw) // 2])
    with caplog.at_level(logging.WARNING, logger="llm_caption.captioning.features"):
        again = cache.get_or_build(enc, fp, build_transform(SPEC), SPEC, ids, paths)
    assert str(cache.path(first.key)) in caplog.text and "rebuilding" in caplog.text
    assert again.built and torch.equal(again.features, first.features)
    assert np.load(features_file).shape == tuple(first.features.shape)
