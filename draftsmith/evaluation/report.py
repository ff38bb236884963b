"""The evaluation report: JSON, a markdown table, plots (acceptance length per set, per-position acceptance,
tokens/s), and the same numbers as MLflow metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from draftsmith import tracking
from draftsmith.evaluation.measure import BASE, DRAFT, NGRAM, run_name
from draftsmith.plots import grouped_bar_plot, line_plot

REPORT_JSON = "evaluation.json"
REPORT_MD = "evaluation.md"
PLOTS_DIR = "plots"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], k: int) -> str:
    has_ngram = any(NGRAM in r for r in rows)
    head = ["set", "temp", "conv", f"acceptance length (max {k + 1})", "per-position acceptance"]
    if has_ngram:
        head += ["n-gram acceptance", "draft / n-gram"]
    head += ["tokens/s base", "tokens/s draft"] + (["tokens/s n-gram"] if has_ngram else [])
    head += ["speedup draft"] + (["speedup n-gram"] if has_ngram else [])
    head += ["TPOT ms base / draft", "greedy identical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d, b, n = r[DRAFT], r.get(BASE, {}), r.get(NGRAM, {})
        cells = [r["set"], _fmt(r["temperature"], 1), str(r["conversations"]), _fmt(d.get("acceptance_length")),
                 " / ".join(f"{x:.2f}" for x in d.get("acceptance_rate_per_position", []))]
        if has_ngram:
            cells += [_fmt(n.get("acceptance_length")), _fmt(r.get("draft_vs_ngram_acceptance"))]
        cells += [_fmt(b.get("output_tokens_per_s"), 0), _fmt(d["output_tokens_per_s"], 0)]
        cells += [_fmt(n.get("output_tokens_per_s"), 0)] if has_ngram else []
        cells += [_fmt(d.get("speedup_vs_base"))] + ([_fmt(n.get("speedup_vs_base"))] if has_ngram else [])
        cells += [f"{_fmt(b.get('tpot_ms'))} / {_fmt(d.get('tpot_ms'))}",
                  _fmt(d.get("greedy_identical")) if r["temperature"] == 0 else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(rows: list[dict[str, Any]], k: int, out_dir: Path) -> list[Path]:
    names = [run_name(r["set"], r["temperature"]) for r in rows]
    speculators = [c for c in (DRAFT, NGRAM) if c in rows[0]]
    acceptance = {c: {n: r[c].get("acceptance_length") or 0.0 for n, r in zip(names, rows, strict=True)}
                  for c in speculators}
    tokens = {c: {n: r[c]["output_tokens_per_s"] for n, r in zip(names, rows, strict=True)}
              for c in (BASE, DRAFT, NGRAM) if c in rows[0]}
    positions = list(range(1, k + 1))
    per_position = {f"{c} {n}": (positions, r[c]["acceptance_rate_per_position"])
                    for c in speculators for n, r in zip(names, rows, strict=True)}
    # grouped_bar_plot draws a panel per run (set, temperature) with a bar per configuration.
    return [
        grouped_bar_plot(acceptance, f"Mean acceptance length (max {k + 1})",
                         out_dir / "acceptance_length.png"),
        line_plot(per_position, "Acceptance rate per draft position", "draft position", "accepted / drafts",
                  out_dir / "acceptance_per_position.png"),
        grouped_bar_plot(tokens, "Output tokens/s", out_dir / "tokens_per_s.png"),
    ]


def metrics(rows: list[dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        key = f"{prefix}/{r['set']}/t{r['temperature']:g}"
        for config in (BASE, DRAFT, NGRAM):
            for metric, value in r.get(config, {}).items():
                if isinstance(value, bool):
                    out[f"{key}/{config}/{metric}"] = float(value)
                elif isinstance(value, int | float):
                    out[f"{key}/{config}/{metric}"] = float(value)
                elif metric == "acceptance_rate_per_position":
                    out.update({f"{key}/{config}/acceptance_rate_pos{i + 1}": v for i, v in enumerate(value)})
        for ratio in ("draft_vs_ngram_acceptance", "draft_vs_ngram_tokens_per_s"):
            if r.get(ratio) is not None:
                out[f"{key}/{ratio}"] = r[ratio]
    return out


def write_report(report: dict[str, Any], out_dir: Path, log_to_mlflow: bool = True) -> dict[str, Path]:
    """evaluation.json, evaluation.md and plots/ under `out_dir`; logged to the active MLflow run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    k, rows = report["num_speculative_tokens"], report["rows"]
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    table = markdown_table(rows, k)
    sets = "\n".join(f"- {name}: {s['conversations']} conversations ({s['user_turns']} user turns) from "
                     f"{s['source']}; {s['quarantined']} of {s['records_read']} records quarantined"
                     for name, s in report["prompt_sets"].items())
    (out_dir / REPORT_MD).write_text(f"# Evaluation of {report['model']}\n\n{table}\n\nPrompt sets:\n{sets}\n")
    plots = write_plots(rows, k, out_dir / PLOTS_DIR)
    if log_to_mlflow:
        tracking.log_metrics(metrics(rows))
        for path in [out_dir / REPORT_JSON, out_dir / REPORT_MD, *plots]:
            tracking.log_artifact(path, "evaluation" if path.parent == out_dir else "evaluation/plots")
    return {"json": out_dir / REPORT_JSON, "markdown": out_dir / REPORT_MD}
