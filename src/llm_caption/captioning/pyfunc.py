"""The captioner as an MLflow pyfunc model: image bytes in, caption out, nothing read from the server's disk.

Input: a DataFrame with a string column ``image`` holding base64-encoded image bytes (file paths
are not accepted: the local command ``python -m llm_caption.caption`` reads files itself and sends
their bytes). Output: a DataFrame with ``caption`` and ``error`` (empty when the row worked; a bad
row gives a one-line error for that row and an empty caption, never a crash).

Requests are untrusted. The ``serving`` block of the model config caps them (defaults in
:class:`ServingLimits`): bytes and pixels per image (checked from the image header before any
pixel is decoded, so a decompression bomb costs nothing), accepted image formats, rows per
request (more: the request is refused with one line), and images encoded per batch. The model
carries as artifacts its decoder weights, the encoder weights file, the vocabulary and a config
(architecture, encoder, transform, decoding and serving settings).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from ..limits import check_positive_ints, config_values

logger = logging.getLogger(__name__)

INPUT_COLUMN = "image"


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
                          outputs=Schema([ColSpec("string", "caption"), ColSpec("string", "error")]))


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask of the served captioner (the ``serving`` block of the model config)."""

    max_image_pixels: int = 40_000_000      # width x height from the header; over it: the row's error, no decode
    max_image_bytes: int = 20 * 2**20       # encoded size of one image
    max_rows: int = 64                      # rows per request; more: the whole request is refused
    batch_size: int = 16                    # images decoded and encoded together
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_image_pixels", "max_image_bytes", "max_rows", "batch_size"), "serving.")
        if not self.image_formats:
            raise ValueError("serving.image_formats must name at least one format")

    @classmethod
    def from_config(cls, serving: Mapping[str, Any] | None) -> "ServingLimits":
        """Limits from a ``serving`` mapping (missing keys: the defaults); unknown keys are an error."""
        values = config_values(cls, serving, "serving")
        if "image_formats" in values:
            values["image_formats"] = tuple(str(f).upper() for f in values["image_formats"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "image_formats": list(self.image_formats)}


def decode_request_value(value: Any, limits: ServingLimits) -> bytes:
    """The image bytes of one request value (base64 text or raw bytes); ``ValueError`` says what was wrong.

    Text is only ever decoded as base64, never opened as a path, so the answer is the same whether or
    not a file of that name exists on the server.
    """
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        if not value.strip():
            raise ValueError("empty value: expected base64-encoded image bytes")
        if len(value) > (limits.max_image_bytes * 4) // 3 + 4:
            raise ValueError(f"{len(value):,} characters of base64: over the {limits.max_image_bytes:,}-byte limit "
                             "per image")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"not base64-encoded image bytes ({len(value)} characters); the served model takes "
                             "image bytes only, not file paths") from None
    else:
        raise ValueError(f"expected base64-encoded image bytes (a string), got {type(value).__name__}")
    if len(raw) > limits.max_image_bytes:
        raise ValueError(f"{len(raw):,} bytes: over the {limits.max_image_bytes:,}-byte limit per image")
    return raw


