"""The study's write-up as one self-contained HTML file (Jinja2 template, images base64-embedded).

:func:`build_report_context` turns the run's datasets into plain values; :func:`render_report`
fills ``templates/report.html.jinja`` with them. Nothing in the page is typed in by hand:
every number comes from a dataset of the run, and the page links nothing outside itself.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from .tables import BASE_ROW

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Criterion:
    """One line of the summary: which row wins on ``column`` of a table."""

    label: str
    column: str
    greater_is_better: bool


#: Summary lines per table: (label, column, direction).
CHAT_CRITERIA = (
    Criterion("fewest bits per character on the test split", "bits_per_char", False),
    Criterion("lowest eval loss on the test split", "eval_loss", False),
    Criterion("highest chrF++ against the reference answers", "chrf_pp", True),
    Criterion("highest chrF against the reference answers", "chrf", True),
    Criterion("highest ROUGE-L (Persian tokens)", "rouge_l", True),
    Criterion("highest Persian-script share of the answers", "persian_share", True),
    Criterion("fewest trainable parameters", "trainable_params", False),
    Criterion("lowest peak memory", "peak_memory_mb", False),
    Criterion("shortest training time", "train_time_s", False),
    Criterion("least repetition", "repetition_rate", False),
)
CAPTION_CRITERIA = (
    Criterion("highest BLEU-4 (coco-caption)", "coco_bleu_4", True),
    Criterion("highest BLEU-4 (nltk, smoothed)", "nltk_bleu_4", True),
    Criterion("highest METEOR", "meteor", True),
    Criterion("highest ROUGE-L", "rouge_l", True),
    Criterion("highest CIDEr-D", "cider_d", True),
    Criterion("fewest parameters", "params", False),
    Criterion("shortest training time", "train_time_s", False),
)


def png_data_uri(png: bytes | None) -> str | None:
    """``data:image/png;base64,...`` for ``png`` (``None`` stays ``None``)."""
    if png is None:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fmt(value: Any) -> str:
    """A number as the report prints it (thousands separators, 4 significant digits, n/a for NaN)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def winners(table: pd.DataFrame, key: str, criteria: Sequence[Criterion], exclude: Sequence[str] = ()) -> list[str]:
    """One sentence per criterion naming the winning row(s) and the value (criteria without data are skipped).

    Ties are named as ties: every row sharing the best value is listed, and a criterion on which
    all rows are equal says so instead of crowning the first row.
    """
    rows = table[~table[key].isin(exclude)]
    sentences = []
    for crit in criteria:
        if crit.column not in rows.columns:
            continue
        values = pd.to_numeric(rows[crit.column], errors="coerce")
        known = values.dropna()
        if known.empty:
            continue
        best_value = float(known.max() if crit.greater_is_better else known.min())
        best_rows = rows.loc[known[known == best_value].index, key].astype(str).tolist()
        if len(known) > 1 and len(best_rows) == len(known):
            sentences.append(f"{crit.label}: all {len(known)} tied at {fmt(best_value)}")
        else:
            sentences.append(f"{crit.label}: {', '.join(best_rows)} ({fmt(best_value)})")
    return sentences


def lookup(report: Mapping[str, Any] | None, dotted_key: str) -> Any:
    """``report["a"]["b"]`` for ``"a.b"``; ``None`` when any part is missing."""
    value: Any = report
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def flatten_report(report: Mapping[str, Any] | None, prefix: str = "") -> list[tuple[str, str]]:
    """``[(key.path, value)]`` of the scalar entries of a data report (nested mappings flattened)."""
    if not report:
        return []
    out: list[tuple[str, str]] = []
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(flatten_report(value, name + "."))
        elif isinstance(value, (list, tuple)):
            if len(value) <= 8 and all(not isinstance(v, (Mapping, list)) for v in value):
                out.append((name, ", ".join(fmt(v) for v in value)))
        else:
            out.append((name, fmt(value)))
    return out


def best_and_worst(per_image: pd.DataFrame, architecture: str, split: str = "test", metric: str = "cider_d",
                   k: int = 3) -> dict[str, list[dict[str, str]]]:
    """The ``k`` best and worst images of ``architecture`` on ``split`` by a per-image ``metric``."""
    rows = per_image[(per_image["architecture"] == architecture) & (per_image["split"] == split)]
    if rows.empty or metric not in rows.columns:
        return {"best": [], "worst": []}
    ordered = rows.sort_values([metric, "image_id"], ascending=[False, True], kind="stable")

    def pack(frame: pd.DataFrame) -> list[dict[str, str]]:
        return [{"image_id": str(r["image_id"]), "score": fmt(float(r[metric])), "prediction": str(r["prediction"]),
                 "reference": str(list(r["references"])[0])} for _, r in frame.iterrows()]

    return {"best": pack(ordered.head(k)), "worst": pack(ordered.tail(k).iloc[::-1])}


def render_report(context: Mapping[str, Any], template: str = "report.html.jinja") -> str:
    """Fill the report template with ``context`` (auto-escaped; tables are pre-rendered HTML)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             autoescape=jinja2.select_autoescape(["html", "jinja"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    return env.get_template(template).render(**context)


def generated_at() -> str:
    """UTC time stamp for the report header."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def chat_samples(generations: pd.DataFrame, per_method: int) -> list[dict[str, str]]:
    """Test answers shown in the report: the base model's first ``per_method`` (before), then each method's."""
    test = generations[generations["prompt_kind"] == "test"].fillna({"answer": "", "reference": "", "prompt": ""})
    test = test.sort_values(["stage", "method"], kind="stable")
    samples = []
    before = test[test["stage"] == "before"]
    if not before.empty:
        first = before.groupby("prompt", sort=False).head(1).head(per_method)
        samples += [{"method": "base model", "stage": "before", "prompt": str(r.prompt),
                     "answer": str(r.answer), "reference": str(r.reference)} for r in first.itertuples()]
    for method, group in test[test["stage"] == "after"].groupby("method", sort=True):
        samples += [{"method": str(method), "stage": "after", "prompt": str(r.prompt), "answer": str(r.answer),
                     "reference": str(r.reference)} for r in group.head(per_method).itertuples()]
    return samples


