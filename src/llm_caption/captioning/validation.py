"""From a parsed caption folder to accepted images/captions and a complete list of rejections.

Every caption line and every image name ends up either accepted or in the rejected list with
its source file, line (or image) and a reason; :func:`assemble_caption_dataset` asserts
``accepted + rejected == input`` for both. Reason codes (the part before ``:``):

images   ``missing_image`` (named but no file), ``empty_file`` (zero bytes), ``corrupt_image``
         (does not decode fully), ``not_in_split_lists``, ``in_multiple_splits``, ``no_captions``;
captions ``invalid_utf8`` (the line is not UTF-8), ``malformed_row``, ``empty_caption``,
         ``duplicate_caption`` (the same image and cleaned caption as an earlier line, named),
         ``unknown_image`` (no such image file), ``image_rejected`` (its image was rejected for one
         of the image reasons).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from .sources import CaptionRecord, RawCaptionSource, reject
from .text import clean_caption

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageCheck:
    """The outcome of opening one image file."""

    path: str
    ok: bool
    reason: str | None = None
    width: int | None = None
    height: int | None = None


def check_image(path: str | Path) -> ImageCheck:
    """Open ``path`` twice: ``verify()`` the container, then ``load()`` every pixel and convert to RGB.

    A missing file, a zero-byte file and any file that fails to decode completely (a truncated
    JPEG included) come back with ``ok=False`` and a reason.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return ImageCheck(str(p), False, f"missing_image: no file {p}")
    if size == 0:
        return ImageCheck(str(p), False, "empty_file: zero bytes")
    try:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            im.load()
            rgb = im.convert("RGB")
            width, height = rgb.size
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return ImageCheck(str(p), False, f"corrupt_image: {type(exc).__name__}: {exc}")
    return ImageCheck(str(p), True, None, int(width), int(height))


