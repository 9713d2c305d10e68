"""Captioned-image folders on disk: layout detection and parsing, nothing dropped silently.

Two layouts are read, each by a (detector, parser) pair in :data:`LAYOUTS`:

* ``kaggle`` -- ``images/`` (or ``Images/``) + ``captions.txt`` (CSV with header ``image,caption``)
  + optional ``splits/{train,dev,test}.txt`` (``val.txt`` is accepted for ``dev``);
* ``original`` -- ``Flicker8k_Dataset/`` (or ``Flickr8k_Dataset/``) + ``Flickr8k.token.txt``
  (``<image>#<n>\\t<caption>``) + optional ``Flickr_8k.{train,dev,test}Images.txt``.

Parsing yields every non-blank caption line as either a :class:`CaptionRecord` or a rejection that
names the file, the line and the reason (``invalid_utf8``, ``malformed_row``); no content of the file
makes the read raise. Files are read as UTF-8 with an optional byte-order mark, and ``\\n``, ``\\r\\n``
or a lone ``\\r`` ends a line. In ``captions.txt`` each line is one CSV record: a quoted caption (with
commas) must close on its line. Only an unusable file raises: a missing or wrong header, or no caption
line at all. Image files are checked later (:mod:`.validation`).
"""

from __future__ import annotations

import codecs
import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLIT_NAMES = {"train": "train", "dev": "val", "val": "val", "test": "test"}  # file name -> split


@dataclass(frozen=True)
class CaptionRecord:
    """One caption line as read from its file."""

    source: str  # file it came from
    line: int  # 1-based line number in that file
    image_id: str
    caption_raw: str


@dataclass
class RawCaptionSource:
    """Everything read from one folder, before any image is opened."""

    data_dir: Path
    layout: str
    image_dir: Path
    captions: list[CaptionRecord]
    rejected: list[dict[str, Any]]  # caption lines that could not be parsed
    image_files: list[str]  # file names found in image_dir
    split_lists: dict[str, list[tuple[str, str, int]]] | None = None  # split -> [(image_id, source, line)]
    n_caption_lines: int = 0  # every non-blank data line of the caption file (= captions + rejected)
    extra: dict[str, Any] = field(default_factory=dict)


def reject(source: str | Path, reason: str, record: Any, *, line: int | None = None,
           image: str | None = None, kind: str = "caption") -> dict[str, Any]:
    """A rejected record in the ``caption_rejected`` format: ``kind``, ``source``, ``line``/``image``, ``reason``, ``record``."""
    return {"kind": kind, "source": str(source), "line": line, "image": image, "reason": reason, "record": record}


def _first_existing(base: Path, names: tuple[str, ...]) -> Path | None:
    return next((base / n for n in names if (base / n).exists()), None)


