"""Launch stage (sweeps): one row per sweep member — overrides, status, times, final metrics — written as
sweep_summary.csv / .json in the sweep dir and printed as a table sorted by the main metric."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

# Default main metric by task name when the member's summary names none (fine-tuning summaries carry
# "main_metric"; pretraining is judged on held-out masked-token accuracy).
DEFAULT_METRIC = "final_eval.eval_mlm_acc"


@dataclass
class MemberResult:
    num: int
    overrides: list[str]
    run_dir: str
    status: str = "pending"  # pending | running | succeeded | failed | stopped
    job_id: Optional[str] = None
    submitted_at: Optional[float] = None
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    metric: Optional[float] = None
    steps: Optional[int] = None
    final_eval: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    need: dict[str, float] = field(default_factory=dict)

    @property
    def wall_s(self) -> Optional[float]:
        if self.start_time is None or self.end_time is None:
            return None
        return self.end_time - self.start_time


def read_metric(summary: dict[str, Any], metric: Optional[str]) -> tuple[Optional[str], Optional[float]]:
    """The member's main metric: `metric` (a dotted path into summary.json), else the summary's own
    main_metric, else final_eval.eval_mlm_acc."""
    if not metric:
        own = summary.get("main_metric")
        metric = f"final_eval.{own}" if own else DEFAULT_METRIC
    node: Any = summary
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return metric, None
        node = node[part]
    try:
        return metric, float(node)
    except (TypeError, ValueError):
        return metric, None


def _sort_key(r: MemberResult, mode: str):
    ok = r.metric is not None and not math.isnan(r.metric)
    value = (-r.metric if mode == "max" else r.metric) if ok else 0.0
    return (0 if ok else 1, value, r.num)


def sorted_rows(rows: Sequence[MemberResult], mode: str = "max") -> list[MemberResult]:
    return sorted(rows, key=lambda r: _sort_key(r, mode))


def write_summary(sweep_dir: str | Path, rows: Sequence[MemberResult], metric: str, mode: str = "max") -> Path:
    """sweep_summary.csv (one row per member, best first) and sweep_summary.json beside it."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted_rows(rows, mode)
    eval_keys = sorted({k for r in ordered for k in r.final_eval})
    path = sweep_dir / "sweep_summary.csv"
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "num", "status", metric, "overrides", "steps", "start_time", "end_time", "wall_s",
                    "job_id", "run_dir", "error", *eval_keys])
        for rank, r in enumerate(ordered, 1):
            w.writerow([rank, r.num, r.status, r.metric, " ".join(r.overrides), r.steps, r.start_time, r.end_time,
                        r.wall_s, r.job_id, r.run_dir, r.error or "", *(r.final_eval.get(k) for k in eval_keys)])
    tmp.replace(path)
    doc = {"metric": metric, "mode": mode, "members": [asdict(r) | {"wall_s": r.wall_s} for r in ordered]}
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(doc, indent=2))
    return path


def print_summary(rows: Sequence[MemberResult], metric: str, mode: str = "max", title: str = "sweep summary") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} (sorted by {metric}, {mode})", show_header=True)
    for col, just in (("#", "right"), ("status", "left"), (metric.split(".")[-1], "right"), ("steps", "right"),
                      ("wall s", "right"), ("overrides", "left"), ("error / run dir", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in sorted_rows(rows, mode):
        table.add_row(
            str(r.num), r.status, "" if r.metric is None else f"{r.metric:.4f}", "" if r.steps is None else str(r.steps),
            "" if r.wall_s is None else f"{r.wall_s:.0f}", " ".join(r.overrides), r.error or r.run_dir,
        )
    Console(highlight=False, width=200).print(table)
