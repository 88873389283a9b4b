"""What the driver shows a person: the plan, the run summary (rich tables on stdout)."""

from __future__ import annotations

from typing import Any


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def print_plan(plan, prepared=None) -> None:
    con = console()
    con.rule("[bold]BERT job plan")
    for line in plan.summary_lines():
        con.print("  " + line, soft_wrap=True)
    if prepared is not None:
        how = "cached" if prepared.cached else f"tokenised at {prepared.tokens_per_second:,.0f} tokens/s"
        con.print(f"  data prep          {prepared.seconds:.1f}s ({how})")
    con.rule()


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    for key in ("status", "steps", "world_size", "global_batch_size", "tokens_per_s", "time_to_first_step_s", "wall_time_s"):
        if key in summary:
            table.add_row(key, fmt(summary[key]))
    for key, v in (summary.get("final_eval") or {}).items():
        table.add_row(key, fmt(v))
    for key in ("checkpoint", "export", "run_dir"):
        if summary.get(key):
            table.add_row(key, str(summary[key]))
    console().print(table)