def _list_images(image_dir: Path) -> list[str]:
    return sorted(p.name for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_lines(path: Path) -> list[bytes]:
    """The lines of a text file as bytes: a UTF-8 byte-order mark at the start is skipped, and ``\\n``,
    ``\\r\\n`` or a lone ``\\r`` ends a line (so files from any platform split the same way)."""
    return path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines()


def _decode_line(raw: bytes) -> tuple[str, str | None]:
    """``(text, None)`` for a UTF-8 line; ``(text with the bad bytes escaped, reason)`` for one that is not."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.start + 1]
        return (raw.decode("utf-8", "backslashreplace"),
                f"invalid_utf8: byte {err.start} (0x{bad.hex()}) is not UTF-8 ({err.reason}); save the file as UTF-8")


def _read_split_file(path: Path) -> list[tuple[str, str, int]]:
    """``(image name, file, line)`` for every non-blank line; bytes that are not UTF-8 stay visible as ``\\xNN``
    (such a name matches no image and is rejected as ``missing_image`` with this file and line)."""
    entries = []
    for n, raw in enumerate(_read_lines(path), start=1):
        name = raw.decode("utf-8", "backslashreplace").strip()
        if name:
            entries.append((name, str(path), n))
    if not entries:
        logger.warning("Split list %s is empty: it names no image", path)
    return entries


def _data_lines(lines: list[bytes], first: int) -> list[tuple[int, str, str | None]]:
    """``(line number, text, invalid_utf8 reason or None)`` for every non-blank line from line ``first`` on."""
    out = []
    for number, raw in enumerate(lines[first - 1:], start=first):
        text, error = _decode_line(raw)
        if error or text.strip():
            out.append((number, text, error))
    return out


def _no_caption_lines(path: Path, what: str) -> ValueError:
    """The error for a caption file with nothing to read (an empty file is unusable, not a source of 0 records)."""
    return ValueError(f"{path}: no caption lines{what}; the caption file is empty "
                      "(its folder is set by parameter caption_data.data_dir)")


# -- kaggle layout --------------------------------------------------------------------------
def _detect_kaggle(data_dir: Path) -> bool:
    return (data_dir / "captions.txt").is_file() and _first_existing(data_dir, ("images", "Images")) is not None


def _check_kaggle_header(path: Path, lines: list[bytes]) -> None:
    """Raise naming the file unless it has lines and line 1 is the header ``image,caption``."""
    if not lines:
        raise _no_caption_lines(path, "")
    text, _ = _decode_line(lines[0])
    try:
        header = next(csv.reader([text]), [])
    except csv.Error:  # a header line longer than the csv field limit
        header = [text[:100]]
    if [h.strip().lower() for h in header] != ["image", "caption"]:
        raise ValueError(f"{path}, line 1: expected the header 'image,caption', got {header!r}")


def _kaggle_row(path: Path, number: int, text: str) -> CaptionRecord | dict[str, Any]:
    """One data line of ``captions.txt``: a caption, or a ``malformed_row`` rejection.

    Each line is one CSV record (quotes must close on their line), so a stray quote cannot swallow the
    lines after it and every line is accounted for on its own.
    """
    try:
        row = next(csv.reader([text], strict=True))
    except csv.Error as err:
        return reject(path, f"malformed_row: {err} (a quoted caption must close on its own line)", text, line=number)
    if len(row) != 2:
        return reject(path, f"malformed_row: expected 2 fields (image,caption), got {len(row)}", text, line=number)
    return CaptionRecord(str(path), number, row[0].strip(), row[1])


def _parse_kaggle(data_dir: Path) -> RawCaptionSource:
    image_dir = _first_existing(data_dir, ("images", "Images"))
    path = data_dir / "captions.txt"
    all_lines = _read_lines(path)
    _check_kaggle_header(path, all_lines)
    captions: list[CaptionRecord] = []
    rejected: list[dict[str, Any]] = []
    lines = _data_lines(all_lines, first=2)
    if not lines:
        raise _no_caption_lines(path, " after the header 'image,caption'")
    for number, text, error in lines:
        item = reject(path, error, text, line=number) if error else _kaggle_row(path, number, text)
        (captions if isinstance(item, CaptionRecord) else rejected).append(item)
    splits = None
    split_dir = data_dir / "splits"
    if split_dir.is_dir():
        splits = {}
        for stem in ("train", "dev", "val", "test"):
            file = split_dir / f"{stem}.txt"
            if file.is_file():
                splits.setdefault(SPLIT_NAMES[stem], []).extend(_read_split_file(file))
        splits = splits or None
    return RawCaptionSource(data_dir, "kaggle", image_dir, captions, rejected, _list_images(image_dir), splits,
                            len(lines))


# -- original Flickr8k layout -------------------------------------------------------------------
ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
ORIGINAL_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}


def _detect_original(data_dir: Path) -> bool:
    return (data_dir / "Flickr8k.token.txt").is_file() and _first_existing(data_dir, ORIGINAL_IMAGE_DIRS) is not None


def _original_row(path: Path, number: int, text: str) -> CaptionRecord | dict[str, Any]:
    """One line of ``Flickr8k.token.txt`` (``<image>#<n>\\t<caption>``): a caption or a ``malformed_row`` rejection."""
    fields = text.split("\t")
    if len(fields) != 2:
        return reject(path, f"malformed_row: expected 2 tab-separated fields (<image>#<n>, caption), got {len(fields)}",
                      text, line=number)
    key, caption = fields
    image_id, sep, index = key.strip().rpartition("#")
    if not sep or not image_id or not index.isdigit():
        return reject(path, f"malformed_row: first field must be <image>#<n>, got {key!r}", text, line=number)
    return CaptionRecord(str(path), number, image_id, caption)


def _parse_original(data_dir: Path) -> RawCaptionSource:
    image_dir = _first_existing(data_dir, ORIGINAL_IMAGE_DIRS)
    path = data_dir / "Flickr8k.token.txt"
    captions: list[CaptionRecord] = []
    rejected: list[dict[str, Any]] = []
    lines = _data_lines(_read_lines(path), first=1)
    if not lines:
        raise _no_caption_lines(path, "")
    for number, text, error in lines:
        item = reject(path, error, text, line=number) if error else _original_row(path, number, text)
        (captions if isinstance(item, CaptionRecord) else rejected).append(item)
    splits: dict[str, list[tuple[str, str, int]]] = {}
    for split, name in ORIGINAL_SPLIT_FILES.items():
        file = data_dir / name
        if file.is_file():
            splits[split] = _read_split_file(file)
    return RawCaptionSource(data_dir, "original", image_dir, captions, rejected, _list_images(image_dir),
                            splits or None, len(lines))


LAYOUTS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], RawCaptionSource]]] = {
    "kaggle": (_detect_kaggle, _parse_kaggle),
    "original": (_detect_original, _parse_original),
}


