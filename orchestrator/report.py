"""`bert-orch report RUN_DIR | SWEEP_DIR | PIPELINE_DIR`: PNG plots and one static HTML page, for people who would
rather look than read metrics.jsonl.

* a run dir (plan.json, metrics.jsonl, summary.json): training loss, the task's training accuracy, every
  evaluation metric, the learning rate, tokens/s and (CPU runs) the time per step
  by phase against the step, in `<run dir>/report/`;
* a pipeline dir (experiment=quickstart: one run dir per stage): each stage's plots, and the compared stages'
  final metrics side by side;
* a sweep dir (sweep_summary.json): the sweep's metric against each swept parameter, one point per member.

The page (`report/index.html`) holds the plan's key lines, the summary table and every plot; it links nothing
outside the report dir, so it can be copied or attached as it is. matplotlib draws (Agg backend, no display).
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from orchestrator.errors import DataError
from orchestrator.io import write_text_atomic
from orchestrator.worker.metrics import TRAIN_ACCURACIES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if _finite(r.get(key)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(out: Path, title: str, ylabel: str, lines: dict[str, tuple[list, list]]) -> Optional[Path]:
    lines = {k: v for k, v in lines.items() if v[0]}
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def run_plots(run_dir: Path, out_dir: Path, prefix: str = "") -> list[Path]:
    """The PNGs of one run: loss, training accuracy, evaluation metrics, lr, tokens/s against the step."""
    recs = _records(run_dir)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if any(k.startswith("eval_") for k in r)]
    name = run_dir.name
    plots = [
        _plot(out_dir / f"{prefix}loss.png", f"{name}: training loss", "loss", {"train loss": _series(train, "loss")}),
        _plot(out_dir / f"{prefix}train_accuracy.png", f"{name}: training accuracy", "accuracy",
              {k: _series(train, k) for k in TRAIN_ACCURACIES}),
    ]
    eval_keys = sorted({k for r in evals for k, v in r.items() if k.startswith("eval_") and _finite(v)
                        and k not in ("eval_rows",) and not k.endswith(("_total", "_ppl"))})
    scores = [k for k in eval_keys if not k.endswith("_loss")]
    losses = [k for k in eval_keys if k.endswith("_loss")]
    plots.append(_plot(out_dir / f"{prefix}eval.png", f"{name}: evaluation", "score",
                       {k[len("eval_"):]: _series(evals, k) for k in scores}))
    plots.append(_plot(out_dir / f"{prefix}eval_loss.png", f"{name}: evaluation loss", "loss",
                       {k[len("eval_"):]: _series(evals, k) for k in losses}))
    plots.append(_plot(out_dir / f"{prefix}lr.png", f"{name}: learning rate", "lr", {"lr": _series(train, "lr")}))
    plots.append(_plot(out_dir / f"{prefix}throughput.png", f"{name}: throughput", "tokens/s",
                       {"tokens/s": _series(train, "tokens_per_s")}))
    # where a step's time goes (CPU runs log it: trainer.PhaseClock); a drop in tokens/s shows here by phase
    plots.append(_plot(out_dir / f"{prefix}step_time.png", f"{name}: time per step (mean over ranks)", "ms",
                       {"optimizer step" if p == "step" else p: _series(train, f"time_{p}_ms")
                        for p in ("data", "forward", "sync", "backward", "step")}))
    return [p for p in plots if p is not None]


def _swept(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        if eq and not key.startswith("hydra"):
            out[key] = value
    return out


def sweep_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """The sweep's metric against each parameter that differs between members (numbers on a log axis when they
    span more than a decade; other values as categories)."""
    members = [m for m in doc["members"] if m.get("status") == "succeeded" and _finite(m.get("metric"))]
    params = [_swept(m.get("overrides", [])) for m in members]
    keys = sorted({k for p in params for k in p if len({q.get(k) for q in params}) > 1})
    plots = []
    plt = _plt()
    for key in keys:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        vals = [p.get(key) for p in params]
        ys = [m["metric"] for m in members]
        try:
            xs = [float(v) for v in vals]
            ax.scatter(xs, ys)
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        except (TypeError, ValueError):
            cats = sorted({str(v) for v in vals})
            ax.scatter([cats.index(str(v)) for v in vals], ys)
            ax.set_xticks(range(len(cats)), cats)
        ax.set_title(f"{doc.get('metric')} vs {key}")
        ax.set_xlabel(key)
        ax.set_ylabel(str(doc.get("metric")))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"sweep_{key.replace('/', '_')}.png"
        fig.savefig(path, format="png")
        plt.close(fig)
        plots.append(path)
    return plots


def _table(rows: list[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [(k, summary[k]) for k in ("status", "steps", "world_size", "global_batch_size", "tokens_per_s",
                                      "wall_time_s", "resumed_from") if summary.get(k) is not None]
    rows += sorted((k, v) for k, v in (summary.get("final_eval") or {}).items() if _finite(v))
    return rows


def _plan_rows(run_dir: Path) -> list[tuple[str, Any]]:
    path = run_dir / "plan.json"
    if not path.is_file():
        return []
    plan = json.loads(path.read_text())
    cfg = plan.get("config", {})
    rows = [("model", f"{cfg.get('model', {}).get('name')} ({cfg.get('model', {}).get('num_hidden_layers')} layers x "
                      f"{cfg.get('model', {}).get('hidden_size')} hidden)"),
            ("task", cfg.get("task", {}).get("name")),
            ("launcher", cfg.get("launcher", {}).get("name")),
            ("world size", plan.get("world_size")),
            ("global batch", plan.get("global_batch_size")),
            ("steps planned", plan.get("total_steps"))]
    return [(k, v) for k, v in rows if v is not None]


def _section(title: str, run_dir: Path, plots: list[Path], out_dir: Path) -> str:
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    imgs = "".join(f'<img src="{html.escape(p.relative_to(out_dir).as_posix())}" alt="{html.escape(p.stem)}">'
                   for p in plots)
    return (f"<h2>{html.escape(title)}</h2><p class=dir>{html.escape(str(run_dir))}</p>"
            f"<div class=cols><div><h3>plan</h3>{_table(_plan_rows(run_dir))}</div>"
            f"<div><h3>summary</h3>{_table(_summary_rows(summary))}</div></div><div class=plots>{imgs}</div>")


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}.cols{display:flex;gap:3em}"
        ".plots img{margin:4px;border:1px solid #eee}.dir{color:#666;font-size:85%}")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def write_report(path: str | Path) -> Path:
    """Write `<path>/report/index.html` and its PNGs for a run, pipeline or sweep dir; returns the page's path."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(str(root), "no such run, pipeline or sweep dir")
    stages = sorted((p for p in root.iterdir() if (p / "metrics.jsonl").is_file()),
                    key=lambda p: (p / "metrics.jsonl").stat().st_mtime)
    sweep = root / "sweep_summary.json"
    if not (sweep.is_file() or (root / "metrics.jsonl").is_file() or stages):
        raise DataError(str(root), "holds no metrics.jsonl, no stage run dirs and no sweep_summary.json")
    out_dir = root / "report"
    out_dir.mkdir(exist_ok=True)
    if sweep.is_file():
        doc = json.loads(sweep.read_text())
        plots = sweep_plots(doc, out_dir)
        rows = "".join(
            f"<tr><td>{m.get('num')}</td><td>{html.escape(m.get('status', ''))}</td>"
            f"<td>{html.escape(' '.join(m.get('overrides', [])))}</td>"
            f"<td>{m['metric']:.4g}</td></tr>" if _finite(m.get("metric")) else
            f"<tr><td>{m.get('num')}</td><td>{html.escape(m.get('status', ''))}</td>"
            f"<td>{html.escape(' '.join(m.get('overrides', [])))}</td><td>{html.escape(str(m.get('error') or ''))}</td></tr>"
            for m in doc["members"])
        imgs = "".join(f'<img src="{p.name}" alt="{html.escape(p.stem)}">' for p in plots)
        body = (f"<p>{len(doc['members'])} members, metric {html.escape(str(doc.get('metric')))} "
                f"({html.escape(str(doc.get('mode')))}), best first</p><table><tr><th>#</th><th>status</th>"
                f"<th>overrides</th><th>metric</th></tr>{rows}</table><div class=plots>{imgs}</div>")
        title = f"sweep {root.name}"
    elif (root / "metrics.jsonl").is_file():
        body = _section(root.name, root, run_plots(root, out_dir), out_dir)
        title = f"run {root.name}"
    else:
        body = "".join(_section(s.name, s, run_plots(s, out_dir, prefix=f"{s.name}_"), out_dir) for s in stages)
        summary = root / "summary.json"
        if summary.is_file():
            compare = json.loads(summary.read_text()).get("compare") or {}
            if compare:
                keys = sorted({k for v in compare.values() for k, x in v.items() if _finite(x)})
                head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
                rows = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(
                    f"<td>{v[k]:.4g}</td>" if _finite(v.get(k)) else "<td></td>" for k in keys) + "</tr>"
                               for name, v in compare.items())
                body = f"<h2>compared</h2><table><tr><th></th>{head}</tr>{rows}</table>" + body
        title = f"pipeline {root.name}"
    return write_text_atomic(out_dir / "index.html", _page(title, body))


def report_or_warn(path: str | Path) -> Optional[Path]:
    """The end of a run, pipeline or sweep: write its report and say where; a report that cannot be written is a
    warning, never a failed run."""
    try:
        page = write_report(path)
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the run's results are already on disk
        print(f"warning: no report for {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    print(f"report: {page}   (bert-orch report {path} writes it again)")
    return page


def main(argv: Optional[list[str]] = None) -> None:
    """bert-orch report PATH [PATH ...]"""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: bert-orch report RUN_DIR | PIPELINE_DIR | SWEEP_DIR [...]\n"
              "  writes <dir>/report/index.html and its PNG plots (loss, accuracy, evaluation, lr, tokens/s; for a\n"
              "  sweep, the metric against each swept parameter)")
        sys.exit(0 if args else 2)
    for a in args:
        try:
            page = write_report(a)
        except (DataError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"report: {page}")
