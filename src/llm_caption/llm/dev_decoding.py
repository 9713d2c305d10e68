"""Choose the decoding settings on dev answers, never on test answers.

``python -m llm_caption.llm.dev_decoding --env persian_study --adapter data/dev_sweep/models/lora(learning_rate=0.001)
--candidate repetition_penalty=1.2 --candidate repetition_penalty=1.1,no_repeat_ngram_size=4``

The fine-tuned model in ``--adapter`` (trained without the dev conversations: ``dev_sweep`` trains on the rest of
``chat_train``) answers the first user turn of ``--questions`` dev conversations of the environment's
``chat_train`` (the same dev split as the study's ``n_dev_conversations``) once per candidate: the environment's
``llm_finetuning.generation`` with the candidate's ``key=value`` changes. Each candidate gets chrF++ against the
dev references, the ended rate (answers that end on their own before ``max_new_tokens``), the Persian share of
the answer letters and the mean answer length, and the table is printed and written to ``<out>/dev_decoding.csv``.

The rule that picks one (``choose``): among the candidates whose dev answers end on their own at least
``--min-ended`` of the time and are at least ``--min-persian`` Persian, the highest chrF++ (chrF++ alone would
prefer long answers that never stop); when none qualifies, the highest ended rate.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .dev_sweep import parse_value

logger = logging.getLogger(__name__)

COLUMNS = ["candidate", "chrf_pp", "ended_rate", "test_persian_share", "answer_chars", "n_test_answers", "chosen"]


def parse_candidate(text: str) -> dict[str, Any]:
    """``"key=value,key=value"`` -> settings (values parsed like ``dev_sweep --set``, ``a:b`` a pair); ``""`` is
    no change."""
    settings: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--candidate takes key=value pairs separated by commas, got {part!r} in {text!r}")
        raw = raw.strip()
        # ``a:b`` is a pair (e.g. exponential_decay_length_penalty=32:1.05 -> [32, 1.05])
        settings[key.strip()] = [parse_value(v) for v in raw.split(":")] if ":" in raw else parse_value(raw)
    return settings


def choose(table: pd.DataFrame, min_ended: float = 0.8, min_persian: float = 0.9) -> int:
    """Index of the chosen row of ``table`` (see the module's rule)."""
    good = table[(table["ended_rate"] >= min_ended) & (table["test_persian_share"] >= min_persian)]
    if not good.empty:
        return int(good["chrf_pp"].astype(float).idxmax())
    return int(table["ended_rate"].astype(float).idxmax())


def measure(model, tokenizer, chat_dev: pd.DataFrame, generation: Mapping[str, Any],
            candidates: list[dict[str, Any]], n_questions: int, seed: int, batch_size: int = 16) -> pd.DataFrame:
    """One row per candidate: its answers to ``n_questions`` dev questions, measured like the study's."""
    from .experiment import answer_metrics, generation_prompts
    from .generation import generate_answers

    prompts = generation_prompts(chat_dev, {"fixed_prompts": [], "n_test_generations": n_questions}, seed)
    rows = []
    for candidate in candidates:
        settings = {**dict(generation), **candidate}
        answers, ended = generate_answers(model, tokenizer, [p["conversation"] for p in prompts], settings,
                                          batch_size=batch_size, with_ended=True)
        label = ", ".join(f"{k}={v}" for k, v in candidate.items()) or "as configured"
        rows.append({"candidate": label, **answer_metrics(prompts, answers, ended)})
        logger.info("dev decoding %s: %s", label, {k: round(float(v), 3) for k, v in rows[-1].items() if k != "candidate"})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_caption.llm.dev_decoding", description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="base", help="Kedro environment whose chat_train and generation are used")
    parser.add_argument("--adapter", type=Path, required=True, help="a saved method trained without the dev split")
    parser.add_argument("--candidate", action="append", default=None,
                        help="key=value[,key=value]: changes to llm_finetuning.generation (repeat; '' = as configured)")
    parser.add_argument("--questions", type=int, default=32, help="dev questions each candidate answers")
    parser.add_argument("--min-ended", type=float, default=0.8)
    parser.add_argument("--min-persian", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("data/dev_sweep"), help="where dev_decoding.csv goes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from .adapters import load_finetuned
    from .dev_sweep import env_chat_train
    from .experiment import dev_split

    params, chat_train = env_chat_train(args.env)
    cfg = params["llm_finetuning"]
    seed = int(params["seed"])
    _, dev = dev_split(chat_train, cfg, seed)
    if dev is None:
        parser.error(f"environment {args.env!r} has no dev split (llm_finetuning.n_dev_conversations)")
    candidates = [parse_candidate(c) for c in (args.candidate or [""])]
    model, tokenizer = load_finetuned(args.adapter)
    table = measure(model, tokenizer, dev, cfg.get("generation") or {}, candidates, args.questions, seed,
                    int(cfg.get("generation_batch_size") or 8))
    table["chosen"] = False
    table.loc[choose(table, args.min_ended, args.min_persian), "chosen"] = True
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "dev_decoding.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[COLUMNS].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