def read_caption_source(data_dir: str | Path, layout: str = "auto", param_name: str = "caption_data.data_dir") -> RawCaptionSource:
    """Parse the captioned-image folder ``data_dir`` (layout ``auto``, ``kaggle`` or ``original``).

    Raises ``FileNotFoundError`` naming the path and ``param_name`` when the folder does not exist,
    and ``ValueError`` when no known layout is found in it.
    """
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"caption source folder {str(data_dir)!r} (set by parameter {param_name}) "
                                f"does not exist (resolved to {path.resolve()})")
    if layout == "auto":
        found = [name for name, (detect, _) in LAYOUTS.items() if detect(path)]
        if not found:
            raise ValueError(f"{path} (set by parameter {param_name}) holds no known caption layout: expected "
                             "captions.txt + images/ (Kaggle) or Flickr8k.token.txt + Flicker8k_Dataset/ (original)")
        layout = found[0]
    elif layout not in LAYOUTS:
        raise ValueError(f"unknown caption layout {layout!r}; known: {sorted(LAYOUTS)}")
    elif not LAYOUTS[layout][0](path):
        raise ValueError(f"{path} (set by parameter {param_name}) is not in the {layout!r} layout")
    source = LAYOUTS[layout][1](path)
    logger.info("Read %s (%s layout): %d caption lines, %d image files, split lists: %s", path, layout,
                source.n_caption_lines, len(source.image_files),
                {k: len(v) for k, v in source.split_lists.items()} if source.split_lists else "none")
    return source


# -- where the folder comes from ------------------------------------------------------------
def _prepare_folder(data_dir: Path, options: dict[str, Any], seed: int) -> dict[str, Any]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"caption source folder {str(data_dir)!r} (set by parameter caption_data.data_dir) "
                                f"does not exist (resolved to {data_dir.resolve()})")
    return {"kind": "folder"}


def _prepare_synthetic(data_dir: Path, options: dict[str, Any], seed: int) -> dict[str, Any]:
    from .synthetic import SceneConfig, generate_scenes

    manifest = generate_scenes(data_dir, SceneConfig.from_params(options, seed=seed))
    return {"kind": "synthetic", "n_images": manifest["n_images"], "n_captions": manifest["n_captions"]}


SOURCE_KINDS: dict[str, Callable[[Path, dict[str, Any], int], dict[str, Any]]] = {
    "synthetic": _prepare_synthetic,  # generate scenes into data_dir (kept when the config is unchanged)
    "folder": _prepare_folder,  # read an existing folder (Flickr8k in either layout)
}


def prepare_source(kind: str, data_dir: str | Path, options: dict[str, Any] | None = None, seed: int = 42) -> dict[str, Any]:
    """Make sure the caption folder exists (generating it for ``synthetic``); return a description."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"caption_data.source must be one of {sorted(SOURCE_KINDS)}, got {kind!r}")
    info = SOURCE_KINDS[kind](Path(data_dir), dict(options or {}), int(seed))
    info["data_dir"] = str(data_dir)
    return info
