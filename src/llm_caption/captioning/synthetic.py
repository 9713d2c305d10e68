"""Synthetic captioned scenes: simple coloured shapes on noisy backgrounds, five true captions each.

The generator writes a data set in the Kaggle Flickr8k layout, so the Flickr8k loader reads it
unchanged::

    <out_dir>/images/scene_00000.jpg ...
    <out_dir>/captions.txt            # CSV, header "image,caption", 5 rows per image
    <out_dir>/splits/{train,dev,test}.txt
    <out_dir>/manifest.json           # the generator config; an identical config is not regenerated

The scene grammar is small on purpose (1-2 objects, 4 shapes, 6 colours, 2 sizes, a relative
position) so that an attention captioner can learn it from a few thousand images on a CPU.
Everything is drawn from one ``numpy`` generator seeded by ``seed``: same config, same bytes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..limits import config_values

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1

DEFAULT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 45, 165),
    "orange": (240, 125, 25),
}
DEFAULT_SHAPES = ("circle", "square", "triangle", "star")
DEFAULT_SIZES: dict[str, float] = {"small": 0.085, "large": 0.17}  # radius as a share of the image side

# Caption templates, five per scene kind; every one is a true description of the scene.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": (
        "{a} {where}",
        "{a}",
        "there is {a} {where}",
        "a picture of {a}",
        "one {a_bare} {where} of the image",
    ),
    "horizontal": (  # {a} is left of {b}
        "{a} to the left of {b}",
        "{b} to the right of {a}",
        "{a} and {b}",
        "{a} is on the left and {b} is on the right",
        "there is {a} next to {b}",
    ),
    "vertical": (  # {a} is above {b}
        "{a} above {b}",
        "{b} below {a}",
        "{a} and {b}",
        "{a} is at the top and {b} is at the bottom",
        "there is {a} over {b}",
    ),
}
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


@dataclass(frozen=True)
class SceneConfig:
    """What the generator draws. Built from the ``caption_data.synthetic`` parameters."""

    n_images: int = 2000
    image_size: int = 224
    seed: int = 42
    single_object_share: float = 0.3
    noise_std: float = 12.0
    jpeg_quality: int = 90
    split_shares: tuple[float, float, float] = (0.8, 0.1, 0.1)
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    sizes: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZES))

    @classmethod
    def from_params(cls, params: Mapping[str, Any], seed: int) -> "SceneConfig":
        """Config from a parameter mapping; unknown keys are an error (typos should not pass)."""
        if "seed" in params:
            raise ValueError("caption_data.synthetic: unknown keys ['seed'] (the seed is the project's params:seed)")
        kwargs = config_values(cls, {k: v for k, v in params.items() if k != "out_dir"}, "caption_data.synthetic")
        if "shapes" in kwargs:
            kwargs["shapes"] = tuple(kwargs["shapes"])
        if "split_shares" in kwargs:
            kwargs["split_shares"] = tuple(float(x) for x in kwargs["split_shares"])
        if "colours" in kwargs:
            kwargs["colours"] = {k: tuple(int(c) for c in v) for k, v in kwargs["colours"].items()}
        if "sizes" in kwargs:
            kwargs["sizes"] = {k: float(v) for k, v in kwargs["sizes"].items()}
        config = cls(seed=int(seed), **kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        unknown_shapes = set(self.shapes) - set(SHAPE_DRAWERS)
        if unknown_shapes:
            raise ValueError(f"unknown shapes {sorted(unknown_shapes)}; available: {sorted(SHAPE_DRAWERS)}")
        if self.n_images < 3:
            raise ValueError(f"n_images must be >= 3 (one per split), got {self.n_images}")
        if len(self.split_shares) != 3 or abs(sum(self.split_shares) - 1) > 1e-6:
            raise ValueError(f"split_shares must be three shares summing to 1, got {self.split_shares}")
        if len(self.sizes) != 2:
            raise ValueError(f"sizes must name exactly two sizes (small, large), got {list(self.sizes)}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shapes"] = list(self.shapes)
        data["split_shares"] = list(self.split_shares)
        data["colours"] = {k: list(v) for k, v in self.colours.items()}
        data["generator_version"] = GENERATOR_VERSION
        return data


# -- drawing ---------------------------------------------------------------------------
def _regular_polygon(cx: float, cy: float, r: float, n: int, rotation: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rotation + 2 * math.pi * k / n), cy + r * math.sin(rotation + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _draw_square(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    h = r * 0.85  # a square of the same visual weight as the circle
    draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)


def _draw_triangle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    draw.polygon(_regular_polygon(cx, cy + r * 0.15, r * 1.1, 3, -math.pi / 2), fill=fill)


def _draw_star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    outer = _regular_polygon(cx, cy, r * 1.1, 5, -math.pi / 2)
    inner = _regular_polygon(cx, cy, r * 0.45, 5, -math.pi / 2 + math.pi / 5)
    draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)


SHAPE_DRAWERS = {
    "circle": _draw_circle,
    "square": _draw_square,
    "triangle": _draw_triangle,
    "star": _draw_star,
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float

    def phrase(self, article: bool = True) -> str:
        bare = f"{self.size} {self.colour} {self.shape}"
        return f"a {bare}" if article else bare


def _background(rng: np.random.Generator, size: int, noise_std: float) -> np.ndarray:
    """A light, low-saturation two-colour gradient in a random direction, plus Gaussian noise."""
    c0 = rng.uniform(170, 250, 3)
    c1 = np.clip(c0 + rng.uniform(-45, 45, 3), 140, 255)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]


def _pick_objects(rng: np.random.Generator, config: SceneConfig) -> tuple[str, list[SceneObject], str]:
    """Choose 1 or 2 distinct objects and a layout: ``single`` / ``horizontal`` / ``vertical``."""
    s = config.image_size
    colours, shapes, sizes = list(config.colours), list(config.shapes), list(config.sizes)

    def attrs() -> tuple[str, str, str]:
        return shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))], sizes[rng.integers(len(sizes))]

    if rng.random() < config.single_object_share:
        shape, colour, size = attrs()
        r = config.sizes[size] * s * rng.uniform(0.9, 1.1)
        where = ("left", "middle", "right")[rng.integers(3)]
        lo, hi = {"left": (0.15, 0.32), "middle": (0.44, 0.56), "right": (0.68, 0.85)}[where]
        cx = float(np.clip(rng.uniform(lo, hi) * s, r + 2, s - r - 2))
        cy = float(rng.uniform(r + 2, s - r - 2))
        return "single", [SceneObject(shape, colour, size, cx, cy, r)], where

    a = attrs()
    b = attrs()
    while b[:2] == a[:2]:  # two objects must be told apart by shape or colour
        b = attrs()
    ra = config.sizes[a[2]] * s * rng.uniform(0.9, 1.1)
    rb = config.sizes[b[2]] * s * rng.uniform(0.9, 1.1)
    layout = "horizontal" if rng.random() < 0.5 else "vertical"
    # main axis: a in the first half, b in the second, with a clear gap; cross axis: small offset
    gap = 0.06 * s
    a_hi = min(s / 2 - gap / 2, s - 2 * rb - ra - gap - 2)
    main_a = rng.uniform(ra + 2, max(a_hi, ra + 2))
    b_lo = max(s / 2 + gap / 2, main_a + ra + rb + gap)
    main_b = rng.uniform(b_lo, max(b_lo, s - rb - 2))
    centre = rng.uniform(0.3, 0.7) * s
    cross_a = float(np.clip(centre + rng.uniform(-0.08, 0.08) * s, ra + 2, s - ra - 2))
    cross_b = float(np.clip(centre + rng.uniform(-0.08, 0.08) * s, rb + 2, s - rb - 2))
    if layout == "horizontal":
        pa, pb = (main_a, cross_a), (main_b, cross_b)
    else:
        pa, pb = (cross_a, main_a), (cross_b, main_b)
    return layout, [SceneObject(*a, *pa, ra), SceneObject(*b, *pb, rb)], ""


def captions_for(layout: str, objects: list[SceneObject], where: str) -> list[str]:
    """The five captions of a scene, capitalised and ending with a full stop (cleaning removes both)."""
    if layout == "single":
        fields = {"a": objects[0].phrase(), "a_bare": objects[0].phrase(article=False), "where": WHERE[where]}
    else:
        fields = {"a": objects[0].phrase(), "b": objects[1].phrase()}
    out = []
    for template in TEMPLATES[layout]:
        text = template.format(**fields)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def render_scene(rng: np.random.Generator, config: SceneConfig) -> tuple[Image.Image, list[str]]:
    """One image and its five captions, drawn from ``rng``."""
    s = config.image_size
    layout, objects, where = _pick_objects(rng, config)
    canvas = Image.fromarray(np.clip(_background(rng, s, config.noise_std), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        jitter = rng.integers(-12, 13, 3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(config.colours[obj.colour], jitter))
        SHAPE_DRAWERS[obj.shape](draw, obj.cx, obj.cy, obj.radius, fill)
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, config.noise_std, (s, s, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image, captions_for(layout, objects, where)


# -- writing a data set -------------------------------------------------------------------
def generate_scenes(out_dir: str | Path, config: SceneConfig, force: bool = False) -> dict[str, Any]:
    """Write the data set for ``config`` under ``out_dir`` (Kaggle Flickr8k layout); return its manifest.

    When ``out_dir/manifest.json`` already holds the same config the files are kept as they are.
    A folder holding anything else than a previous output of this generator is refused rather than
    overwritten.
    """
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    wanted = config.to_json()
    if manifest_path.exists() and not force:
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        if existing.get("config") == wanted and (out / "captions.txt").exists():
            logger.info("Synthetic scenes in %s are up to date (%d images)", out, config.n_images)
            return existing
    if out.exists() and any(out.iterdir()):
        if not manifest_path.exists():
            raise FileExistsError(f"{out} exists and is not a synthetic-scenes folder (no manifest.json); "
                                  "refusing to overwrite it: choose another caption_data.synthetic.out_dir")
        for name in ("images", "splits"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("captions.txt", "manifest.json"):
            (out / name).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "splits").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(config.seed)
    names = [f"scene_{i:05d}.jpg" for i in range(config.n_images)]
    rows: list[tuple[str, str]] = []
    for name in tqdm(names, desc="synthetic scenes", unit="img", mininterval=2.0):
        image, captions = render_scene(rng, config)
        image.save(out / "images" / name, format="JPEG", quality=config.jpeg_quality)
        rows.extend((name, c) for c in captions)
    with open(out / "captions.txt", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows(rows)

    order = rng.permutation(len(names))
    n_train = int(round(config.split_shares[0] * len(names)))
    n_val = max(1, int(round(config.split_shares[1] * len(names))))
    n_train = min(n_train, len(names) - n_val - 1)
    parts = {"train": order[:n_train], "dev": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for split, idx in parts.items():
        (out / "splits" / f"{split}.txt").write_text("".join(f"{names[i]}\n" for i in sorted(idx)), encoding="utf-8")

    manifest = {"config": wanted, "n_images": len(names), "n_captions": len(rows),
                "splits": {k: int(len(v)) for k, v in parts.items()}}
    manifest_path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    logger.info("Wrote %d synthetic scenes (%d captions) to %s", len(names), len(rows), out)
    return manifest
