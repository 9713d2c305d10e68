"""Parsing both Flickr8k layouts from tiny folders with real JPEGs."""

import numpy as np
import pytest
from PIL import Image

from llm_caption.captioning.sources import prepare_source, read_caption_source


def write_jpeg(path, seed=0, size=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=85)
    return path


def test_kaggle_layout_with_quoted_commas_and_splits(tmp_path):
    for i in range(3):
        write_jpeg(tmp_path / "Images" / f"im{i}.jpg", seed=i)
    (tmp_path / "captions.txt").write_text(
        'image,caption\n'
        'im0.jpg,A dog runs .\n'
        'im0.jpg,"A dog, brown, runs ."\n'
        'im1.jpg,A cat sits .\n'
        'im2.jpg,A bird flies .\n', encoding="utf-8")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("im0.jpg\nim1.jpg\n")
    (tmp_path / "splits" / "dev.txt").write_text("im2.jpg\n")
    src = read_caption_source(tmp_path)
    assert src.layout == "kaggle" and src.image_dir.name == "Images"
    assert src.n_caption_lines == 4 and not src.rejected
    assert src.captions[1].caption_raw == "A dog, brown, runs ." and src.captions[1].line == 3
    assert src.image_files == ["im0.jpg", "im1.jpg", "im2.jpg"]
    assert {k: [e[0] for e in v] for k, v in src.split_lists.items()} == {"train": ["im0.jpg", "im1.jpg"], "val": ["im2.jpg"]}


def test_original_layout_token_file_and_split_files(tmp_path):
    for i in range(2):
        write_jpeg(tmp_path / "Flicker8k_Dataset" / f"{1000 + i}_ab.jpg", seed=i)
    (tmp_path / "Flickr8k.token.txt").write_text(
        "1000_ab.jpg#0\tA man rides a bike .\n"
        "1000_ab.jpg#1\tA person on a bicycle .\n"
        "1001_ab.jpg#0\tTwo kids play .\n"
        "1001_ab.jpg no tab here\n"
        "1001_ab.jpg#x\tbad number .\n", encoding="utf-8")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("1000_ab.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("1001_ab.jpg\n")
    src = read_caption_source(tmp_path)
    assert src.layout == "original"
    assert [(c.image_id, c.line) for c in src.captions] == [("1000_ab.jpg", 1), ("1000_ab.jpg", 2), ("1001_ab.jpg", 3)]
    assert src.n_caption_lines == 5
    assert [(r["line"], r["reason"].split(":")[0]) for r in src.rejected] == [(4, "malformed_row"), (5, "malformed_row")]
    assert "Flickr8k.token.txt" in src.rejected[0]["source"]
    assert set(src.split_lists) == {"train", "test"}


def test_malformed_csv_row_is_rejected_with_line(tmp_path):
    write_jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,fine .\na.jpg,too,many,fields\na.jpg\n")
    src = read_caption_source(tmp_path)
    assert len(src.captions) == 1
    assert [(r["line"], r["reason"]) for r in src.rejected] == [
        (3, "malformed_row: expected 2 fields (image,caption), got 4"),
        (4, "malformed_row: expected 2 fields (image,caption), got 1")]


def test_missing_folder_and_unknown_layout_name_the_path_and_parameter(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*caption_data\.data_dir.*does not exist"):
        read_caption_source(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no known caption layout"):
        read_caption_source(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.txt").write_text("img,text\n")
    with pytest.raises(ValueError, match="line 1: expected the header 'image,caption'"):
        read_caption_source(tmp_path)


def test_prepare_source_checks_the_folder_and_the_kind(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'/no/such/flickr8k' \(set by parameter caption_data.data_dir\) does not exist"):
        prepare_source("folder", "/no/such/flickr8k")
    with pytest.raises(ValueError, match="caption_data.source must be one of"):
        prepare_source("flickr", tmp_path)
    info = prepare_source("synthetic", tmp_path / "scenes", {"n_images": 4, "image_size": 32}, seed=0)
    assert info == {"kind": "synthetic", "n_images": 4, "n_captions": 20, "data_dir": str(tmp_path / "scenes")}
    assert read_caption_source(tmp_path / "scenes").n_caption_lines == 20
