"""Every bad-input case, built from real bytes in a temp folder, ends up rejected with its reason."""

import io

import numpy as np
import pytest
from PIL import Image

from llm_caption.captioning.sources import read_caption_source
from llm_caption.captioning.validation import (assemble_caption_dataset, check_image, check_rejected_share,
                                                seeded_split)


def jpeg_bytes(seed=0, size=64):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_bad_folder(root, n_good=24):
    """Kaggle layout: ``n_good`` good images (2 captions each) plus one of every bad case."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(n_good):
        (images / f"good{i:02d}.jpg").write_bytes(jpeg_bytes(i))
        rows += [f"good{i:02d}.jpg,A red ball number {i} .", f"good{i:02d}.jpg,\"A ball, red .\""]
    full = jpeg_bytes(99)
    (images / "zero.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (images / "corrupt.jpg").write_bytes(full[:20] + bytes(np.random.default_rng(5).integers(0, 256, 2000, dtype=np.uint8)))
    rows += ["zero.jpg,A zero byte image .",
             "truncated.jpg,A cut off image .",
             "corrupt.jpg,A garbled image .",
             "ghost.jpg,An image that is not there .",
             "good00.jpg,  ?!. 42 ",
             "good01.jpg,one,two,three"]
    (root / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def by_image(rejected, kind):
    return {r["image"]: r for r in rejected if r["kind"] == kind}


def test_check_image_cases(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes())
    gray = tmp_path / "gray.png"
    Image.new("L", (10, 7), 128).save(gray)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "trunc.jpg").write_bytes(jpeg_bytes()[:400])
    assert check_image(good).ok and (check_image(good).width, check_image(good).height) == (64, 64)
    assert check_image(gray).ok and (check_image(gray).width, check_image(gray).height) == (10, 7)
    assert check_image(tmp_path / "nope.jpg").reason.startswith("missing_image")
    assert check_image(tmp_path / "zero.jpg").reason == "empty_file: zero bytes"
    trunc = check_image(tmp_path / "trunc.jpg")
    assert not trunc.ok and trunc.reason.startswith("corrupt_image") and "truncated" in trunc.reason.lower()


def test_every_bad_case_is_rejected_and_counts_add_up(tmp_path):
    source = read_caption_source(make_bad_folder(tmp_path))
    result = assemble_caption_dataset(source, seed=1, workers=2)
    c = result.counts
    assert (c["input_captions"], c["accepted_captions"], c["rejected_captions"]) == (54, 48, 6)
    assert (c["input_images"], c["accepted_images"], c["rejected_images"]) == (28, 24, 4)
    assert c["rejected_images_by_reason"] == {"corrupt_image": 2, "empty_file": 1, "missing_image": 1}
    assert c["rejected_captions_by_reason"] == {"empty_caption": 1, "image_rejected": 3, "malformed_row": 1,
                                                "unknown_image": 1}
    images = by_image(result.rejected, "image")
    assert images["zero.jpg"]["reason"] == "empty_file: zero bytes"
    assert "truncated" in images["truncated.jpg"]["reason"].lower()
    assert images["corrupt.jpg"]["reason"].startswith("corrupt_image")
    assert images["ghost.jpg"]["reason"].startswith("missing_image") and images["ghost.jpg"]["line"] == 53
    captions = by_image(result.rejected, "caption")
    assert captions["ghost.jpg"]["reason"] == "unknown_image: no image file named ghost.jpg"
    assert captions["zero.jpg"]["reason"] == "image_rejected: empty_file"
    empty = next(r for r in result.rejected if r["reason"].startswith("empty_caption"))
    assert (empty["line"], empty["image"], empty["record"]) == (54, "good00.jpg", "  ?!. 42 ")
    malformed = next(r for r in result.rejected if r["reason"].startswith("malformed_row"))
    assert malformed["line"] == 55 and malformed["source"].endswith("captions.txt")
    # accepted captions are cleaned; accepted images have sizes and absolute paths
    assert set(result.captions["caption"]) >= {"a ball red", "a red ball number"}
    assert len(result.images) == 24 and result.images["width"].eq(64).all()
    assert all(p.startswith("/") for p in result.images["image_path"])
    # a seeded 80/10/10 split by image: disjoint, complete, the same again with the same seed
    sets = {s: set(g) for s, g in result.images.groupby("split")["image_id"]}
    assert sum(len(v) for v in sets.values()) == 24 and len(set.union(*sets.values())) == 24
    assert set(result.captions.groupby("image_id")["split"].nunique()) == {1}
    again = assemble_caption_dataset(source, seed=1, workers=1)
    assert again.images.equals(result.images)


def test_split_lists_are_followed_and_conflicts_rejected(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = [f"i{k}.jpg" for k in range(6)]
    for k, name in enumerate(names):
        (images / name).write_bytes(jpeg_bytes(k, 16))
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a photo .\n" for n in names))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("i0.jpg\ni1.jpg\ni4.jpg\n")
    (tmp_path / "splits" / "dev.txt").write_text("i2.jpg\n")
    (tmp_path / "splits" / "test.txt").write_text("i3.jpg\ni4.jpg\nlisted_only.jpg\n")
    result = assemble_caption_dataset(read_caption_source(tmp_path), workers=1)
    assert dict(zip(result.images["image_id"], result.images["split"])) == {
        "i0.jpg": "train", "i1.jpg": "train", "i2.jpg": "val", "i3.jpg": "test"}
    rejected = by_image(result.rejected, "image")
    assert rejected["i4.jpg"]["reason"] == "in_multiple_splits: train (train.txt:3), test (test.txt:2)"
    assert rejected["i5.jpg"]["reason"].startswith("not_in_split_lists")
    assert rejected["listed_only.jpg"]["reason"].startswith("missing_image")
    assert rejected["listed_only.jpg"]["source"].endswith("test.txt") and rejected["listed_only.jpg"]["line"] == 3
    assert result.counts["split_source"] == "split_lists"


def test_seeded_split_shares_and_determinism():
    ids = [f"x{i}" for i in range(100)]
    a = seeded_split(ids, (0.8, 0.1, 0.1), seed=3)
    assert a == seeded_split(reversed(ids), (0.8, 0.1, 0.1), seed=3)
    assert a != seeded_split(ids, (0.8, 0.1, 0.1), seed=4)
    assert sorted(a.values()).count("train") == 80 and list(a.values()).count("test") == 10


def test_rejected_share_failure_message():
    counts = {"input_captions": 10, "rejected_captions": 3, "rejected_captions_by_reason": {"empty_caption": 3},
              "input_images": 4, "rejected_images": 0, "rejected_images_by_reason": {}}
    check_rejected_share(counts, 0.3)
    with pytest.raises(ValueError, match=r"3 of 10 captions \(30.0%; \{'empty_caption': 3\}\) > "
                                         r"caption_data.max_rejected_share=0.2; every rejected record is in x.jsonl"):
        check_rejected_share(counts, 0.2, "x.jsonl")


def test_duplicate_caption_lines_are_rejected_naming_the_first_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        (images / f"i{k}.jpg").write_bytes(jpeg_bytes(k, 16))
    (tmp_path / "captions.txt").write_text(
        "image,caption\n"
        "i0.jpg,A red ball .\n"       # 2
        "i0.jpg,A red ball .\n"       # 3 identical to 2
        "i1.jpg,A red ball .\n"       # 4 same words, other image: kept
        "i0.jpg,a RED ball!\n"        # 5 same words as 2 after cleaning
        "i0.jpg,A blue ball .\n"      # 6
        "i0.jpg,A red ball .\n",      # 7 identical to 2 again
        encoding="utf-8")
    result = assemble_caption_dataset(read_caption_source(tmp_path), workers=1)
    duplicates = [(r["line"], r["image"], r["reason"]) for r in result.rejected if r["kind"] == "caption"]
    reason = "duplicate_caption: duplicate of line 2 (same image, same words after cleaning)"
    assert duplicates == [(3, "i0.jpg", reason), (5, "i0.jpg", reason), (7, "i0.jpg", reason)]
    assert sorted(result.captions["caption"]) == ["a blue ball", "a red ball", "a red ball"]
    c = result.counts
    assert (c["input_captions"], c["accepted_captions"], c["rejected_captions"]) == (6, 3, 3)
    assert c["rejected_captions_by_reason"] == {"duplicate_caption": 3}
