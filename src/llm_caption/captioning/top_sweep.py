"""Decide on the validation split whether (and where) a captioner should fine-tune the encoder top.

``python -m llm_caption.captioning.top_sweep --env flickr8k --variant frozen --variant "cut_stage=5 top_lr=1e-4"
--epochs 7`` trains ``--architecture`` (default ``show_attend_tell``, its configured decoder and training block)
once per variant from the same seed, for ``--epochs`` epochs, and measures every epoch as the pipeline does:
greedy captions of the validation images, BLEU-4 and CIDEr-D, plus the teacher-forced validation loss.
``frozen`` trains on the frozen encoder's grids (today's pipeline); ``cut_stage=N top_lr=X`` caches the
activations entering stage ``N`` and fine-tunes stages ``N..6`` and the head at learning rate ``X``. Every key
of a variant other than ``cut_stage`` is a key of the architecture's training block (``lr``, ``top_lr``,
``epochs`` ...). The frozen variant reads the grids the first cut variant's top computes from its cut (the same
numbers as a full encoder pass; ``--frozen-grids-from-cut N`` names the cut) or, with no cut, the plain grid
cache.

Nothing is tracked or registered; the per-epoch table goes to ``<out>/top_sweep.csv`` and is printed.
Checkpoints go to ``<out>/<variant>``, so a killed sweep resumes.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

logger = logging.getLogger(__name__)

SHOWN = ["variant", "epoch", "train_loss", "val_loss", "val_bleu4", "val_cider_d", "lr", "train_epoch_time_s"]


def variant_params(params: dict[str, Any], architecture: str, overrides: dict[str, Any],
                   epochs: int) -> dict[str, Any]:
    """The caption_training parameters of one variant: ``cut_stage`` goes to ``encoder_top`` (and switches on
    ``train_encoder_top`` for ``architecture``), every other key to the architecture's training block."""
    out = copy.deepcopy(params)
    overrides = dict(overrides)
    cut = overrides.pop("cut_stage", None)
    block = out.setdefault("decoders", {}).setdefault(architecture, {})
    block["training"] = {**dict(block.get("training") or {}), **overrides, "epochs": epochs}
    block["train_encoder_top"] = cut is not None
    if cut is not None:
        out["encoder_top"] = {**dict(out.get("encoder_top") or {}), "cut_stage": int(cut)}
    return out


def sweep(images: pd.DataFrame, transform_spec: dict[str, Any], captions: pd.DataFrame, vocab: dict[str, Any],
          params: dict[str, Any], seed: int, architecture: str, variants: list[tuple[str, dict[str, Any]]],
          epochs: int, out: Path, frozen_cut: int | None = None) -> pd.DataFrame:
    from .experiment import build_features, build_model, caption_data, data_for, train_config
    from .training import train_captioner

    cuts = [v["cut_stage"] for _, v in variants if v.get("cut_stage") is not None]
    if frozen_cut is not None:
        cuts.insert(0, int(frozen_cut))
    base = variant_params(params, architecture, {"cut_stage": cuts[0]} if cuts else {}, epochs)
    features_by_cut = {}
    frames = []
    for name, overrides in variants:
        vparams = variant_params(params, architecture, overrides, epochs)
        cut = overrides.get("cut_stage", cuts[0] if cuts else None)
        if cut not in features_by_cut:
            fparams = variant_params(params, architecture, {"cut_stage": cut} if cut is not None else {}, epochs)
            features_by_cut[cut] = build_features(images, transform_spec, fparams if cut is not None else base)
        features = features_by_cut[cut]
        cfg = train_config(vparams, architecture, seed)
        data = data_for(architecture, vparams, features, captions,
                        caption_data(features, captions, list(vocab["itos"])))
        torch.manual_seed(cfg.seed)
        model = build_model(architecture, vparams, len(data.itos), features.channels)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("variant %s: %s, %d trainable parameters, %s", name, type(model).__name__, trainable, cfg)
        folder = out / name.replace("=", "_").replace(" ", "_")
        result = train_captioner(model, data, cfg, folder, name=name)
        frame = pd.DataFrame(result.history)
        frame.insert(0, "variant", name)
        frame["trainable_params"] = trainable
        frames.append(frame)
        pd.concat(frames, ignore_index=True).to_csv(out / "top_sweep.csv", index=False)
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    from .scst_sweep import load_environment, parse_variant

    parser = argparse.ArgumentParser(prog="python -m llm_caption.captioning.top_sweep",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="base", help="Kedro environment (its images, captions and parameters)")
    parser.add_argument("--architecture", default="show_attend_tell")
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        help="'frozen' or 'cut_stage=N top_lr=X [training key=value ...]'")
    parser.add_argument("--epochs", type=int, default=7, help="epochs of every variant")
    parser.add_argument("--out", type=Path, default=Path("data/top_sweep"), help="checkpoints and table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch_num_threads)")
    parser.add_argument("--frozen-grids-from-cut", type=int, default=None,
                        help="the frozen variant reads the grids computed from this cut's cache (default: the first "
                             "cut variant's; none: the plain grid cache)")
    args = parser.parse_args(argv)
    if not args.variants:
        parser.error("give at least one --variant")
    variants = [("frozen", {}) if v.strip() == "frozen" else parse_variant(v) for v in args.variants]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    params, (images, transform_spec, captions, vocab) = load_environment(
        args.env, ["caption_images", "image_transform_spec", "captions_encoded", "caption_vocab"], args.threads)
    cfg = params["caption_training"]
    args.out.mkdir(parents=True, exist_ok=True)
    table = sweep(images, transform_spec, captions, vocab, cfg, int(params["seed"]), args.architecture, variants,
                  args.epochs, args.out, args.frozen_grids_from_cut)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(table[[c for c in SHOWN if c in table.columns]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
