"""Choose a method's settings on a dev split carved out of ``chat_train``, never on ``chat_test``.

``python -m llm_caption.llm.dev_sweep --env persian_study --method lora --set learning_rate=3.0e-3,6.0e-3``
holds out ``--dev`` conversations of the environment's ``chat_train`` (drawn with the project seed),
trains every variant on the rest with the environment's study settings, and measures each on the
held-out conversations exactly as the study measures a method on the test split: bits per character,
eval loss, chrF++ of the answers to dev questions, Persian share. The untuned model is the first row.

Runs are tracked in a store of their own (``--tracking-uri``, default a sqlite file in ``--out``); a variant is named ``<method>(<key>=<value>)``,
so a sweep never registers a model or touches the project's store. The table is written to
``<out>/dev_sweep.csv`` and printed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from .experiment import split_dev

logger = logging.getLogger(__name__)

SHOWN = ["method", "status", "learning_rate", "train_time_s", "eval_loss", "bits_per_char", "chrf_pp",
         "persian_share"]


def parse_value(text: str) -> Any:
    """``3.0e-3`` -> 0.003, ``16`` -> 16, ``true`` -> True, anything else stays text."""
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def variants(cfg: dict[str, Any], method: str, settings: list[str]) -> dict[str, dict[str, Any]]:
    """One method config per value of each ``key=v1,v2`` setting (``training`` keys or builder ``options``)."""
    methods = cfg.get("methods") or {}
    if method not in methods:
        raise ValueError(f"method {method!r} is not in llm_finetuning.methods ({sorted(methods)})")
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        key, sep, values = setting.partition("=")
        if not sep or not values:
            raise ValueError(f"--set expects key=value[,value...], got {setting!r}")
        for raw in values.split(","):
            variant = copy.deepcopy(methods[method])
            value = parse_value(raw)
            if key in (variant.get("options") or {}):
                variant["options"][key] = value
            else:
                variant.setdefault("training", {})[key] = value
            out[f"{method}({key}={raw})"] = variant
    return out


def sweep(chat_train: pd.DataFrame, cfg: dict[str, Any], model_spec: dict[str, Any], seed: int, method: str,
          settings: list[str], n_dev: int, out: Path) -> pd.DataFrame:
    from .experiment import run_methods

    rest, dev = split_dev(chat_train, n_dev, seed)
    cfg = copy.deepcopy(cfg)
    cfg["n_dev_conversations"] = 0  # the dev conversations are this sweep's test split
    cfg["release"] = {"enabled": False}
    extra = variants(cfg, method, settings)
    cfg["methods"] = {"base": cfg["methods"].get("base", {"builder": "none"}), **extra}
    cfg["methods_to_run"] = list(cfg["methods"])
    cfg["n_eval_conversations"] = None  # every dev conversation
    cfg["output_dir"] = str(out / "models")
    cfg["checkpoint_dir"] = str(out / "checkpoints")
    cfg.pop("model_comparison", None)
    logger.info("dev sweep: %d train / %d dev conversations, variants %s", len(rest), len(dev), list(extra))
    table = run_methods(rest, dev, cfg, model_spec, seed)["llm_method_results"]
    lr = {name: (m.get("training") or {}).get("learning_rate") for name, m in cfg["methods"].items()}
    table.insert(2, "learning_rate", table["method"].map(lr))
    return table


def env_chat_train(env: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """(parameters, chat_train) of Kedro environment ``env``, from the project in the working directory."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(Path.cwd())
    with KedroSession.create(env=env) as session:
        context = session.load_context()
        return context.params, context.catalog.load("chat_train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_caption.llm.dev_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="base", help="Kedro environment whose study settings and chat_train are used")
    parser.add_argument("--method", default="lora", help="method of llm_finetuning.methods to vary")
    parser.add_argument("--set", dest="settings", action="append", required=True,
                        help="key=v1,v2: a training field (learning_rate, max_steps ...) or a builder option (r ...)")
    parser.add_argument("--dev", type=int, default=None,
                        help="conversations of chat_train held out as dev (default: the environment's "
                             "llm_finetuning.n_dev_conversations, so the study's own dev split; else 64)")
    parser.add_argument("--out", type=Path, default=Path("data/dev_sweep"), help="models, checkpoints and table")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of the sweep (default: <out>/sweep.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import mlflow

    params, chat_train = env_chat_train(args.env)
    args.out.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(args.tracking_uri or f"sqlite:///{(args.out / 'sweep.db').resolve()}")
    mlflow.set_experiment("llm_dev_sweep")
    spec = params["llm_models"][params["llm_model"]]
    args.dev = args.dev or int(params["llm_finetuning"].get("n_dev_conversations") or 64)
    table = sweep(chat_train, params["llm_finetuning"], spec, int(params["seed"]), args.method, args.settings,
                  args.dev, args.out)
    table.to_csv(args.out / "dev_sweep.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[SHOWN].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