def open_image_bytes(raw: bytes, limits: ServingLimits) -> Image.Image:
    """Decode image bytes to RGB after checking the header's size against ``limits``; ``ValueError`` otherwise."""
    with warnings.catch_warnings():
        # Our own pixel cap below decides; Pillow still refuses on its own beyond 2 x Image.MAX_IMAGE_PIXELS.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=list(limits.image_formats))
        except Image.DecompressionBombError as exc:
            raise ValueError(f"refused as a decompression bomb before decoding: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bytes it cannot identify
            raise ValueError(f"the {len(raw):,} bytes are not an image in an accepted format "
                             f"({', '.join(limits.image_formats)}): {type(exc).__name__}") from None
    with img:
        width, height = img.size
        if width * height > limits.max_image_pixels:
            raise ValueError(f"image is {width}x{height} ({width * height / 1e6:.1f} MP): over the "
                             f"{limits.max_image_pixels / 1e6:g} MP limit per image; not decoded")
        try:
            return img.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise ValueError(f"{img.format} image {width}x{height} cannot be decoded: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


def request_values(model_input: Any, limits: ServingLimits) -> list[Any]:
    """The ``image`` values of a request; ``MlflowException`` (one line, HTTP 400) when the request itself is bad."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise _bad_request(
                f"the request needs an '{INPUT_COLUMN}' column of base64 image bytes; got columns "
                f"{[str(c) for c in model_input.columns][:10]}")
        values = model_input[INPUT_COLUMN].tolist()
    elif isinstance(model_input, (list, tuple, pd.Series)):
        values = list(model_input)
    else:
        raise _bad_request(
            f"expected a DataFrame with an '{INPUT_COLUMN}' column, got {type(model_input).__name__}")
    if len(values) > limits.max_rows:
        raise _bad_request(
            f"the request has {len(values):,} rows; this model takes at most {limits.max_rows} per request")
    return values


def _chunks(n: int, size: int) -> Iterator[range]:
    for lo in range(0, n, size):
        yield range(lo, min(n, lo + size))


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
    def caption_tensors(self, batch: torch.Tensor) -> list[str]:
        """Captions of a batch of transformed images ``[B, 3, S, S]``."""
        from .decoding import decode_batched, ids_to_words

        if batch.shape[0] == 0:
            return []
        feats = self.encoder(batch).flatten(2).transpose(1, 2)
        dec = self.config.get("decoding", {})
        decoded = decode_batched(self.decoder, feats, beam_size=int(dec.get("beam_size", 3)),
                                 max_len=int(dec.get("max_len", 30)),
                                 length_penalty=float(dec.get("length_penalty", 0.0)),
                                 drop_finished=bool(dec.get("drop_finished", False)))
        return [" ".join(ids_to_words(t, self.itos)) for t in decoded.tokens]

    @torch.inference_mode()
    def caption_with_attention(self, image: Image.Image) -> tuple[str, list[str], torch.Tensor | None]:
        """``(caption, words, attention)`` of one image: the same caption as :meth:`caption`; for a soft-attention
        decoder (``show_attend_tell``) ``attention`` is ``[n_words, side, side]`` (where it looked for each word
        over the encoder's grid), else None."""
        from .decoding import decode_batched, ids_to_words

        feats = self.encoder(self.transform(image).unsqueeze(0)).flatten(2).transpose(1, 2)
        dec = self.config.get("decoding", {})
        attends = str(self.config.get("architecture", "")).startswith("show_attend_tell")
        decoded = decode_batched(self.decoder, feats, beam_size=int(dec.get("beam_size", 3)),
                                 max_len=int(dec.get("max_len", 30)),
                                 length_penalty=float(dec.get("length_penalty", 0.0)),
                                 drop_finished=bool(dec.get("drop_finished", False)), return_alphas=attends)
        words = ids_to_words(decoded.tokens[0], self.itos)
        attention = None
        if attends and decoded.alphas:
            alphas = decoded.alphas[0][: len(words)].float()
            side = int(round(alphas.shape[-1] ** 0.5))
            if side * side == alphas.shape[-1]:
                attention = alphas.reshape(len(words), side, side)
        return " ".join(words), words, attention

    def caption(self, images: Sequence[Image.Image], batch_size: int = 16) -> list[str]:
        """Captions of PIL images, encoded ``batch_size`` at a time."""
        out: list[str] = []
        for rows in _chunks(len(images), batch_size):
            out += self.caption_tensors(torch.stack([self.transform(images[i]) for i in rows]))
        return out


class CaptionerPredictor:
    """What the served captioner does (load its artifacts, answer a request), without MLflow:
    :class:`CaptionerModel` is this as an MLflow ``PythonModel``, and ``python -m llm_caption.caption`` loads
    it straight from a registered model's folder (:func:`load_local`)."""

    def load_context(self, context) -> None:
        art = context.artifacts
        config = json.loads(Path(art["config"]).read_text())
        itos = json.loads(Path(art["vocab"]).read_text())["itos"]
        state = torch.load(art["decoder"], map_location="cpu", weights_only=True)
        self.limits = ServingLimits.from_config(config.get("serving"))
        self.captioner = Captioner(config, state, itos, art["encoder_weights"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        values = request_values(model_input, self.limits)
        captions, errors = [""] * len(values), [""] * len(values)
        for rows in _chunks(len(values), self.limits.batch_size):
            tensors, ok_rows = [], []
            for i in rows:
                try:
                    image = open_image_bytes(decode_request_value(values[i], self.limits), self.limits)
                    tensors.append(self.captioner.transform(image))
                    ok_rows.append(i)
                except ValueError as exc:
                    errors[i] = f"row {i}: {exc}"
                    logger.warning("caption request %s", errors[i])
            if tensors:
                for i, text in zip(ok_rows, self.captioner.caption_tensors(torch.stack(tensors))):
                    captions[i] = text
        return pd.DataFrame({"caption": captions, "error": errors})


def _captioner_model_class() -> type:
    import mlflow.pyfunc

    cls = type("CaptionerModel", (CaptionerPredictor, mlflow.pyfunc.PythonModel), {
        "__module__": __name__, "__qualname__": "CaptionerModel",
        "__doc__": "MLflow wrapper around :class:`Captioner`; every request is checked against "
                   ":class:`ServingLimits`."})
    return cls


def __getattr__(name: str) -> Any:
    """``CaptionerModel`` (and ``SIGNATURE``) are made on first use, so that importing this module does not
    import MLflow (a second or more of a command's start-up); pickles of logged models name
    ``llm_caption.captioning.pyfunc.CaptionerModel`` and find it here."""
    if name == "CaptionerModel":
        globals()[name] = _captioner_model_class()
        return globals()[name]
    if name == "SIGNATURE":
        globals()[name] = _signature()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_local(folder: str | Path) -> CaptionerPredictor | None:
    """The captioner logged by :func:`log_captioner` in the local model folder ``folder`` (the one holding
    ``MLmodel``), loaded without MLflow: its ``python_function`` artifacts handed to
    :meth:`CaptionerPredictor.load_context`. None when the folder holds another kind of model (its pickled
    python model names another class), and the caller then loads it through MLflow."""
    from ..local_model import LocalContext, read_pyfunc_folder

    read = read_pyfunc_folder(folder, __name__, "CaptionerModel", ("config", "decoder", "vocab", "encoder_weights"))
    if read is None:
        return None
    predictor = CaptionerPredictor()
    predictor.load_context(LocalContext(read[1]))
    return predictor


def log_captioner(decoder: torch.nn.Module, config: Mapping[str, Any], vocab: Mapping[str, Any],
                  encoder_weights: str, name: str = "image-captioner",
                  serving: Mapping[str, Any] | None = None) -> str:
    """Log the captioner as a pyfunc model in the active MLflow run; returns its model URI.

    ``serving`` (or ``config["serving"]``) sets the request limits (:class:`ServingLimits`); it is
    validated here and stored complete in the model's config, so the served model never guesses.
    """
    import mlflow

    serving_cfg = {**dict(config.get("serving") or {}), **dict(serving or {})}
    config = {**dict(config), "serving": ServingLimits.from_config(serving_cfg).to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        torch.save(decoder.state_dict(), tmp_path / "decoder.pt")
        (tmp_path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp_path / "vocab.json").write_text(json.dumps(dict(vocab)))
        weights_copy = tmp_path / ("encoder_weights" + Path(encoder_weights).suffix)
        shutil.copy2(encoder_weights, weights_copy)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=__getattr__("CaptionerModel")(),
            artifacts={"decoder": str(tmp_path / "decoder.pt"), "config": str(tmp_path / "config.json"),
                       "vocab": str(tmp_path / "vocab.json"), "encoder_weights": str(weights_copy)},
            signature=_signature(),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm", "torchvision", "pillow",
                              "pandas", f"mlflow=={mlflow.__version__}", "llm_caption"],
        )
    return info.model_uri
