"""Property tests of the caption readers: no content of a caption file makes the read raise (an empty file
or a wrong header is the one named failure), and every non-blank line read is exactly one record,
accepted or rejected, all the way through validation.

Each example is real bytes written into a small folder with real JPEGs and read by the code the
pipeline runs; the rejected records are written as the rejects file is.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llm_caption.captioning.sources import read_caption_source
from llm_caption.captioning.validation import assemble_caption_dataset

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)
IMAGES = ["a0.jpg", "a1.jpg", "a2.jpg"]
REJECTED_COLUMNS = ["kind", "source", "line", "image", "reason", "record"]

#: Pieces that steer random bytes towards the reader's edge cases.
FRAGMENTS = [b"\n", b"\r", b"\r\n", codecs.BOM_UTF8, b"\xe9", b"\xff", b"\xc3", b",", b'"', b'""', b"\t", b"#",
             b"#0", b" ", b"\x00", b"\x0b", b"a0.jpg", b"a1.jpg", b"ghost.jpg", b"A dog runs .", b"x" * 140_000]
file_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=6)), max_size=30).map(b"".join),
)
line_endings = st.sampled_from(["\n", "\r\n", "\r"])


def lines_of(data: bytes) -> list[bytes]:
    """The lines of ``data`` by the readers' contract: a leading BOM skipped; LF, CRLF or CR end a line."""
    parts = re.split(rb"\r\n|\r|\n", data.removeprefix(codecs.BOM_UTF8))
    return parts[:-1] if parts and parts[-1] == b"" else parts


def is_record(line: bytes) -> bool:
    """A line is a record unless it decodes to blank text (a line that does not decode is a rejected record)."""
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True


def check_folder(folder: Path, expected_lines: list[int]) -> None:
    """Read and validate ``folder``; every expected line is one record, and the counts add up."""
    source = read_caption_source(folder)
    lines = sorted([c.line for c in source.captions] + [r["line"] for r in source.rejected])
    assert lines == expected_lines
    assert source.n_caption_lines == len(source.captions) + len(source.rejected) == len(expected_lines)
    result = assemble_caption_dataset(source, workers=1)
    counts = result.counts
    assert counts["accepted_captions"] + counts["rejected_captions"] == counts["input_captions"] == len(expected_lines)
    assert counts["accepted_images"] + counts["rejected_images"] == counts["input_images"]
    rejected_lines = [r["line"] for r in result.rejected if r["kind"] == "caption"]
    assert len(set(rejected_lines)) == len(rejected_lines) and set(rejected_lines) <= set(expected_lines)
    frame = pd.DataFrame(result.rejected, columns=REJECTED_COLUMNS).astype({"line": "Int64"})
    frame.to_json(folder / "rejected.jsonl", orient="records", lines=True, force_ascii=False)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    """A Kaggle-layout folder with three real JPEGs; each example rewrites ``captions.txt``."""
    folder = tmp_path_factory.mktemp("kaggle")
    for i, name in enumerate(IMAGES):
        (folder / "images").mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            folder / "images" / name, format="JPEG")
    return folder


@pytest.fixture(scope="module")
def original(tmp_path_factory, kaggle) -> Path:
    """The same three JPEGs in the original Flickr8k layout; each example rewrites ``Flickr8k.token.txt``."""
    folder = tmp_path_factory.mktemp("original")
    (folder / "Flicker8k_Dataset").mkdir()
    for name in IMAGES:
        (folder / "Flicker8k_Dataset" / name).write_bytes((kaggle / "images" / name).read_bytes())
    return folder


@PROPERTY_SETTINGS
@given(body=file_bytes, bom=st.booleans())
def test_any_bytes_after_the_header_never_raise_and_each_line_is_one_record(kaggle, body, bom):
    data = (codecs.BOM_UTF8 if bom else b"") + b"image,caption\n" + body
    (kaggle / "captions.txt").write_bytes(data)
    expected = [n for n, line in enumerate(lines_of(data), start=1) if n > 1 and is_record(line)]
    if not expected:
        with pytest.raises(ValueError, match="captions.txt: no caption lines after the header"):
            read_caption_source(kaggle)
        return
    check_folder(kaggle, expected)


@PROPERTY_SETTINGS
@given(data=file_bytes)
def test_any_bytes_as_the_whole_caption_file_read_or_fail_naming_it(kaggle, data):
    (kaggle / "captions.txt").write_bytes(data)
    try:
        source = read_caption_source(kaggle)
    except ValueError as err:
        assert str(kaggle / "captions.txt") in str(err)
        assert "line 1: expected the header 'image,caption'" in str(err) or "no caption lines" in str(err)
        return
    assert source.n_caption_lines == len(source.captions) + len(source.rejected)


@PROPERTY_SETTINGS
@given(data=file_bytes)
def test_any_bytes_as_a_token_file_never_raise_and_each_line_is_one_record(original, data):
    (original / "Flickr8k.token.txt").write_bytes(data)
    expected = [n for n, line in enumerate(lines_of(data), start=1) if is_record(line)]
    if not expected:
        with pytest.raises(ValueError, match="Flickr8k.token.txt: no caption lines"):
            read_caption_source(original)
        return
    check_folder(original, expected)


caption_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30)


@PROPERTY_SETTINGS
@given(rows=st.lists(st.tuples(st.sampled_from(IMAGES + ["ghost.jpg", " a1.jpg "]), caption_text), min_size=1,
                     max_size=12), ending=line_endings, quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
def test_captions_written_by_a_csv_writer_come_back_unchanged(kaggle, rows, ending, quoting):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=ending, quoting=quoting)
    writer.writerow(["image", "caption"])
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    (kaggle / "captions.txt").write_bytes(data)
    expected = list(range(2, len(rows) + 2))  # one line a row: a caption holds no line break
    source = read_caption_source(kaggle)
    assert not source.rejected
    assert [(c.image_id, c.caption_raw) for c in source.captions] == [(image.strip(), text) for image, text in rows]
    check_folder(kaggle, expected)
