"""Parsing both Flickr8k layouts from tiny folders with real JPEGs."""

import codecs
import logging

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


# -- hostile caption files: every line accounted for, never a crash -----------------------------
def kaggle_folder(root, body: bytes, header: bytes = b"image,caption\n", n_images=2):
    """A Kaggle-layout folder: ``n_images`` real JPEGs (a0.jpg, a1.jpg, ...), ``captions.txt`` = header + body."""
    for i in range(n_images):
        write_jpeg(root / "images" / f"a{i}.jpg", seed=i, size=16)
    (root / "captions.txt").write_bytes(header + body)
    return root


def test_a_latin1_byte_rejects_that_line_with_its_number_and_the_rest_is_read(tmp_path):
    body = "a0.jpg,A café .\n".encode("latin-1") + b"a1.jpg,A dog runs .\na0.jpg,A cat .\n"
    src = read_caption_source(kaggle_folder(tmp_path, body))
    assert [(c.line, c.caption_raw) for c in src.captions] == [(3, "A dog runs ."), (4, "A cat .")]
    (bad,) = src.rejected
    assert (bad["line"], bad["record"]) == (2, "a0.jpg,A caf\\xe9 .")
    assert bad["reason"].startswith("invalid_utf8: byte 12 (0xe9) is not UTF-8")
    assert bad["source"] == str(tmp_path / "captions.txt")
    assert src.n_caption_lines == len(src.captions) + len(src.rejected) == 3


def test_a_utf8_bom_is_skipped_in_every_caption_file(tmp_path):
    bom = codecs.BOM_UTF8
    kaggle = kaggle_folder(tmp_path / "kaggle", b"a0.jpg,A dog .\n", header=bom + b"image,caption\n")
    (kaggle / "splits").mkdir()
    (kaggle / "splits" / "train.txt").write_bytes(bom + b"a0.jpg\n")
    src = read_caption_source(kaggle)
    assert [(c.image_id, c.line) for c in src.captions] == [("a0.jpg", 2)] and not src.rejected
    assert src.split_lists == {"train": [("a0.jpg", str(kaggle / "splits" / "train.txt"), 1)]}

    original = tmp_path / "original"
    write_jpeg(original / "Flicker8k_Dataset" / "b.jpg")
    (original / "Flickr8k.token.txt").write_bytes(bom + b"b.jpg#0\tA bird .\n")
    src = read_caption_source(original)
    assert [(c.image_id, c.line) for c in src.captions] == [("b.jpg", 1)] and not src.rejected


@pytest.mark.parametrize("ending", [b"\r", b"\r\n", b"\n"], ids=["cr", "crlf", "lf"])
def test_every_line_ending_splits_caption_lines(tmp_path, ending):
    kaggle = kaggle_folder(tmp_path / "kaggle", ending.join([b"a0.jpg,A dog .", b"a1.jpg,\"A cat, grey .\"", b""]),
                           header=b"image,caption" + ending)
    src = read_caption_source(kaggle)
    assert [(c.line, c.image_id, c.caption_raw) for c in src.captions] == [(2, "a0.jpg", "A dog ."),
                                                                          (3, "a1.jpg", "A cat, grey .")]
    original = tmp_path / "original"
    write_jpeg(original / "Flicker8k_Dataset" / "b.jpg")
    (original / "Flickr8k.token.txt").write_bytes(ending.join([b"b.jpg#0\tA bird .", b"b.jpg#1\tA wing .", b""]))
    assert [c.line for c in read_caption_source(original).captions] == [1, 2]


def test_an_unclosed_quote_rejects_its_line_only(tmp_path):
    body = b'a0.jpg,"A dog, running .\na1.jpg,A cat .\na0.jpg,"A ""quoted"" dog ."\n'
    src = read_caption_source(kaggle_folder(tmp_path, body))
    assert [(c.line, c.caption_raw) for c in src.captions] == [(3, "A cat ."), (4, 'A "quoted" dog .')]
    (bad,) = src.rejected
    assert bad["line"] == 2 and bad["reason"].startswith("malformed_row: unexpected end of data")
    assert "must close on its own line" in bad["reason"]


def test_a_caption_longer_than_the_csv_field_limit_is_rejected(tmp_path):
    body = b"a0.jpg," + b"x" * 200_000 + b"\na1.jpg,A cat .\n"
    src = read_caption_source(kaggle_folder(tmp_path, body))
    assert [c.line for c in src.captions] == [3]
    assert src.rejected[0]["line"] == 2 and "field larger than field limit" in src.rejected[0]["reason"]


def test_an_empty_caption_file_is_a_named_failure(tmp_path):
    with pytest.raises(ValueError, match=r"captions.txt: no caption lines; the caption file is empty"):
        read_caption_source(kaggle_folder(tmp_path / "zero", b"", header=b""))
    with pytest.raises(ValueError, match=r"captions.txt: no caption lines after the header 'image,caption'"):
        read_caption_source(kaggle_folder(tmp_path / "header_only", b"\n  \n"))
    original = tmp_path / "original"
    write_jpeg(original / "Flicker8k_Dataset" / "b.jpg")
    (original / "Flickr8k.token.txt").write_bytes(codecs.BOM_UTF8 + b"\n")
    with pytest.raises(ValueError, match=r"Flickr8k.token.txt: no caption lines; the caption file is empty"):
        read_caption_source(original)


def test_an_empty_split_list_is_a_warning_naming_it(tmp_path, caplog):
    kaggle = kaggle_folder(tmp_path, b"a0.jpg,A dog .\n")
    (kaggle / "splits").mkdir()
    (kaggle / "splits" / "train.txt").write_bytes(b"a0.jpg\n")
    (kaggle / "splits" / "test.txt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="llm_caption.captioning.sources"):
        read_caption_source(kaggle)
    assert f"Split list {kaggle / 'splits' / 'test.txt'} is empty" in caplog.text


def test_a_line_of_separators_is_a_record_not_a_blank(tmp_path):
    src = read_caption_source(kaggle_folder(tmp_path, b"a0.jpg,A dog .\n , \n\n"))
    assert src.n_caption_lines == 2 and [(c.line, c.image_id) for c in src.captions] == [(2, "a0.jpg"), (3, "")]
