"""Choose the SCST settings on the validation split: every variant from the same cross-entropy weights.

``python -m llm_caption.captioning.scst_sweep --env flickr8k --set lr=5.0e-5,2.0e-4 --set samples=5 --epochs 2``
loads the environment's caption feature cache, captions and vocabulary, takes the best cross-entropy
weights of ``--architecture`` (default: the ``scst.architecture`` of the parameters, else
``show_attend_tell``) from ``<checkpoint_dir>/<architecture>/best.pt`` (written by
``kedro run --pipeline=caption_training``), and runs SCST once per value of each ``--set key=v1,v2``
(a key of the ``scst`` block), for ``--epochs`` epochs. Every epoch is measured as the pipeline measures
it: greedy captions of the validation images (``val_images``), BLEU-4, CIDEr-D, diversity; epoch 0 is
the starting point. Nothing is tracked or registered; the per-epoch table is written to
``<out>/scst_sweep.csv`` and printed. ``--variant "batch_images=10 lr=1.0e-4"`` is one variant that changes
several keys at once. Checkpoints go to ``<out>/<variant>``, so a killed sweep resumes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

logger = logging.getLogger(__name__)

SHOWN = ["variant", "epoch", "sample_reward", "greedy_reward", "xe_loss", "val_bleu4", "val_cider_d", "val_distinct_captions",
         "val_vocab_used", "val_loss", "train_epoch_time_s"]


def parse_settings(settings: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """``["lr=1e-4,2e-4"]`` -> ``[("lr=1e-4", {"lr": 1e-4}), ("lr=2e-4", {"lr": 2e-4})]``."""
    from ..llm.dev_sweep import parse_value

    out = []
    for setting in settings:
        key, sep, values = setting.partition("=")
        if not sep or not values:
            raise ValueError(f"--set expects key=value[,value...], got {setting!r}")
        out.extend((f"{key}={raw}", {key: parse_value(raw)}) for raw in values.split(","))
    return out


def parse_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """``"batch_images=10 lr=1e-4"`` -> ``("batch_images=10 lr=1e-4", {"batch_images": 10, "lr": 1e-4})``:
    one variant that changes several keys at once."""
    from ..llm.dev_sweep import parse_value

    overrides: dict[str, Any] = {}
    for part in variant.split():
        key, sep, raw = part.partition("=")
        if not sep or not key or not raw:
            raise ValueError(f"--variant expects 'key=value key=value ...', got {variant!r} ({part!r})")
        if key in overrides:
            raise ValueError(f"--variant {variant!r} sets {key!r} twice")
        overrides[key] = parse_value(raw)
    if not overrides:
        raise ValueError("--variant is empty")
    return " ".join(variant.split()), overrides


def load_environment(env: str, datasets: list[str], threads: int | None) -> tuple[dict[str, Any], list[Any]]:
    """The Kedro environment ``env``'s parameters and the catalog entries ``datasets``; sets torch's threads to
    ``threads`` (default: ``caption_training.torch_num_threads``)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(Path.cwd())
    with KedroSession.create(env=env) as session:
        context = session.load_context()
        params = context.params
        loaded = [context.catalog.load(name) for name in datasets]
    threads = threads or params["caption_training"].get("torch_num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    return params, loaded


def load_start(checkpoint_dir: Path, architecture: str) -> dict[str, Any]:
    """The best cross-entropy weights of ``architecture`` (``best.pt``, loaded without pickle)."""
    path = checkpoint_dir / architecture / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train {architecture} first "
                                f"(kedro run --pipeline=caption_training with this environment)")
    best = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(best, dict) or not isinstance(best.get("model"), dict):
        raise ValueError(f"{path} does not hold a captioner's best weights")
    return best


def sweep(features, captions: pd.DataFrame, vocab: dict[str, Any], params: dict[str, Any], seed: int,
          architecture: str, variants: list[tuple[str, dict[str, Any]]], epochs: int, out: Path) -> pd.DataFrame:
    from .experiment import caption_data, data_for, load_trained, references, scst_config
    from .scst import train_scst

    data = data_for(architecture, params, features, captions, caption_data(features, captions, list(vocab["itos"])))
    start = load_start(Path(params["checkpoint_dir"]), architecture)
    train_refs = references(captions, "train")
    rows = features.cached.index_of()
    train_rows = torch.tensor([rows[i] for i in train_refs], dtype=torch.long)
    frames = []
    for name, overrides in variants:
        scst = {**dict(params.get("scst") or {}), **overrides, "epochs": epochs}
        cfg = scst_config({**params, "scst": scst}, seed)
        model = load_trained(architecture, start, params, len(data.itos), features.channels)
        logger.info("SCST variant %s from %s epoch %s: %s", name, architecture, start.get("epoch"), cfg)
        folder = out / name.replace("=", "_").replace(" ", "_")
        result = train_scst(model, data, train_rows, list(train_refs.values()), cfg, folder, name=name)
        frame = pd.DataFrame(result.history)
        frame.insert(0, "variant", name)
        frames.append(frame)
        table = pd.concat(frames, ignore_index=True)
        table.to_csv(out / "scst_sweep.csv", index=False)
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_caption.captioning.scst_sweep",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="base", help="Kedro environment (its features, captions and checkpoints)")
    parser.add_argument("--architecture", default=None, help="cross-entropy architecture to start from")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        help="key=v1,v2: a key of caption_training.scst (lr, samples, baseline, batch_images ...), "
                             "one variant per value")
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        help="'key=value key=value': one variant that changes several keys at once")
    parser.add_argument("--epochs", type=int, default=2, help="SCST epochs of every variant")
    parser.add_argument("--out", type=Path, default=Path("data/scst_sweep"), help="checkpoints and table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch_num_threads)")
    args = parser.parse_args(argv)
    if not args.settings and not args.variants:
        parser.error("give at least one --set or --variant")
    variants = parse_settings(args.settings) + [parse_variant(v) for v in args.variants]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    params, (features, captions, vocab) = load_environment(
        args.env, ["caption_feature_cache", "captions_encoded", "caption_vocab"], args.threads)
    cfg = params["caption_training"]
    architecture = args.architecture or (cfg.get("scst") or {}).get("architecture") or "show_attend_tell"
    args.out.mkdir(parents=True, exist_ok=True)
    table = sweep(features, captions, vocab, cfg, int(params["seed"]), architecture, variants,
                  args.epochs, args.out)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(table[[c for c in SHOWN if c in table.columns]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
