"""Train every configured captioner on one feature cache and predict with each: the caption study.

What :mod:`llm_caption.llm.experiment` does for fine-tuning methods, this module does for
caption architectures. :func:`build_features` encodes every image once (or reuses the cache
entry); :func:`train_architectures` builds each decoder of ``architectures`` from its
``decoders.<arch>`` block, trains it with ``training`` (overridden by ``decoders.<arch>.training``)
in its own MLflow child run, then (with ``scst.enabled``) fine-tunes one of them on CIDEr-D by
self-critical sequence training as one more row, ``<arch>+scst`` (:mod:`.scst`), and returns the
result tables and the best weights;
:func:`predict_captions` beam-searches the val and test images with every trained model.
Registration is in :mod:`.registration`. MLflow is reached through :mod:`llm_caption.tracking` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..common import count_parameters, require_columns
from ..registry import split_fingerprint
from ..tracking import child_run, epoch_logger, log_metrics
from .datasets import FeatureSet
from .decoding import decode_batched, ids_to_words
from .encoder import build_encoder, encoder_fingerprint
from .features import FeatureCache, load_image
from .models import build_decoder
from .scst import ScstConfig, train_scst
from .training import CaptionData, CaptionSplit, TrainConfig, TrainResult, train_captioner
from .transforms import build_transform

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RESULT_COLUMNS = ["architecture", "params", "epochs_run", "epoch_time_cached_s", "epoch_time_uncached_s",
                  "final_train_loss", "final_val_loss", "best_val_bleu4", "train_time_s", "mlflow_run_id",
                  "eval_split"]
HISTORY_COLUMNS = ["architecture", "epoch", "train_loss", "val_loss", "val_bleu4", "lr"]


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------

def _measure_encoder_seconds(encoder, transform, paths: list[str], n: int) -> float:
    """Encoder seconds per image on a few images (for the uncached epoch-time figure on a cache hit)."""
    sample = paths[:n]
    with torch.inference_mode():
        start = time.perf_counter()
        encoder(torch.stack([transform(load_image(p)) for p in sample]))
    return (time.perf_counter() - start) / max(1, len(sample))


def build_features(caption_images: pd.DataFrame, transform_spec: dict[str, Any],
                   params: dict[str, Any]) -> FeatureSet:
    """Encode every image once (fp16 grids under ``feature_cache.dir``) or reuse the cache entry."""
    require_columns(caption_images, "caption_images", ["image_id", "image_path", "split"])
    enc_spec = dict(params["encoder"])
    if int(enc_spec.get("fine_tune_blocks", 0)):
        raise ValueError("caption_training.encoder.fine_tune_blocks > 0 is not supported by this pipeline: "
                         "set caption_training.encoder_top.cut_stage and decoders.<arch>.train_encoder_top instead "
                         "(the top trains from cached activations)")
    cache_cfg = params["feature_cache"]
    top_cfg = top_config(params)
    encoder, weights = build_encoder(enc_spec)
    fingerprint = encoder_fingerprint(enc_spec, weights)
    transform = build_transform(transform_spec, train=False)
    images = caption_images.sort_values("image_id").reset_index(drop=True)
    cache = FeatureCache(cache_cfg["dir"])
    start = time.perf_counter()
    distributed.ensure_process_group()
    cut = None
    with distributed.main_process_first():  # several processes: rank 0 builds the entry, the others read it
        if top_cfg["cut_stage"] is None:
            cached = cache.get_or_build(encoder, fingerprint, transform, transform_spec, images["image_id"].tolist(),
                                        images["image_path"].tolist(), views=int(cache_cfg.get("views", 1)),
                                        batch_size=int(cache_cfg.get("batch_size", 32)))
        else:
            cut, cached = _cut_and_grid(cache, enc_spec, fingerprint, transform, transform_spec, images, cache_cfg,
                                        top_cfg)
    seconds = cached.seconds_per_image
    if not cached.built:
        seconds = _measure_encoder_seconds(encoder, transform, images["image_path"].tolist(),
                                           int(cache_cfg.get("timing_images", 16)))
    info = {"root": str(cache.root), "key": cached.key, "n_images": len(cached.image_ids),
            "grid_hw": list(cached.grid_hw), "channels": int(cached.features.shape[-1]),
            "views": int(cached.features.shape[1]), "built": cached.built,
            "build_time_s": time.perf_counter() - start if cached.built else 0.0,
            "seconds_per_image": float(seconds), "encoder_weights": weights, "encoder": fingerprint}
    if cut is not None:
        info["cut"] = {"key": cut.key, "cut_stage": top_cfg["cut_stage"], "grid_hw": list(cut.grid_hw),
                       "channels": int(cut.features.shape[-1]), "dtype": top_cfg["dtype"], "built": cut.built}
    logger.info("Feature cache %s: %d images, grid %s x %d channels, %.3fs/image (%s)", cached.key,
                info["n_images"], info["grid_hw"], info["channels"], seconds, "built" if cached.built else "reused")
    return FeatureSet(cached, info, cut)


def top_config(params: dict[str, Any]) -> dict[str, Any]:
    """The ``encoder_top`` block: ``cut_stage`` (None: no cut, every decoder on the frozen encoder's grids) and
    ``dtype`` of the cut cache (float32 unless set)."""
    block = dict(params.get("encoder_top") or {})
    unknown = sorted(set(block) - {"cut_stage", "dtype", "batch_size"})
    if unknown:
        raise ValueError(f"caption_training.encoder_top: unknown keys {unknown} (known: cut_stage, dtype, batch_size)")
    cut = block.get("cut_stage")
    return {"cut_stage": None if cut is None else int(cut), "dtype": str(block.get("dtype", "float32")),
            "batch_size": int(block.get("batch_size", 64))}


def trains_top(params: dict[str, Any], arch: str) -> bool:
    """Whether architecture ``arch`` fine-tunes the encoder top (``decoders.<arch>.train_encoder_top``)."""
    wanted = bool(_decoder_block(params, arch).get("train_encoder_top", False))
    if wanted and top_config(params)["cut_stage"] is None:
        raise ValueError(f"decoders.{base_architecture(arch)}.train_encoder_top needs caption_training.encoder_top."
                         "cut_stage (where the encoder is cut and its activations cached)")
    return wanted


def _cut_and_grid(cache: FeatureCache, enc_spec: dict[str, Any], fingerprint: dict[str, Any], transform,
                  transform_spec: dict[str, Any], images: pd.DataFrame, cache_cfg: dict[str, Any],
                  top_cfg: dict[str, Any]):
    """The cut cache (the bottom's activations of every image) and the frozen encoder's grids computed from it by
    the ImageNet top (equal to a full encoder pass: the top is the same network; written as their own entry)."""
    from .encoder_top import CutEncoder, build_split, cut_to_grid

    _, bottom, top, _ = build_split(enc_spec, top_cfg["cut_stage"])
    cut_fp = {**fingerprint, "cut_stage": top_cfg["cut_stage"]}
    ids, paths = images["image_id"].tolist(), images["image_path"].tolist()
    cut = cache.get_or_build(CutEncoder(bottom), cut_fp, transform, transform_spec, ids, paths,
                             views=int(cache_cfg.get("views", 1)), batch_size=int(cache_cfg.get("batch_size", 32)),
                             dtype=top_cfg["dtype"])
    grid_key = hashlib.sha256(f"{cut.key}/grid/{enc_spec.get('grid_size')}".encode()).hexdigest()[:20]
    if cache.exists(grid_key):
        try:
            grid = cache.load(grid_key)
            if grid.image_ids == cut.image_ids:
                return cut, grid
        except (OSError, EOFError, ValueError, KeyError) as exc:
            logger.warning("Feature cache entry %s cannot be read (%s); rebuilding it", cache.path(grid_key), exc)
    start = time.perf_counter()
    n, views = cut.features.shape[:2]
    out = None
    with torch.inference_mode():
        for lo in tqdm(range(0, n, top_cfg["batch_size"]), desc="grids from the cut", unit="batch"):
            rows = cut.features[lo: lo + top_cfg["batch_size"]]
            grids = torch.stack([cut_to_grid(top, rows[:, v], cut.grid_hw, enc_spec.get("grid_size"))
                                 for v in range(views)], dim=1)
            if out is None:
                out = np.empty((n, *grids.shape[1:]), dtype=np.float16)
            out[lo: lo + len(rows)] = grids.to(torch.float16).numpy()
    side = int(round(out.shape[2] ** 0.5))
    seconds = cut.seconds_per_image + (time.perf_counter() - start) / max(1, n * views)
    grid = cache.put(grid_key, out, cut.image_ids, (side, side), seconds,
                     {"views": int(views), "encoder": fingerprint, "from_cut": cut.key})
    return cut, grid


# ------------------------------------------------------------------------------------------------
# Captions -> tensors
# ------------------------------------------------------------------------------------------------

def references(captions: pd.DataFrame, split: str) -> dict[str, list[str]]:
    """``{image_id: [reference captions]}`` of ``split``, image ids sorted."""
    part = captions[captions["split"] == split]
    return {image_id: group.tolist() for image_id, group in part.groupby("image_id", sort=True)["caption"]}


def judged_split(captions: pd.DataFrame, images: int | None) -> str:
    """Fingerprint of the validation images a figure is measured on: the first ``images`` of the sorted validation
    image ids (all of them when ``images`` is ``None``), the rows :func:`caption_data` puts first. Figures measured
    on different images get different fingerprints, so the registry never compares them."""
    ids = list(references(captions, "val"))
    return split_fingerprint(ids[: int(images)] if images else ids)


def validate_captions(captions: pd.DataFrame, vocab_size: int) -> None:
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


def _split_tensors(captions: pd.DataFrame, split: str, rows: dict[str, int]) -> CaptionSplit:
    part = captions[captions["split"] == split]
    unknown = sorted(set(part["image_id"]) - set(rows))
    if unknown:
        raise ValueError(f"captions_encoded: {len(unknown)} {split} captions refer to images missing from "
                         f"caption_images (e.g. {unknown[:3]})")
    tokens = torch.tensor(np.stack(part["token_ids"].map(np.asarray).tolist()), dtype=torch.long)
    image_rows = torch.tensor([rows[i] for i in part["image_id"]], dtype=torch.long)
    return CaptionSplit(image_rows, tokens)


def caption_data(features: FeatureSet, captions: pd.DataFrame, itos: list[str], cut: bool = False) -> CaptionData:
    """The tensors every decoder trains on: captions of train and val pointing into the feature rows (the grids,
    or with ``cut`` the cut's activations, for a decoder that trains the encoder top)."""
    require_columns(captions, "captions_encoded", ["image_id", "split", "caption", "token_ids"])
    validate_captions(captions, len(itos))
    cached = features.cached
    if cut:
        if features.cut is None:
            raise ValueError("a decoder with train_encoder_top needs the cut cache: set caption_training.encoder_top."
                             "cut_stage and rebuild caption_feature_cache")
        cached = features.cut
    rows = cached.index_of()
    val_refs = references(captions, "val")
    if not val_refs or not (captions["split"] == "train").any():
        raise ValueError("captions_encoded: need captions in both the 'train' and the 'val' split")
    digest = hashlib.sha256(np.stack(captions["token_ids"].map(np.asarray).tolist()).tobytes()).hexdigest()[:12]
    return CaptionData(features=cached.features, train=_split_tensors(captions, "train", rows),
                       val=_split_tensors(captions, "val", rows),
                       val_image_rows=torch.tensor([rows[i] for i in val_refs], dtype=torch.long),
                       val_references=list(val_refs.values()), itos=itos, key=f"{cached.key}-{digest}")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def base_architecture(name: str) -> str:
    """The decoder class a trained row is built from: ``show_attend_tell+scst`` -> ``show_attend_tell``."""
    return str(name).split("+", 1)[0]


def _decoder_block(params: dict[str, Any], arch: str) -> dict[str, Any]:
    return dict((params.get("decoders") or {}).get(base_architecture(arch)) or {})


def decoder_kwargs(params: dict[str, Any], arch: str) -> dict[str, Any]:
    """Keyword arguments of architecture ``arch``'s decoder class (``decoders.<arch>`` without ``training``)."""
    return {k: v for k, v in _decoder_block(params, arch).items() if k not in ("training", "train_encoder_top")}


def train_config(params: dict[str, Any], arch: str, seed: int) -> TrainConfig:
    """The shared ``training`` block overridden by ``decoders.<arch>.training`` (as ``methods.<m>.training``
    does for the LLM study)."""
    merged = {**params["training"], **dict(_decoder_block(params, arch).get("training") or {})}
    return TrainConfig.from_params(merged, seed=seed)


def _result_row(arch: str, n_params: int, result: TrainResult, seconds_per_image: float, n_train: int,
                run_id: str, eval_split: str) -> dict[str, Any]:
    epoch_cached = float(np.mean([h["train_epoch_time_s"] for h in result.history])) if result.history else 0.0
    last = result.history[-1] if result.history else {}
    # Without the cache every training caption's image goes through the encoder again each epoch.
    return {"architecture": arch, "params": n_params, "epochs_run": result.epochs_run,
            "epoch_time_cached_s": epoch_cached, "epoch_time_uncached_s": epoch_cached + seconds_per_image * n_train,
            "final_train_loss": last.get("train_loss", float("nan")),
            "final_val_loss": last.get("val_loss", float("nan")),
            "best_val_bleu4": result.best_val_bleu4, "train_time_s": result.train_time_s,
            "mlflow_run_id": run_id, "eval_split": eval_split}


def train_one(arch: str, data: CaptionData, features: FeatureSet, captions: pd.DataFrame, params: dict[str, Any],
              seed: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Build, train and track one architecture; its result row, history rows and best weights."""
    cfg = train_config(params, arch, seed)
    eval_split = judged_split(captions, cfg.val_bleu_images)
    torch.manual_seed(cfg.seed)
    kwargs = decoder_kwargs(params, arch)
    model = build_model(arch, params, len(data.itos), features.channels)
    if trains_top(params, arch):
        data = data_for(arch, params, features, captions, data)
    n_params, _ = count_parameters(model)
    n_train = int(data.train.tokens.shape[0])
    run_params = {"architecture": arch, "params": n_params, "decoder": kwargs, "training": vars(cfg),
                  "encoder": features.info["encoder"], "feature_cache_key": data.key.split("-")[0],
                  "encoder_top": top_config(params) if trains_top(params, arch) else None,
                  "train_captions": n_train, "vocab_size": len(data.itos)}
    main = distributed.is_main_process()  # several processes (torchrun): rank 0 alone tracks
    with child_run(f"caption_training.{arch}", tags={"architecture": arch}, params=run_params) if main \
            else contextlib.nullcontext() as run:
        result = train_captioner(model, data, cfg, Path(params["checkpoint_dir"]) / arch, name=arch,
                                 resume=bool(params.get("resume", True)), on_epoch_end=epoch_logger() if main else None)
        row = _result_row(arch, n_params, result, features.info["seconds_per_image"], n_train,
                          distributed.broadcast(run.info.run_id if main else ""), eval_split)
        if main:
            log_metrics({"params": n_params, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                         "best_val_bleu4": result.best_val_bleu4, "epoch_time_cached_s": row["epoch_time_cached_s"],
                         "epoch_time_uncached_s": row["epoch_time_uncached_s"], "train_time_s": result.train_time_s})
    logger.info("%s: %d params, %d epochs, best val BLEU-4 %.4f, %.1fs", arch, n_params, result.epochs_run,
                result.best_val_bleu4, result.train_time_s)
    history = [{"architecture": arch, "epoch": int(h["epoch"]), **{k: h[k] for k in HISTORY_COLUMNS[2:]}}
               for h in result.history]
    best = {"model": model.state_dict(), "epoch": result.best_epoch, "val_bleu4": result.best_val_bleu4}
    return row, history, best


def train_architectures(captions: pd.DataFrame, vocab: dict[str, Any], features: FeatureSet,
                        params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train every architecture of ``params["architectures"]`` on the cached features.

    Returns ``caption_model_results`` (one row per architecture, with the fingerprint of the
    validation images it was judged on), ``caption_loss_history`` and ``caption_models`` (best weights).
    """
    data = caption_data(features, captions, list(vocab["itos"]))  # a top-training decoder swaps in the cut's rows
    rows, history, models = [], [], {}
    for arch in params["architectures"]:
        row, arch_history, models[arch] = train_one(arch, data, features, captions, params, seed)
        rows.append(row)
        history.extend(arch_history)
    scst = dict(params.get("scst") or {})
    if scst.get("enabled"):
        base = str(scst.get("architecture") or max(rows, key=lambda r: r["best_val_bleu4"])["architecture"])
        if base not in models:
            raise ValueError(f"scst.architecture: {base!r} was not trained (architectures: {list(models)})")
        row, arch_history, best = train_scst_variant(base, models[base], data, features, captions, params, seed)
        rows.append(row)
        history.extend(arch_history)
        models[row["architecture"]] = best
    return {"caption_model_results": pd.DataFrame(rows, columns=RESULT_COLUMNS),
            "caption_loss_history": pd.DataFrame(history, columns=HISTORY_COLUMNS), "caption_models": models}


def scst_config(params: dict[str, Any], seed: int) -> ScstConfig:
    """The ``scst`` block over what SCST shares with the ``training`` block (validation images, decoding length,
    precision, evaluation batch, label smoothing of the reported validation loss)."""
    training = dict(params["training"])
    shared = {"val_images": training.get("val_bleu_images"), "max_len": training.get("max_decode_len"),
              "precision": training.get("precision"), "eval_batch_size": training.get("eval_batch_size"),
              "label_smoothing": training.get("label_smoothing")}
    return ScstConfig.from_params({**{k: v for k, v in shared.items() if v is not None},
                                   **dict(params.get("scst") or {})}, seed=seed)


def train_scst_variant(base: str, base_best: dict[str, Any], data: CaptionData, features: FeatureSet,
                       captions: pd.DataFrame, params: dict[str, Any],
                       seed: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """SCST of architecture ``base`` from its best cross-entropy weights, tracked as the row ``<base>+scst``."""
    name = f"{base}+scst"
    cfg = scst_config(params, seed)
    eval_split = judged_split(captions, cfg.val_images)
    model = load_trained(base, base_best, params, len(data.itos), features.channels)
    if trains_top(params, base):
        data = data_for(base, params, features, captions, data)
    n_params, _ = count_parameters(model)
    train_refs = references(captions, "train")
    rows = features.cached.index_of()
    train_rows = torch.tensor([rows[i] for i in train_refs], dtype=torch.long)
    run_params = {"architecture": name, "base_architecture": base, "params": n_params,
                  "decoder": decoder_kwargs(params, base), "scst": vars(cfg), "start_epoch": base_best.get("epoch"),
                  "encoder": features.info["encoder"], "feature_cache_key": data.key.split("-")[0],
                  "train_images": len(train_rows), "vocab_size": len(data.itos)}
    main = distributed.is_main_process()
    with child_run(f"caption_training.{name}", tags={"architecture": name, "base_architecture": base},
                   params=run_params) if main else contextlib.nullcontext() as run:
        result = train_scst(model, data, train_rows, list(train_refs.values()), cfg,
                            Path(params["checkpoint_dir"]) / name, name=name, resume=bool(params.get("resume", True)),
                            on_epoch_end=epoch_logger() if main else None)
        trained = [h for h in result.history if int(h["epoch"]) > 0]
        last = result.history[-1]
        row = {"architecture": name, "params": n_params, "epochs_run": result.epochs_run,
               "epoch_time_cached_s": float(np.mean([h["train_epoch_time_s"] for h in trained])) if trained else 0.0,
               "epoch_time_uncached_s": float("nan"), "final_train_loss": float("nan"),
               "final_val_loss": float(last["val_loss"]), "best_val_bleu4": result.best_val_bleu4,
               "train_time_s": result.train_time_s, "mlflow_run_id": distributed.broadcast(run.info.run_id if main else ""),
               "eval_split": eval_split}
        best_record = next(h for h in result.history if int(h["epoch"]) == result.best_epoch)
        if main:
            log_metrics({"params": n_params, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                         "best_val_bleu4": result.best_val_bleu4, "best_val_cider_d": best_record["val_cider_d"],
                         "train_time_s": result.train_time_s})
    logger.info("%s: %d SCST epochs, best epoch %d: val BLEU-4 %.4f (start %.4f), CIDEr-D %.4f (start %.4f), %.1fs",
                name, result.epochs_run, result.best_epoch, result.best_val_bleu4, result.history[0]["val_bleu4"],
                best_record["val_cider_d"], result.history[0]["val_cider_d"], result.train_time_s)
    history = [{"architecture": name, "epoch": int(h["epoch"]), "train_loss": float("nan"), "val_loss": h["val_loss"],
                "val_bleu4": h["val_bleu4"], "lr": h["lr"]} for h in result.history]
    best = {"model": model.state_dict(), "epoch": result.best_epoch, "val_bleu4": result.best_val_bleu4}
    return row, history, best


# ------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------

def load_trained(arch: str, best: dict[str, Any], params: dict[str, Any], vocab_size: int,
                 channels: int) -> torch.nn.Module:
    """Architecture ``arch`` with its best weights (an entry of ``caption_models``), in eval mode."""
    model = build_model(arch, params, vocab_size, channels)
    model.load_state_dict(best["model"])
    return model.eval()


def build_model(arch: str, params: dict[str, Any], vocab_size: int, channels: int) -> torch.nn.Module:
    """Architecture ``arch``'s decoder, or with ``decoders.<arch>.train_encoder_top`` a
    :class:`.encoder_top.TopCaptioner` of the ImageNet encoder top (from ``encoder_top.cut_stage``) and the decoder."""
    decoder = build_decoder(base_architecture(arch), vocab_size, channels, **decoder_kwargs(params, arch))
    if not trains_top(params, arch):
        return decoder
    from .encoder_top import TopCaptioner, build_split

    _, _, top, _ = build_split(dict(params["encoder"]), top_config(params)["cut_stage"])
    return TopCaptioner(top, decoder, grid_size=params["encoder"].get("grid_size"))


def data_for(arch: str, params: dict[str, Any], features: FeatureSet, captions: pd.DataFrame,
             data: CaptionData) -> CaptionData:
    """``data`` with the cut's activations in place of the grids when ``arch`` trains the encoder top."""
    if not trains_top(params, arch):
        return data
    return caption_data(features, captions, data.itos, cut=True)


def trained_model(models: dict[str, Any], arch: str, params: dict[str, Any], vocab_size: int,
                  channels: int) -> torch.nn.Module:
    """The trained ``arch`` of ``caption_models``; a clear error when that architecture was not trained."""
    if arch not in models:
        raise ValueError(f"caption_models has no weights for {arch!r} (has {sorted(models)}); "
                         f"run train_caption_models")
    return load_trained(arch, models[arch], params, vocab_size, channels)


def predict_captions(results: pd.DataFrame, models: dict[str, Any], images: pd.DataFrame, captions: pd.DataFrame,
                     vocab: dict[str, Any], features: FeatureSet,
                     params: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Beam-search captions of the val and test images by every trained architecture, with their references,
    and one test image's attention maps from ``show_attend_tell`` (an empty dict when it was not trained)."""
    itos = list(vocab["itos"])
    paths = dict(zip(images["image_id"], images["image_path"]))
    dec = params["decoding"]
    grid_h, grid_w = features.info["grid_hw"]
    out, sample = [], {}
    for arch in results["architecture"]:
        model = trained_model(models, arch, params, len(itos), features.channels)
        for split in ("val", "test"):
            refs = references(captions, split)
            if not refs:
                continue
            ids = list(refs)
            want_alphas = base_architecture(arch) == "show_attend_tell" and split == "test" and not sample
            decoded = decode_batched(model, features.rows(ids, cut=trains_top(params, arch)),
                                     int(dec.get("batch_size", 64)), int(dec["beam_size"]),
                                     int(dec["max_len"]), float(dec.get("length_penalty", 0.0)), want_alphas,
                                     drop_finished=bool(dec.get("drop_finished", False)))
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