def check_images(paths: Sequence[str | Path], workers: int = 4) -> list[ImageCheck]:
    """:func:`check_image` on each path, ``workers`` threads (Pillow decodes without the GIL), in order."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process: truncated images "
                       "will decode and pass validation")
    progress = dict(total=len(paths), desc="validating images", unit="img", mininterval=2.0)
    if workers <= 1:
        return [check_image(p) for p in tqdm(paths, **progress)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(check_image, paths, chunksize=64), **progress))


@dataclass
class AssembledCaptions:
    """Accepted images and captions, every rejection, and the counts that tie them together."""

    images: pd.DataFrame  # image_id, image_path, split, width, height
    captions: pd.DataFrame  # image_id, split, caption_raw, caption
    rejected: list[dict[str, Any]]
    counts: dict[str, Any]


def reason_code(reason: str) -> str:
    """``"corrupt_image: OSError ..."`` -> ``"corrupt_image"``."""
    return reason.split(":", 1)[0].strip()


def seeded_split(image_ids: Iterable[str], shares: Sequence[float], seed: int) -> dict[str, str]:
    """Assign images to train/val/test by ``shares`` with a seeded shuffle of the sorted ids."""
    ids = sorted(image_ids)
    if len(shares) != 3 or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"split shares must be three numbers summing to 1, got {list(shares)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(round(shares[1] * len(ids)))
    n_test = int(round(shares[2] * len(ids)))
    n_train = len(ids) - n_val - n_test
    out = {}
    for rank, idx in enumerate(order):
        out[ids[idx]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


def clean_captions(records: Sequence[CaptionRecord]) -> tuple[list[tuple[CaptionRecord, str]], list[dict[str, Any]]]:
    """``(record, cleaned caption)`` for each usable caption line, and a rejection for every other one.

    A line is rejected when its image name is empty (``malformed_row``), when no word is left after
    cleaning (``empty_caption``), or when an earlier line gave the same image the same cleaned caption
    (``duplicate_caption: duplicate of line N``; the first one stays): a repeated reference would count
    twice in training and in BLEU/CIDEr.
    """
    kept: list[tuple[CaptionRecord, str]] = []
    rejected: list[dict[str, Any]] = []
    first_line: dict[tuple[str, str], int] = {}
    for rec in records:
        cleaned = clean_caption(rec.caption_raw)
        if not rec.image_id:
            rejected.append(reject(rec.source, "malformed_row: empty image name", rec.caption_raw, line=rec.line))
        elif not cleaned:
            rejected.append(reject(rec.source, "empty_caption: no words after cleaning", rec.caption_raw,
                                   line=rec.line, image=rec.image_id))
        elif (rec.image_id, cleaned) in first_line:
            first = first_line[rec.image_id, cleaned]
            rejected.append(reject(rec.source, f"duplicate_caption: duplicate of line {first} (same image, same words "
                                               "after cleaning)", rec.caption_raw, line=rec.line, image=rec.image_id))
        else:
            first_line[rec.image_id, cleaned] = rec.line
            kept.append((rec, cleaned))
    return kept, rejected


def assemble_caption_dataset(source: RawCaptionSource, split_shares: Sequence[float] = (0.8, 0.1, 0.1),
                             seed: int = 42, workers: int = 4) -> AssembledCaptions:
    """Join captions, split lists and image files; validate images; return accepted rows and rejections.

    Splits come from the folder's split lists when it has them, otherwise from :func:`seeded_split`
    over the accepted images. Splits are by image, so no image is in two splits.
    """
    rejected: list[dict[str, Any]] = list(source.rejected)
    files = set(source.image_files)

    # 1. captions: clean; empty ones and repeats are rejected
    captions, caption_rejects = clean_captions(source.captions)
    rejected.extend(caption_rejects)
    first_ref: dict[str, tuple[str, int]] = {}
    n_captions_of: Counter = Counter()
    for rec, _ in captions:
        first_ref.setdefault(rec.image_id, (rec.source, rec.line))
        n_captions_of[rec.image_id] += 1

    # 2. split membership from the lists, if any
    split_of: dict[str, str] = {}
    image_reason: dict[str, tuple[str, str, int | None]] = {}  # image -> (reason, source, line)
    if source.split_lists:
        where: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for split, entries in source.split_lists.items():
            for image_id, file, line in entries:
                where[image_id].append((split, file, line))
        for image_id, places in where.items():
            first_ref.setdefault(image_id, (places[0][1], places[0][2]))
            distinct = sorted({s for s, _, _ in places})
            if len(distinct) > 1:
                listed = ", ".join(f"{s} ({Path(f).name}:{ln})" for s, f, ln in places)
                image_reason[image_id] = (f"in_multiple_splits: {listed}", places[0][1], places[0][2])
            else:
                split_of[image_id] = distinct[0]

    # 3. the image universe: files, names in captions, names in split lists
    universe = sorted(files | set(n_captions_of) | set(split_of) | set(image_reason)
                      | {r.image_id for r in source.captions if r.image_id})
    for image_id in universe:
        if image_id in image_reason:
            continue
        src, line = first_ref.get(image_id, (str(source.image_dir), None))
        if image_id not in files:
            image_reason[image_id] = (f"missing_image: no file {source.image_dir / image_id}", src, line)
        elif source.split_lists and image_id not in split_of:
            image_reason[image_id] = ("not_in_split_lists: the folder has split lists but none names this image",
                                      str(source.image_dir / image_id), None)
        elif n_captions_of[image_id] == 0:
            image_reason[image_id] = ("no_captions: no accepted caption names this image",
                                      str(source.image_dir / image_id), None)

    # 4. decode the rest
    to_check = [i for i in universe if i not in image_reason]
    checks = check_images([source.image_dir / i for i in to_check], workers=workers)
    sizes: dict[str, tuple[int, int]] = {}
    for image_id, check in zip(to_check, checks):
        if check.ok:
            sizes[image_id] = (check.width, check.height)
        else:
            image_reason[image_id] = (check.reason, str(source.image_dir / image_id), None)
    for image_id in sorted(image_reason):
        reason, src, line = image_reason[image_id]
        rejected.append(reject(src, reason, str(source.image_dir / image_id), line=line, image=image_id, kind="image"))

    if not source.split_lists:
        split_of = seeded_split(sizes, split_shares, seed)

    # 5. captions of rejected images
    accepted_rows = []
    for rec, cleaned in captions:
        if rec.image_id in sizes:
            accepted_rows.append((rec.image_id, split_of[rec.image_id], rec.caption_raw, cleaned))
            continue
        code = reason_code(image_reason[rec.image_id][0])
        reason = ("unknown_image: no image file named " + rec.image_id) if code == "missing_image" \
            else f"image_rejected: {code}"
        rejected.append(reject(rec.source, reason, rec.caption_raw, line=rec.line, image=rec.image_id))

    image_dir = source.image_dir.resolve()
    images = pd.DataFrame(
        [(i, str(image_dir / i), split_of[i], w, h) for i, (w, h) in sorted(sizes.items())],
        columns=["image_id", "image_path", "split", "width", "height"])
    images = images.astype({"width": "int64", "height": "int64"})
    caption_df = pd.DataFrame(accepted_rows, columns=["image_id", "split", "caption_raw", "caption"])

    rejected_captions = [r for r in rejected if r["kind"] == "caption"]
    rejected_images = [r for r in rejected if r["kind"] == "image"]
    counts = {
        "input_captions": int(source.n_caption_lines),
        "accepted_captions": len(caption_df),
        "rejected_captions": len(rejected_captions),
        "input_images": len(universe),
        "accepted_images": len(images),
        "rejected_images": len(rejected_images),
        "rejected_captions_by_reason": dict(sorted(Counter(reason_code(r["reason"]) for r in rejected_captions).items())),
        "rejected_images_by_reason": dict(sorted(Counter(reason_code(r["reason"]) for r in rejected_images).items())),
        "split_source": "split_lists" if source.split_lists else "seeded",
    }
    assert counts["accepted_captions"] + counts["rejected_captions"] == counts["input_captions"], counts
    assert counts["accepted_images"] + counts["rejected_images"] == counts["input_images"], counts
    by_split = images.groupby("split")["image_id"].apply(set).to_dict()
    assert all(not (by_split.get(a, set()) & by_split.get(b, set()))
               for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
    logger.info("Captions: %d in, %d accepted, %d rejected %s; images: %d in, %d accepted, %d rejected %s",
                counts["input_captions"], counts["accepted_captions"], counts["rejected_captions"],
                counts["rejected_captions_by_reason"], counts["input_images"], counts["accepted_images"],
                counts["rejected_images"], counts["rejected_images_by_reason"])
    return AssembledCaptions(images, caption_df, rejected, counts)


def check_rejected_share(counts: Mapping[str, Any], max_share: float, rejected_path: str = "") -> None:
    """Raise one ``ValueError`` when the rejected share of captions or images exceeds ``max_share``."""
    problems = []
    for kind in ("captions", "images"):
        total = counts[f"input_{kind}"]
        share = counts[f"rejected_{kind}"] / total if total else 1.0
        if share > max_share:
            problems.append(f"{counts[f'rejected_{kind}']} of {total} {kind} ({share:.1%}; "
                            f"{counts[f'rejected_{kind}_by_reason']})")
    if problems:
        where = f"; every rejected record is in {rejected_path}" if rejected_path else ""
        raise ValueError("Too much caption data rejected: " + " and ".join(problems)
                         + f" > caption_data.max_rejected_share={max_share}{where}")
