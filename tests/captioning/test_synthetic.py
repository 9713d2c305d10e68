import csv
import hashlib

import pytest

from llm_caption.captioning.synthetic import SceneConfig, generate_scenes
from llm_caption.captioning.text import tokenize


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _captions(folder):
    with open(folder / "captions.txt", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    config = SceneConfig(n_images=12, image_size=64, seed=7)
    generate_scenes(tmp_path / "a", config)
    generate_scenes(tmp_path / "b", config)
    generate_scenes(tmp_path / "c", SceneConfig(n_images=12, image_size=64, seed=8))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert _captions(tmp_path / "a") != _captions(tmp_path / "c")


def test_layout_captions_and_splits(tmp_path):
    config = SceneConfig(n_images=30, image_size=64, seed=1)
    manifest = generate_scenes(tmp_path, config)
    header, rows = _captions(tmp_path)
    assert header == ["image", "caption"]
    assert len(rows) == 150 and manifest["n_captions"] == 150
    images = sorted(p.name for p in (tmp_path / "images").glob("*.jpg"))
    assert len(images) == 30
    by_image = {}
    for name, caption in rows:
        by_image.setdefault(name, []).append(caption)
    assert sorted(by_image) == images
    colours, shapes = set(config.colours), set(config.shapes)
    for captions in by_image.values():
        assert len(set(captions)) == 5  # five differently worded captions
        words = [set(tokenize(c)) for c in captions]
        # every caption names the same objects
        assert all(w & colours == words[0] & colours and w & shapes == words[0] & shapes for w in words)
    splits = {s: (tmp_path / "splits" / f"{s}.txt").read_text().split() for s in ("train", "dev", "test")}
    assert [len(v) for v in splits.values()] == [24, 3, 3]
    assert sorted(sum(splits.values(), [])) == images  # disjoint and complete


def test_unchanged_config_is_kept_and_foreign_folder_refused(tmp_path):
    config = SceneConfig(n_images=5, image_size=32, seed=3)
    generate_scenes(tmp_path / "s", config)
    stamp = (tmp_path / "s" / "captions.txt").stat().st_mtime_ns
    generate_scenes(tmp_path / "s", config)
    assert (tmp_path / "s" / "captions.txt").stat().st_mtime_ns == stamp
    generate_scenes(tmp_path / "s", SceneConfig(n_images=4, image_size=32, seed=3))  # regenerated, old files gone
    assert len(list((tmp_path / "s" / "images").iterdir())) == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic-scenes folder"):
        generate_scenes(tmp_path / "mine", config)


def test_from_params_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        SceneConfig.from_params({"n_image": 10}, seed=1)
    assert SceneConfig.from_params({"n_images": 10, "shapes": ["circle", "square"]}, seed=1).shapes == ("circle", "square")
