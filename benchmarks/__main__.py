"""``python -m benchmarks`` (``make bench``): every benchmark side by side, written to ``benchmarks/results.md``
and logged as one MLflow run (experiment ``benchmarks``).

    python -m benchmarks [--tiny] [--out benchmarks/results.md] [--tracking-uri URI] [--threads 2]

``--tiny`` runs the same code on a few images, conversations and steps (the test suite runs it so that the
harness cannot rot); its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

from .llm import MODELS  # noqa: E402 (after the offline settings)

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "full": {"llm": dict(steps=40, reps=2, batch=4, seq_len=96, n_train=160, n_eval=16),
             "llm_models": {"smollm2_135m_instruct": {}, "gemma3_270m": {}},
             "caption": dict(n_images=64, n_beam_images=128, epochs=1, reps=2, batch=64, extra_epochs=15),
             "latency": dict(reps=3, serve=True, serve_requests=20),
             "peak_s": 2.0},
    "tiny": {"llm": dict(steps=3, reps=1, batch=2, seq_len=64, n_train=12, n_eval=4),
             "llm_models": {"smollm2_135m_instruct": {}, "gemma3_270m": {"tiny_model": True}},
             "caption": dict(n_images=6, n_beam_images=4, epochs=1, reps=1, batch=8, extra_epochs=2),
             "latency": dict(reps=1, serve=False, serve_requests=2),
             "peak_s": 0.2},
}
# Final eval losses of the LLM paths must agree within this, relative to the peer's.
LOSS_RELATIVE_TOLERANCE = 1e-3
# Models of the LLM benchmark, their labels, metric prefixes and goals against peer A (ratio of tokens/s, ratio
# of the whole training call's wall time).
MODEL_LABELS = {"smollm2_135m_instruct": "SmolLM2-135M", "gemma3_270m": "Gemma-3-270m"}
METRIC_PREFIX = {"smollm2_135m_instruct": "llm_", "gemma3_270m": "llm_gemma_"}
LLM_GOALS = {"smollm2_135m_instruct": {"tokens_per_s": 1.3, "whole_s": 1.3}, "gemma3_270m": {"tokens_per_s": 1.6}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps and images: checks the harness, not speed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"), help="the table (Markdown)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every side")
    parser.add_argument("--skip", nargs="*", default=[], choices=["llm", "caption", "latency"],
                        help="benchmarks to leave out")
    parser.add_argument("--chat-store", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}",
                        help="store holding persian-chat-adapter@champion for the chat latency rows (read only)")
    parser.add_argument("--llm-steps", type=int, default=None, help="training steps per LLM run (default 40)")
    parser.add_argument("--llm-models", nargs="*", default=None, choices=list(MODELS),
                        help="LLM benchmark models (default both)")
    parser.add_argument("--reps", type=int, default=None, help="alternating repetitions of every side (default 2)")
    return parser.parse_args(argv)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _llm_rows(rows: list, metrics: dict[str, float], peak: dict[str, Any], model: str, llm: dict[str, Any]) -> None:
    """The rows of one model's LoRA benchmark (tokens/s, whole-call time, s/step, peak RSS, final eval loss per
    peer; share of the machine peak per path) and its metrics (prefix ``llm_`` for SmolLM2, ``llm_gemma_`` ...)."""
    sides = llm["sides"]
    project = sides["project"]
    flops = llm["flops_per_token"]
    prefix = METRIC_PREFIX.get(model, f"llm_{model}_")
    label = MODEL_LABELS.get(model, model)
    goals = LLM_GOALS.get(model, {})
    peak_llm = peak["bf16"] if llm["settings"]["bf16_autocast"] else peak["fp32"]

    def goal_cells(figure: str, peer: str, value: float) -> tuple[str, str]:
        goal = goals.get(figure) if peer == "peer_a" else None
        return (f"≥ {goal}x", "met" if value >= goal else "not met") if goal else ("", "")

    for peer, peer_label in (("peer_a", "A: Trainer + PEFT"), ("peer_b", "B: TRL SFTTrainer defaults")):
        if peer not in sides:
            continue
        other = sides[peer]
        letter = peer[-1].upper()
        r = ratio(project["tokens_per_s"].median, other["tokens_per_s"].median)
        rows.append((f"1 LLM LoRA fine-tuning, {label}", f"tokens/s vs peer {peer_label}",
                     project["tokens_per_s"].text("{:.0f}"), other["tokens_per_s"].text("{:.0f}"), f"{r:.2f}x",
                     *goal_cells("tokens_per_s", peer, r)))
        w = ratio(other["whole_s"].median, project["whole_s"].median)
        rows.append(("", f"whole training call s ({llm['settings']['steps']} steps + eval) vs peer {letter}",
                     project["whole_s"].text("{:.1f}"), other["whole_s"].text("{:.1f}"), f"{w:.2f}x",
                     *goal_cells("whole_s", peer, w)))
        rows.append(("", f"s/step vs peer {letter}", project["s_per_step"].text("{:.2f}"),
                     other["s_per_step"].text("{:.2f}"),
                     f"{ratio(other['s_per_step'].median, project['s_per_step'].median):.2f}x", "", ""))
        rows.append(("", f"peak RSS MB vs peer {letter}", project["peak_rss_mb"].text("{:.0f}"),
                     other["peak_rss_mb"].text("{:.0f}"), "", "", ""))
        rel = abs(project["eval_loss"].median - other["eval_loss"].median) / abs(other["eval_loss"].median)
        rows.append(("", f"final eval loss vs peer {letter}", project["eval_loss"].text("{:.4f}"),
                     other["eval_loss"].text("{:.4f}"), f"rel Δ {rel:.1e}", f"≤ {LOSS_RELATIVE_TOLERANCE:.0e}",
                     "met" if rel <= LOSS_RELATIVE_TOLERANCE else "not met"))
        first = abs(project["first_train_loss"].median - other["first_train_loss"].median)
        rows.append(("", f"step-1 train loss (same weights, same batch) vs peer {letter}",
                     project["first_train_loss"].text("{:.4f}"), other["first_train_loss"].text("{:.4f}"),
                     f"rel Δ {first / abs(other['first_train_loss'].median):.1e}", "", ""))
        metrics[f"{prefix}{peer}_tokens_per_s"] = other["tokens_per_s"].median
        metrics[f"{prefix}{peer}_whole_s"] = other["whole_s"].median
        metrics[f"{prefix}{peer}_eval_loss"] = other["eval_loss"].median
        metrics[f"{prefix}project_over_{peer}"] = r
        metrics[f"{prefix}project_over_{peer}_whole"] = w
    metrics[f"{prefix}project_tokens_per_s"] = project["tokens_per_s"].median
    metrics[f"{prefix}project_whole_s"] = project["whole_s"].median
    metrics[f"{prefix}project_eval_loss"] = project["eval_loss"].median
    for name, series in sides.items():
        share = series["tokens_per_s"].median * flops / 1e9 / peak_llm.median
        metrics[f"{prefix}{name}_peak_share"] = share
        rows.append(("5 share of machine peak", f"LLM {label} {name}: GFLOP/s (share of "
                     f"{'bf16' if llm['settings']['bf16_autocast'] else 'fp32'} peak)",
                     f"{series['tokens_per_s'].median * flops / 1e9:.1f} ({100 * share:.1f}%)", "", "", "", ""))


def build_rows(peak: dict[str, Any], llm: dict[str, dict[str, Any]] | None, cap: dict[str, Any] | None) -> tuple[list, dict]:
    """Table rows ``(benchmark, figure, project, peer, ratio, goal, verdict)`` and flat metrics for MLflow."""
    rows: list[tuple[str, ...]] = []
    metrics: dict[str, float] = {"peak_fp32_gflops": peak["fp32"].median, "peak_bf16_gflops": peak["bf16"].median}
    for model, llm in (llm or {}).items():
        _llm_rows(rows, metrics, peak, model, llm)
    if cap:
        train, beam = cap["train"], cap["beam"]
        r = ratio(train["project"]["images_per_s"].median, train["peer"]["images_per_s"].median)
        rows.append(("2 captioner training", "images/s per epoch (cached grids vs re-encoding)",
                     train["project"]["images_per_s"].text("{:.0f}"), train["peer"]["images_per_s"].text("{:.1f}"),
                     f"{r:.1f}x", "≥ 10x", "met" if r >= 10 else "not met"))
        rows.append(("", "last batch loss (fp16 cache vs fp32 grids)", train["project"]["loss"].text("{:.3f}"),
                     train["peer"]["loss"].text("{:.3f}"), "", "", ""))
        b = ratio(beam["project"]["captions_per_s"].median, beam["peer"]["captions_per_s"].median)
        n = cap["settings"]["beam_images"]
        same = n - len(cap["beam_mismatches"])
        rows.append(("3 beam search", f"captions/s at beam {cap['settings']['beam_size']} (batched vs per image)",
                     beam["project"]["captions_per_s"].text("{:.0f}"), beam["peer"]["captions_per_s"].text("{:.1f}"),
                     f"{b:.1f}x", "≥ 5x", "met" if b >= 5 else "not met"))
        rows.append(("", "identical captions", f"{same}/{n}", "", "", f"{n}/{n}", "met" if same == n else "not met"))
        metrics.update(caption_project_images_per_s=train["project"]["images_per_s"].median,
                       caption_peer_images_per_s=train["peer"]["images_per_s"].median, caption_train_ratio=r,
                       beam_project_captions_per_s=beam["project"]["captions_per_s"].median,
                       beam_peer_captions_per_s=beam["peer"]["captions_per_s"].median, beam_ratio=b,
                       beam_identical=float(same))
        for name in ("project", "peer"):
            gflops = train[name]["images_per_s"].median * cap["flops_per_image"][name] / 1e9
            share = gflops / peak["fp32"].median
            metrics[f"caption_{name}_peak_share"] = share
            rows.append(("5 share of machine peak", f"captioner {name}: GFLOP/s (share of fp32 peak)",
                         f"{gflops:.1f} ({100 * share:.1f}%)", "", "", "", ""))
    rows.insert(0, ("5 machine peak", "matmul GFLOP/s fp32 / bf16 (2048², same threads)",
                    f"{peak['fp32'].text('{:.0f}')} / {peak['bf16'].text('{:.0f}')}", "", "", "", ""))
    return rows, metrics


CHAT_GOALS = {"chat_s": 5.0, "chat_first_s": 3.0, "chat_s_abs": 8.0, "serve_chat_p50_s": 3.0}


def latency_rows(rows: list, metrics: dict[str, float], lat: dict[str, Any]) -> None:
    """Rows of the cold commands (against ``python -c "import torch"`` in the same run) and the served models."""
    fig = lat["figures"]
    torch_s = fig["torch_s"].median
    rows.append(("4 latency", 'cold process yardstick: python -c "import torch", s', fig["torch_s"].text("{:.2f}"),
                 "", "", "", ""))
    rows.append(("", "caption command, cold, 1 image: s (ratio: x import torch)", fig["caption_s"].text("{:.2f}"),
                 "", f"{fig['caption_s'].median / torch_s:.1f}x", "", ""))
    metrics.update(latency_torch_s=torch_s, latency_caption_s=fig["caption_s"].median)
    if lat.get("has_chat"):
        chat, first = fig["chat_s"].median, fig["chat_first_s"].median
        ok = chat / torch_s <= CHAT_GOALS["chat_s"] and chat < CHAT_GOALS["chat_s_abs"]
        rows.append(("", "chat command, cold, Gemma champion, ≤ 64 new tokens: s (x import torch)",
                     fig["chat_s"].text("{:.2f}"), "", f"{chat / torch_s:.1f}x",
                     f"≤ {CHAT_GOALS['chat_s']:g}x and < {CHAT_GOALS['chat_s_abs']:g} s", "met" if ok else "not met"))
        rows.append(("", "chat command: first streamed piece printed after s (x import torch)",
                     fig["chat_first_s"].text("{:.2f}"), "", f"{first / torch_s:.1f}x",
                     f"≤ {CHAT_GOALS['chat_first_s']:g}x", "met" if first / torch_s <= CHAT_GOALS["chat_first_s"]
                     else "not met"))
        metrics.update(latency_chat_s=chat, latency_chat_first_s=first)
    else:
        rows.append(("", "chat command and served chat", f"n/a: no persian-chat-adapter@champion in "
                     f"{lat.get('chat_store')} (run the Persian study)", "", "", "", ""))
    if lat.get("serve_caption"):
        served = lat["serve_caption"]
        rows.append(("", "served captioner: p50 / p95 ms of one image", f"{served['p50_ms']:.0f} / "
                     f"{served['p95_ms']:.0f}", "", "", "", ""))
        metrics.update(latency_serve_caption_p50_ms=served["p50_ms"], latency_serve_caption_p95_ms=served["p95_ms"])
    if lat.get("serve_chat"):
        served = lat["serve_chat"]
        rows.append(("", "served chat: p50 / p95 s of one answer (≤ 64 new tokens)",
                     f"{served['p50_s']:.2f} / {served['p95_s']:.2f} ({served['answer_chars']:.0f} characters)",
                     "", "", f"p50 ≤ {CHAT_GOALS['serve_chat_p50_s']:g} s",
                     "met" if served["p50_s"] <= CHAT_GOALS["serve_chat_p50_s"] else "not met"))
        metrics.update(latency_serve_chat_p50_s=served["p50_s"], latency_serve_chat_p95_s=served["p95_s"])


def render(rows: list, settings: dict[str, Any], seconds: float, tiny: bool) -> str:
    header = ["benchmark", "figure", "project", "peer", "ratio", "goal", "verdict"]
    lines = [f"# Benchmarks{' (tiny: checks the harness, not speed)' if tiny else ''}", "",
             f"`make bench` ({'python -m benchmarks --tiny' if tiny else 'python -m benchmarks'}) on "
             f"{settings['machine']}, {settings['threads']} torch threads, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min. "
             "Each figure: median ± half-range over alternating repetitions; ratio = project / peer "
             "(s/step: peer / project).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", "Settings:", "", "```json", json.dumps(settings, indent=1, default=str), "```", "",
              "How figures are counted: tokens = non-padding tokens of every training forward (a forward pre-hook "
              "sums `attention_mask`, or counts `input_ids` of a padding-free row), over steps 2..N; s/step = "
              "median interval between step ends; whole training call = building the LoRA model, constructing the "
              "trainer, every step and the final evaluation. "
              "FLOPs = `torch.utils.flop_counter` on one training step (matmuls, convolutions, attention; forward "
              "and backward; elementwise work not counted): for the LLM one LoRA forward+backward of the first "
              "batch with the LM head over every position, per non-padding token, the same useful work for every "
              "path; for the captioner one step of each side per image (the peer's includes the encoder forward). "
              "Share = achieved FLOP/s / measured matmul peak (bf16 peak for bf16 autocast, else fp32).", ""]
    return "\n".join(lines)


def log_to_mlflow(uri: str, metrics: dict[str, float], settings: dict[str, Any], out: Path, tiny: bool) -> str:
    import math

    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("benchmarks") is None and uri.startswith("sqlite:///"):
        # Artifacts next to the database (mlruns/artifacts for the project's store), not in ./mlruns.
        db = Path(uri[len("sqlite:///"):])
        mlflow.create_experiment("benchmarks", artifact_location=(db.parent / "artifacts").resolve().as_uri())
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench-tiny" if tiny else "bench") as run:
        mlflow.set_tags({"llm_caption.pipeline": "benchmarks", "llm_caption.bench_size": "tiny" if tiny else "full"})
        mlflow.log_params({k: str(v)[:500] for k, v in settings.items() if not isinstance(v, dict)})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))})
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(out.with_suffix(".json")))
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    import torch

    from .common import matmul_gflops

    torch.set_num_threads(args.threads)
    size = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SIZES["tiny" if args.tiny else "full"].items()}
    if args.llm_steps:
        size["llm"]["steps"] = args.llm_steps
    if args.llm_models:
        size["llm_models"] = {m: e for m, e in size["llm_models"].items() if m in args.llm_models}
    if args.reps:
        size["llm"]["reps"] = size["caption"]["reps"] = args.reps
    started = time.perf_counter()
    peak = {"fp32": matmul_gflops(torch.float32, seconds=size["peak_s"]),
            "bf16": matmul_gflops(torch.bfloat16, seconds=size["peak_s"])}
    print(f"matmul peak: fp32 {peak['fp32'].text()} GFLOP/s, bf16 {peak['bf16'].text()} GFLOP/s", flush=True)
    llm_out = cap_out = lat_out = None
    if "llm" not in args.skip:
        from . import llm

        llm_out = {model: llm.run(model=model, **size["llm"], **extra) for model, extra in size["llm_models"].items()}
    if "caption" not in args.skip:
        from . import caption

        cap_out = caption.run(**size["caption"])
    if "latency" not in args.skip:
        from . import latency

        lat_out = latency.run(args.chat_store, **size["latency"])
    if llm_out is not None:
        # Re-measure the peak after the long runs as well: the machine is shared, the later figure may differ.
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            peak[key].values += matmul_gflops(dtype, seconds=size["peak_s"]).values
    seconds = time.perf_counter() - started
    rows, metrics = build_rows(peak, llm_out, cap_out)
    if lat_out is not None:
        latency_rows(rows, metrics, lat_out)
    settings = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                "llm": {m: o["settings"] for m, o in llm_out.items()} if llm_out else None,
                "caption": cap_out["settings"] if cap_out else None,
                "llm_flops_per_token": {m: o["flops_per_token"] for m, o in llm_out.items()} if llm_out else None,
                "caption_flops_per_image": cap_out["flops_per_image"] if cap_out else None,
                "beam_samples": cap_out["beam_samples"] if cap_out else None,
                "latency": {k: v for k, v in (lat_out or {}).items() if k != "figures"} or None}
    cpu = Path("/proc/cpuinfo")
    if cpu.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpu.read_text().splitlines() if line.startswith("model name")]
        if names:
            settings["machine"] = f"{names[0]}, {len(names)} CPUs"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(rows, settings, seconds, args.tiny)
    out.write_text(text, encoding="utf-8")
    raw = {"rows": rows, "metrics": metrics, "settings": settings, "seconds": seconds,
           "series": {**{METRIC_PREFIX.get(m, f"llm_{m}_").rstrip("_"):
                         {n: {k: s.values for k, s in v.items()} for n, v in o["sides"].items()}
                         for m, o in (llm_out or {}).items()},
                      "caption_train": {n: {k: s.values for k, s in v.items()} for n, v in (cap_out or {}).get("train", {}).items()},
                      "beam": {n: {k: s.values for k, s in v.items()} for n, v in (cap_out or {}).get("beam", {}).items()},
                      "latency": {k: s.values for k, s in (lat_out or {}).get("figures", {}).items()},
                      "peak": {k: s.values for k, s in peak.items()}}}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"
    run_id = log_to_mlflow(uri, metrics, settings, out, args.tiny)
    print(text)
    print(f"\nwrote {out} and MLflow run {run_id} in {uri}")
    if cap_out and cap_out["beam_mismatches"]:
        print(f"ERROR: beam search outputs differ on images {cap_out['beam_mismatches']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