def _sizes(params: Mapping[str, Any], chat_table: pd.DataFrame, caption_table: pd.DataFrame, untrained: list[str],
           caption_predictions: pd.DataFrame, llm_generations: pd.DataFrame,
           reports: Mapping[str, Mapping[str, Any] | None]) -> list[tuple[str, Any]]:
    """The setup table: how many methods, architectures, images and answers the run measured."""
    split = params["caption_split"]
    answers_per_method = llm_generations[(llm_generations["prompt_kind"] == "test")
                                         & (llm_generations["stage"] == "after")].groupby("method").size()
    test_preds = caption_predictions[caption_predictions["split"] == split]
    sizes = [
        ("chat fine-tuning methods (without the untrained base model)",
         int((~chat_table["method"].isin([BASE_ROW, *untrained])).sum())),
        ("chat test answers scored per method", int(answers_per_method.max()) if len(answers_per_method) else 0),
        ("captioning architectures", len(caption_table)),
        *[(f"caption {s} images scored", int(caption_predictions[caption_predictions["split"] == s]["image_id"].nunique()))
          for s in sorted(caption_predictions["split"].unique())],
        (f"reference captions per {split} image (mean)",
         fmt(float(test_preds["references"].map(len).mean())) if len(test_preds) else "n/a"),
    ]
    for entry in params.get("data_sizes", []):
        value = lookup(reports.get(entry["report"]), entry["key"])
        sizes.append((entry["label"], "n/a (not in " + entry["report"] + ")" if value is None else value))
    return sizes


def figure_sections(params: Mapping[str, Any], figures: Mapping[str, bytes | None]) -> dict[str, list[dict[str, Any]]]:
    """``{"chat"|"caption"|"eda": [{"title", "uri"}]}`` in the order of ``params["figures"]``."""
    sections: dict[str, list[dict[str, Any]]] = {"chat": [], "caption": [], "eda": []}
    for name, spec in params["figures"].items():
        if name not in figures:
            raise KeyError(f"reporting.figures names {name!r}, which is not an input of build_report")
        sections[spec["section"]].append({"title": spec["title"], "uri": png_data_uri(figures[name])})
    return sections


def release_table_html(release: pd.DataFrame | None) -> str:
    """The release stage's table as HTML ("" when the stage did not run)."""
    if release is None or release.empty:
        return ""
    from .tables import RELEASE_COLUMNS, render_table

    return render_table(release.reindex(columns=list(RELEASE_COLUMNS)), RELEASE_COLUMNS)[1]


def build_report_context(params: Mapping[str, Any], seed: int, run_id: str, env: str | None, *,
                         chat_table: pd.DataFrame, caption_table: pd.DataFrame, chat_table_html: str,
                         caption_table_html: str, caption_metrics: pd.DataFrame,
                         caption_per_image_scores: pd.DataFrame, caption_predictions: pd.DataFrame,
                         llm_generations: pd.DataFrame, chat_data_report: Mapping[str, Any] | None,
                         caption_data_report: Mapping[str, Any] | None,
                         figures: Mapping[str, bytes | None],
                         llm_release_results: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every value the report template shows, from the run's datasets (``run_id``/``env``: the MLflow run)."""
    # Rows without trainable parameters (the untouched base model) are references, not contenders.
    untrained = chat_table.loc[pd.to_numeric(chat_table["trainable_params"], errors="coerce") == 0, "method"].tolist()
    split = params["caption_split"]
    reports = {"chat_data_report": chat_data_report, "caption_data_report": caption_data_report}
    sizes = _sizes(params, chat_table, caption_table, untrained, caption_predictions, llm_generations, reports)
    sections = figure_sections(params, figures)
    best_arch = str(caption_table.iloc[0]["architecture"]) if len(caption_table) else None
    implementations = (caption_metrics[["metric", "implementation"]].drop_duplicates("metric")
                       .sort_values("metric").itertuples(index=False, name=None))
    notes = list(params.get("notes", []))
    missing = caption_metrics[caption_metrics["value"].isna()]
    for row in missing.drop_duplicates("metric").itertuples():
        notes.append(f"{row.metric} was not computed in this run ({row.implementation}).")
    return {
        "title": params["title"], "generated_at": generated_at(),
        "environment": env or params.get("default_environment_label", "local"), "seed": seed,
        "mlflow_run_id": run_id, "sizes": [(k, fmt(v)) for k, v in sizes],
        "chat_data_rows": flatten_report(chat_data_report), "caption_data_rows": flatten_report(caption_data_report),
        "chat_summary": winners(chat_table, "method", CHAT_CRITERIA, exclude=[BASE_ROW, *untrained]),
        "caption_summary": winners(caption_table, "architecture", CAPTION_CRITERIA),
        "caption_split": split, "chat_table_html": chat_table_html, "caption_table_html": caption_table_html,
        "release_table_html": release_table_html(llm_release_results),
        "chat_figures": sections["chat"], "caption_figures": sections["caption"], "eda_figures": sections["eda"],
        "chat_samples": chat_samples(llm_generations, params["n_chat_samples"]),
        "best_worst_arch": best_arch,
        "best_worst": best_and_worst(caption_per_image_scores, best_arch, split) if best_arch else {},
        "implementations": list(implementations), "notes": notes,
    }
