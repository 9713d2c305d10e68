"""Small real caption data sets for the captioning tests: synthetic scenes encoded like data_engineering does.

Builds the four datasets caption_training reads (docs/datasets.md) from a handful of
generated images, without running data_engineering.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from llm_caption.captioning.synthetic import SceneConfig, generate_scenes
from llm_caption.captioning.text import clean_caption
from llm_caption.captioning.transforms import make_transform_spec
from llm_caption.captioning.vocab import Vocabulary

SPLIT_NAMES = {"train": "train", "dev": "val", "test": "test"}


def make_caption_inputs(root: Path, n_images: int = 24, image_size: int = 64, max_len: int = 16,
                        seed: int = 0) -> dict:
    """Generate ``n_images`` scenes under ``root`` and return the caption_training inputs."""
    out = Path(root) / "scenes"
    generate_scenes(out, SceneConfig(n_images=n_images, image_size=image_size, seed=seed,
                                     split_shares=(0.5, 0.25, 0.25)))
    split_of = {}
    for part, split in SPLIT_NAMES.items():
        for name in (out / "splits" / f"{part}.txt").read_text().split():
            split_of[name] = split
    raw = pd.read_csv(out / "captions.txt")
    raw["caption"] = raw["caption"].map(clean_caption)
    raw["split"] = raw["image"].map(split_of)
    vocab = Vocabulary.build(raw.loc[raw["split"] == "train", "caption"], min_count=1, max_len=max_len)
    encoded = [vocab.encode_with_info(c) for c in raw["caption"]]
    captions = pd.DataFrame({"image_id": raw["image"], "split": raw["split"], "caption_raw": raw["caption"],
                             "caption": raw["caption"], "token_ids": [e[0] for e in encoded],
                             "n_words": raw["caption"].str.split().map(len), "truncated": [e[1] for e in encoded]})
    names = sorted(split_of)
    images = pd.DataFrame({"image_id": names, "image_path": [str((out / "images" / n).resolve()) for n in names],
                           "split": [split_of[n] for n in names], "width": image_size, "height": image_size})
    spec = make_transform_spec({"image_size": image_size, "train": {"hflip": False, "random_resized_crop": None}})
    return {"caption_images": images, "captions_encoded": captions, "caption_vocab": vocab.to_dict(),
            "image_transform_spec": spec}


def write_caption_inputs(project: Path, inputs: dict) -> None:
    """Write the inputs where the catalog of data_engineering puts them (docs/datasets.md)."""
    inputs["caption_images"].to_parquet(project / "data/03_primary/caption_images.parquet", index=False)
    inputs["captions_encoded"].to_parquet(project / "data/05_model_input/captions_encoded.parquet", index=False)
    (project / "data/05_model_input/caption_vocab.json").write_text(json.dumps(inputs["caption_vocab"]))
    (project / "data/05_model_input/image_transform_spec.json").write_text(json.dumps(inputs["image_transform_spec"]))


def solid_image(path: Path, colour=(200, 30, 30), size: int = 64) -> Path:
    """A small JPEG: ``colour`` with a white left quarter (so a flipped copy differs)."""
    img = Image.new("RGB", (size, size), colour)
    img.paste((255, 255, 255), (0, 0, size // 4, size))
    img.save(path, format="JPEG")
    return path


def tiny_captioner(root: Path, n_images: int = 8, steps: int = 80, architecture: str = "show_tell") -> dict:
    """A small Show-and-Tell (or ``show_attend_tell``) captioner trained briefly on real features of a few scenes
    (real encoder weights).

    Returns ``decoder``, ``config``, ``vocab``, ``encoder_weights`` and ``image_paths`` for pyfunc tests.
    """
    import torch

    from llm_caption.captioning.encoder import build_encoder
    from llm_caption.captioning.features import extract_features
    from llm_caption.captioning.models import build_decoder, caption_loss
    from llm_caption.captioning.transforms import build_transform

    inputs = make_caption_inputs(root, n_images=n_images, image_size=64)
    images = inputs["caption_images"]
    encoder, weights = build_encoder({"name": "efficientnet_lite0"})
    feats, _, _ = extract_features(encoder, images["image_path"].tolist(),
                                   build_transform(inputs["image_transform_spec"]), n_images)
    first = inputs["captions_encoded"].groupby("image_id").head(1).set_index("image_id").loc[images["image_id"]]
    tokens = torch.tensor([list(t) for t in first["token_ids"]])
    kwargs = {"embed_dim": 32, "hidden_dim": 64, "dropout": 0.0}
    if architecture == "show_attend_tell":
        kwargs["attention_dim"] = 32
    torch.manual_seed(0)
    decoder = build_decoder(architecture, len(inputs["caption_vocab"]["itos"]), 1280, **kwargs)
    opt = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    x = torch.from_numpy(feats[:, 0]).float()
    for _ in range(steps):
        loss = caption_loss(decoder, x, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    config = {"architecture": architecture, "decoder": kwargs, "encoder": {"name": "efficientnet_lite0"},
              "transform_spec": inputs["image_transform_spec"],
              "decoding": {"beam_size": 2, "max_len": 16, "length_penalty": 0.7}}
    return {"decoder": decoder.eval(), "config": config, "vocab": inputs["caption_vocab"], "encoder_weights": weights,
            "image_paths": images["image_path"].tolist(), "references": first["caption"].tolist()}
