"""caption_training nodes: feature cache, training of every architecture, beam-search predictions, registry.

The logic lives in :mod:`llm_caption.captioning`; these nodes read the catalog, call it and
shape the outputs of docs/datasets.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from llm_caption.captioning.decoding import decode_batched, ids_to_words
from llm_caption.captioning.encoder import build_encoder, encoder_fingerprint
from llm_caption.captioning.features import CachedFeatures, FeatureCache, load_image
from llm_caption.captioning.models import build_decoder, count_parameters
from llm_caption.captioning.pyfunc import log_captioner
from llm_caption.captioning.training import CaptionData, CaptionSplit, TrainConfig, train_captioner
from llm_caption.captioning.transforms import build_transform
from llm_caption.registry import register_and_promote, split_fingerprint
from llm_caption.tracking import child_run

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _check_columns(df: pd.DataFrame, name: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing} (has {list(df.columns)}); see docs/datasets.md")


def _measure_encoder_seconds(encoder, transform, paths: list[str], n: int) -> float:
    """Encoder seconds per image on a few images (for the uncached epoch-time figure on a cache hit)."""
    sample = paths[:n]
    with torch.inference_mode():
        start = time.perf_counter()
        encoder(torch.stack([transform(load_image(p)) for p in sample]))
    return (time.perf_counter() - start) / max(1, len(sample))


@contextlib.contextmanager
def _torch_threads(params: dict[str, Any]) -> Iterator[None]:
    """Run with ``torch_threads`` intra-op threads (1 avoids thread thrashing on a shared CPU), then restore."""
    before = torch.get_num_threads()
    if params.get("torch_threads"):
        torch.set_num_threads(int(params["torch_threads"]))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_feature_cache(caption_images: pd.DataFrame, image_transform_spec: dict[str, Any],
                        params: dict[str, Any]) -> dict[str, Any]:
    """Encode every image once (fp16 grid features on disk) or reuse the cache entry; returns its description.

    Output (``caption_feature_cache``): ``root``, ``key``, ``n_images``, ``grid_hw``, ``channels``,
    ``views``, ``built``, ``seconds_per_image`` and ``encoder_weights`` (path of the weights file).
    """
    _check_columns(caption_images, "caption_images", ["image_id", "image_path", "split"])
    enc_spec = dict(params["encoder"])
    if int(enc_spec.get("fine_tune_blocks", 0)):
        raise ValueError("caption_training.encoder.fine_tune_blocks > 0 is not supported by this pipeline yet: "
                         "the decoders train on cached features of a frozen encoder")
    cache_cfg = params["feature_cache"]
    encoder, weights = build_encoder(enc_spec)
    fingerprint = encoder_fingerprint(enc_spec, weights)
    transform = build_transform(image_transform_spec, train=False)
    images = caption_images.sort_values("image_id").reset_index(drop=True)
    cache = FeatureCache(cache_cfg["dir"])
    start = time.perf_counter()
    cached = cache.get_or_build(encoder, fingerprint, transform, image_transform_spec, images["image_id"].tolist(),
                                images["image_path"].tolist(), views=int(cache_cfg.get("views", 1)),
                                batch_size=int(cache_cfg.get("batch_size", 32)))
    seconds = cached.seconds_per_image
    if not cached.built:
        seconds = _measure_encoder_seconds(encoder, transform, images["image_path"].tolist(),
                                           int(cache_cfg.get("timing_images", 16)))
    info = {"root": str(cache.root), "key": cached.key, "n_images": len(cached.image_ids),
            "grid_hw": list(cached.grid_hw), "channels": int(cached.features.shape[-1]),
            "views": int(cached.features.shape[1]), "built": cached.built,
            "build_time_s": time.perf_counter() - start if cached.built else 0.0,
            "seconds_per_image": float(seconds), "encoder_weights": weights, "encoder": fingerprint}
    logger.info("Feature cache %s: %d images, grid %s x %d channels, %.3fs/image (%s)", cached.key,
                info["n_images"], info["grid_hw"], info["channels"], seconds, "built" if cached.built else "reused")
    return info


def _load_cache(info: dict[str, Any]) -> CachedFeatures:
    return FeatureCache(info["root"]).load(info["key"])


def _split_tensors(captions: pd.DataFrame, split: str, rows: dict[str, int]) -> CaptionSplit:
    part = captions[captions["split"] == split]
    unknown = sorted(set(part["image_id"]) - set(rows))
    if unknown:
        raise ValueError(f"captions_encoded: {len(unknown)} {split} captions refer to images missing from "
                         f"caption_images (e.g. {unknown[:3]})")
    tokens = torch.tensor(np.stack(part["token_ids"].map(np.asarray).tolist()), dtype=torch.long)
    image_rows = torch.tensor([rows[i] for i in part["image_id"]], dtype=torch.long)
    return CaptionSplit(image_rows, tokens)


def _references(captions: pd.DataFrame, split: str) -> dict[str, list[str]]:
    part = captions[captions["split"] == split]
    return {image_id: group.tolist() for image_id, group in part.groupby("image_id", sort=True)["caption"]}


def _validate_captions(captions: pd.DataFrame, vocab_size: int) -> None:
    """Every caption row has a known split and ``token_ids`` of the common length within the vocabulary."""
    bad_split = ~captions["split"].isin(SPLITS)
    if bad_split.any():
        i = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise ValueError(f"captions_encoded row {i} (image {captions['image_id'].iloc[i]!r}): split "
                         f"{captions['split'].iloc[i]!r} is not one of {list(SPLITS)}")
    lengths = captions["token_ids"].map(len).to_numpy()
    for i in np.flatnonzero(lengths != lengths[0])[:1]:
        raise ValueError(f"captions_encoded row {i} (image {captions['image_id'].iloc[i]!r}): {lengths[i]} token ids, "
                         f"but row 0 has {lengths[0]}; token_ids must all have the vocabulary's max_len")
    for i, ids in enumerate(captions["token_ids"]):
        if len(ids) and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(f"captions_encoded row {i} (image {captions['image_id'].iloc[i]!r}): token id "
                             f"outside the vocabulary of {vocab_size} words")


def _caption_data(cached: CachedFeatures, captions: pd.DataFrame, itos: list[str]) -> CaptionData:
    _validate_captions(captions, len(itos))
    rows = cached.index_of()
    val_refs = _references(captions, "val")
    if not val_refs or not (captions["split"] == "train").any():
        raise ValueError("captions_encoded: need captions in both the 'train' and the 'val' split")
    digest = hashlib.sha256(np.stack(captions["token_ids"].map(np.asarray).tolist()).tobytes()).hexdigest()[:12]
    return CaptionData(features=cached.features, train=_split_tensors(captions, "train", rows),
                       val=_split_tensors(captions, "val", rows),
                       val_image_rows=torch.tensor([rows[i] for i in val_refs], dtype=torch.long),
                       val_references=list(val_refs.values()), itos=itos, key=f"{cached.key}-{digest}")


def _decoder_kwargs(params: dict[str, Any], arch: str) -> dict[str, Any]:
    return dict((params.get("decoders") or {}).get(arch) or {})


def _train_config(params: dict[str, Any], arch: str, seed: int) -> TrainConfig:
    merged = {**params["training"], **((params.get("training_overrides") or {}).get(arch) or {})}
    return TrainConfig.from_params(merged, seed=seed)


def _train_caption_models(captions_encoded: pd.DataFrame, caption_vocab: dict[str, Any],
                         caption_feature_cache: dict[str, Any], params: dict[str, Any],
                         seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every architecture of ``params["architectures"]`` on the cached features, each in its own MLflow run.

    Returns ``caption_model_results`` (one row per architecture) and ``caption_loss_history``
    (one row per architecture and epoch); the weights are in each architecture's checkpoint folder.
    """
    _check_columns(captions_encoded, "captions_encoded", ["image_id", "split", "caption", "token_ids"])
    itos = list(caption_vocab["itos"])
    cached = _load_cache(caption_feature_cache)
    data = _caption_data(cached, captions_encoded, itos)
    n_train = int(data.train.tokens.shape[0])
    results, history_rows = [], []
    for arch in params["architectures"]:
        cfg = _train_config(params, arch, seed)
        torch.manual_seed(cfg.seed)
        kwargs = _decoder_kwargs(params, arch)
        model = build_decoder(arch, len(itos), caption_feature_cache["channels"], **kwargs)
        n_params = count_parameters(model)
        run_params = {"architecture": arch, "params": n_params, "decoder": kwargs, "training": vars(cfg),
                      "encoder": caption_feature_cache["encoder"], "feature_cache_key": caption_feature_cache["key"],
                      "train_captions": n_train, "vocab_size": len(itos)}
        with child_run(f"caption_training.{arch}", tags={"architecture": arch}, params=run_params) as run:
            result = train_captioner(model, data, cfg, Path(params["checkpoint_dir"]) / arch, name=arch,
                                     resume=bool(params.get("resume", True)))
            epoch_cached = float(np.mean([h["train_epoch_time_s"] for h in result.history])) if result.history else 0.0
            # Without the cache every training caption's image goes through the encoder again each epoch.
            epoch_uncached = epoch_cached + caption_feature_cache["seconds_per_image"] * n_train
            last = result.history[-1] if result.history else {}
            summary = {"params": n_params, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                       "best_val_bleu4": result.best_val_bleu4, "epoch_time_cached_s": epoch_cached,
                       "epoch_time_uncached_s": epoch_uncached, "train_time_s": result.train_time_s}
            mlflow.log_metrics({k: float(v) for k, v in summary.items()})
            results.append({"architecture": arch, "params": n_params, "epochs_run": result.epochs_run,
                            "epoch_time_cached_s": epoch_cached, "epoch_time_uncached_s": epoch_uncached,
                            "final_train_loss": last.get("train_loss", float("nan")),
                            "final_val_loss": last.get("val_loss", float("nan")),
                            "best_val_bleu4": result.best_val_bleu4, "train_time_s": result.train_time_s,
                            "mlflow_run_id": run.info.run_id, "checkpoint_path": result.best_checkpoint})
            for h in result.history:
                history_rows.append({"architecture": arch, "epoch": int(h["epoch"]), "train_loss": h["train_loss"],
                                     "val_loss": h["val_loss"], "val_bleu4": h["val_bleu4"], "lr": h["lr"]})
        logger.info("%s: %d params, %d epochs, best val BLEU-4 %.4f, %.1fs", arch, n_params, result.epochs_run,
                    result.best_val_bleu4, result.train_time_s)
    return pd.DataFrame(results), pd.DataFrame(history_rows)


