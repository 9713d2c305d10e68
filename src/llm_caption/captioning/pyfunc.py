"""The captioner as an MLflow pyfunc model: image in, caption out, nothing loaded from the network.

Input: a DataFrame with a string column ``image`` holding an image file path or base64-encoded
image bytes. Output: a DataFrame with ``caption`` and ``error`` (empty when the row worked; an
unreadable image gives an error message for that row and an empty caption, never a crash).
The model carries as artifacts its decoder weights, the encoder weights file, the vocabulary
and a config (architecture, encoder, transform, decoding settings).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

logger = logging.getLogger(__name__)

INPUT_COLUMN = "image"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
                           outputs=Schema([ColSpec("string", "caption"), ColSpec("string", "error")]))


def read_image_value(value: Any) -> Image.Image:
    """An RGB image from a file path, base64 text or raw bytes; ``ValueError`` says what was wrong."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        if len(value) < 4096 and os.path.isfile(value):
            try:
                with Image.open(value) as img:
                    return img.convert("RGB")
            except Exception as exc:
                raise ValueError(f"file '{value}' is not a readable image: {exc}") from exc
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"neither an existing image file nor base64 image bytes: {value[:60]!r}") from exc
    else:
        raise ValueError(f"expected a path or base64 string, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise ValueError(f"the bytes ({len(raw)}) are not a readable image: {exc}") from exc


class Captioner:
    """Encoder + decoder + vocabulary + transform, ready to caption PIL images (usable without MLflow)."""

    def __init__(self, config: Mapping[str, Any], decoder_state: Mapping[str, torch.Tensor], itos: list[str],
                 encoder_weights: str) -> None:
        from .encoder import build_encoder
        from .models import build_decoder
        from .transforms import build_transform

        self.config = dict(config)
        self.itos = list(itos)
        self.encoder, _ = build_encoder({**config["encoder"], "weights_path": encoder_weights, "fine_tune_blocks": 0})
        self.decoder = build_decoder(config["architecture"], len(self.itos), self.encoder.out_channels,
                                     **config["decoder"])
        self.decoder.load_state_dict(decoder_state)
        self.decoder.eval()
        self.transform = build_transform(config["transform_spec"], train=False)

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        from .decoding import decode_batched, ids_to_words

        if not images:
            return []
        batch = torch.stack([self.transform(img) for img in images])
        feats = self.encoder(batch).flatten(2).transpose(1, 2)
        dec = self.config.get("decoding", {})
        decoded = decode_batched(self.decoder, feats, beam_size=int(dec.get("beam_size", 3)),
                                 max_len=int(dec.get("max_len", 30)),
                                 length_penalty=float(dec.get("length_penalty", 0.0)))
        return [" ".join(ids_to_words(t, self.itos)) for t in decoded.tokens]


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """MLflow wrapper around :class:`Captioner`."""

    def load_context(self, context) -> None:
        art = context.artifacts
        config = json.loads(Path(art["config"]).read_text())
        itos = json.loads(Path(art["vocab"]).read_text())["itos"]
        state = torch.load(art["decoder"], map_location="cpu", weights_only=True)
        self.captioner = Captioner(config, state, itos, art["encoder_weights"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            column = INPUT_COLUMN if INPUT_COLUMN in model_input.columns else model_input.columns[0]
            values = model_input[column].tolist()
        else:
            values = list(model_input)
        images, ok_rows, captions, errors = [], [], [""] * len(values), [""] * len(values)
        for i, value in enumerate(values):
            try:
                images.append(read_image_value(value))
                ok_rows.append(i)
            except ValueError as exc:
                errors[i] = f"row {i}: {exc}"
                logger.warning("caption request %s", errors[i])
        for i, text in zip(ok_rows, self.captioner.caption(images)):
            captions[i] = text
        return pd.DataFrame({"caption": captions, "error": errors})


def log_captioner(decoder: torch.nn.Module, config: Mapping[str, Any], vocab: Mapping[str, Any],
                  encoder_weights: str, name: str = "image-captioner") -> str:
    """Log the captioner as a pyfunc model in the active MLflow run; returns its model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        torch.save(decoder.state_dict(), tmp_path / "decoder.pt")
        (tmp_path / "config.json").write_text(json.dumps(dict(config), indent=2, default=str))
        (tmp_path / "vocab.json").write_text(json.dumps(dict(vocab)))
        weights_copy = tmp_path / ("encoder_weights" + Path(encoder_weights).suffix)
        shutil.copy2(encoder_weights, weights_copy)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=CaptionerModel(),
            artifacts={"decoder": str(tmp_path / "decoder.pt"), "config": str(tmp_path / "config.json"),
                       "vocab": str(tmp_path / "vocab.json"), "encoder_weights": str(weights_copy)},
            signature=SIGNATURE,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm", "torchvision", "pillow",
                              "pandas", f"mlflow=={mlflow.__version__}", "llm_caption"],
        )
    return info.model_uri