def _load_trained(row: pd.Series, params: dict[str, Any], vocab_size: int, channels: int) -> torch.nn.Module:
    model = build_decoder(row["architecture"], vocab_size, channels, **_decoder_kwargs(params, row["architecture"]))
    model.load_state_dict(torch.load(row["checkpoint_path"], map_location="cpu", weights_only=True)["model"])
    return model.eval()


def _predict_captions(caption_model_results: pd.DataFrame, caption_images: pd.DataFrame,
                     captions_encoded: pd.DataFrame, caption_vocab: dict[str, Any],
                     caption_feature_cache: dict[str, Any],
                     params: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Beam-search captions of the val and test images by every trained architecture, with their references.

    Also returns one test image's attention maps from ``show_attend_tell`` (``caption_attention_sample``;
    an empty dict when that architecture was not trained).
    """
    itos = list(caption_vocab["itos"])
    cached = _load_cache(caption_feature_cache)
    rows = cached.index_of()
    paths = dict(zip(caption_images["image_id"], caption_images["image_path"]))
    dec = params["decoding"]
    grid_h, grid_w = caption_feature_cache["grid_hw"]
    out, sample = [], {}
    for _, result in caption_model_results.iterrows():
        arch = result["architecture"]
        model = _load_trained(result, params, len(itos), caption_feature_cache["channels"])
        for split in ("val", "test"):
            refs = _references(captions_encoded, split)
            if not refs:
                continue
            ids = list(refs)
            feats = cached.features[torch.tensor([rows[i] for i in ids]), 0]
            want_alphas = arch == "show_attend_tell" and split == "test"
            decoded = decode_batched(model, feats, int(dec.get("batch_size", 64)), int(dec["beam_size"]),
                                     int(dec["max_len"]), float(dec.get("length_penalty", 0.0)), want_alphas)
            for image_id, tokens in zip(ids, decoded.tokens):
                out.append({"architecture": arch, "split": split, "image_id": image_id,
                            "image_path": paths.get(image_id, ""),
                            "prediction": " ".join(ids_to_words(tokens, itos)), "references": refs[image_id]})
            if want_alphas and decoded.alphas:
                words = ids_to_words(decoded.tokens[0], itos)
                sample = {"image_path": paths.get(ids[0], ""), "image_id": ids[0], "words": words,
                          "alphas": decoded.alphas[0][: len(words)].reshape(-1, grid_h, grid_w).numpy()}
        logger.info("%s: beam search (k=%s) on val/test done", arch, dec["beam_size"])
    return pd.DataFrame(out), sample


def register_best_captioner(caption_model_results: pd.DataFrame, caption_vocab: dict[str, Any],
                            image_transform_spec: dict[str, Any], caption_feature_cache: dict[str, Any],
                            captions_encoded: pd.DataFrame, params: dict[str, Any]) -> dict[str, Any]:
    """Log the best architecture (by validation BLEU-4) as a pyfunc model and register it as ``image-captioner``.

    The ``champion`` alias moves only if the new version beats the champion on the same validation split.
    The model carries the request limits of ``params["serving"]`` (defaults of ``ServingLimits`` for keys
    it does not name).
    """
    reg = params["registry"]
    best = caption_model_results.sort_values("best_val_bleu4", ascending=False, kind="stable").iloc[0]
    arch = best["architecture"]
    model = _load_trained(best, params, len(caption_vocab["itos"]), caption_feature_cache["channels"])
    config = {"architecture": arch, "decoder": _decoder_kwargs(params, arch),
              "encoder": {k: v for k, v in params["encoder"].items() if k != "weights_path"},
              "transform_spec": image_transform_spec, "decoding": dict(params["decoding"])}
    val_ids = sorted(set(captions_encoded.loc[captions_encoded["split"] == "val", "image_id"]))
    with mlflow.start_run(run_id=best["mlflow_run_id"], nested=mlflow.active_run() is not None):
        model_uri = log_captioner(model, config, caption_vocab, caption_feature_cache["encoder_weights"],
                                  name=reg.get("artifact_name", "image-captioner"), serving=params.get("serving"))
    decision = register_and_promote(model_uri, reg["model_name"], "val_bleu4", float(best["best_val_bleu4"]),
                                    greater_is_better=True, eval_split=split_fingerprint(val_ids),
                                    extra_tags={"architecture": arch, "mlflow_run_id": best["mlflow_run_id"]})
    return {"model_uri": model_uri, "architecture": arch, "val_bleu4": float(best["best_val_bleu4"]),
            "name": decision.name, "version": decision.version, "promoted": decision.promoted,
            "reason": decision.reason}


def build_feature_cache(caption_images: pd.DataFrame, image_transform_spec: dict[str, Any],
                        params: dict[str, Any]) -> dict[str, Any]:
    """Encode every image once (fp16 grid features on disk) or reuse the cache entry; returns its description.

    Output (``caption_feature_cache``): ``root``, ``key``, ``n_images``, ``grid_hw``, ``channels``,
    ``views``, ``built``, ``seconds_per_image``, ``encoder_weights`` and the encoder fingerprint.
    """
    with _torch_threads(params):
        return _build_feature_cache(caption_images, image_transform_spec, params)


def train_caption_models(captions_encoded: pd.DataFrame, caption_vocab: dict[str, Any],
                         caption_feature_cache: dict[str, Any], params: dict[str, Any],
                         seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every architecture of ``params["architectures"]``; returns ``caption_model_results`` and
    ``caption_loss_history`` (see docs/datasets.md)."""
    with _torch_threads(params):
        return _train_caption_models(captions_encoded, caption_vocab, caption_feature_cache, params, seed)


def predict_captions(caption_model_results: pd.DataFrame, caption_images: pd.DataFrame,
                     captions_encoded: pd.DataFrame, caption_vocab: dict[str, Any],
                     caption_feature_cache: dict[str, Any],
                     params: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Beam-search captions of val and test images by every architecture (``caption_predictions``) and one
    test image's attention maps from ``show_attend_tell`` (``caption_attention_sample``)."""
    with _torch_threads(params):
        return _predict_captions(caption_model_results, caption_images, captions_encoded, caption_vocab,
                                 caption_feature_cache, params)
