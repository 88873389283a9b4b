"""CLI stage: the Hydra app — compose -> validate -> prepare data -> build plan -> launch -> summary."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from orchestrator.errors import OrchestratorError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("orchestrator")


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def prepare_data(job) -> Any:
    """Driver-side data preparation: the tokenizer and the token arrays every worker memory-maps."""
    from orchestrator.data.pretraining import prepare_pretraining_data
    from orchestrator.plan.job_plan import DatasetStats

    prepared = prepare_pretraining_data(job)
    stats = DatasetStats(
        train_rows=prepared.train_rows,
        eval_rows=prepared.eval_rows,
        train_tokens=prepared.train_tokens,
        vocab_size=prepared.vocab_size,
        data_dir=prepared.data_dir,
        tokenizer_dir=prepared.tokenizer_dir,
        most_frequent_token_id=prepared.most_frequent_token_id,
    )
    return stats, prepared


def make_plan(cfg, run_dir: Optional[str] = None, prepare: bool = True):
    """Config (DictConfig or JobConfig) -> validated JobPlan. Raises OrchestratorError naming the key or file."""
    from orchestrator.config.schema import JobConfig, to_job_config
    from orchestrator.data.corpus import corpus_spec
    from orchestrator.data.tokenizer import load_tokenizer_dir
    from orchestrator.plan.job_plan import build_plan, check_run_dir, validate_config

    job = cfg if isinstance(cfg, JobConfig) else to_job_config(cfg)
    if run_dir and not job.run_dir:
        job.run_dir = run_dir
    validate_config(job)
    check_run_dir(job.run_dir or "")
    stats = None
    prepared = None
    if prepare:
        stats, prepared = prepare_data(job)
    else:
        corpus_spec(job.data)  # missing or empty files are refused even when only planning
        if job.tokenizer.source == "dir":
            load_tokenizer_dir(job.tokenizer.path)
    plan = build_plan(job, stats)
    return plan, prepared


def print_plan(plan, prepared=None) -> None:
    con = _console()
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
    _console().print(table)


def train(cfg, run_dir: Optional[str] = None, interactive: bool = True) -> dict[str, Any]:
    """Compose-free entry (tests call this): plan, write plan.json, launch, write summary on failure too."""
    from orchestrator.worker.metrics import write_json_atomic

    plan, prepared = make_plan(cfg, run_dir, prepare=not _plan_only(cfg))
    print_plan(plan, prepared)
    plan.write(plan.run_dir)
    if plan.job.plan_only:
        return {"status": "planned", "plan": plan.to_dict()}
    try:
        if plan.job.launcher.name == "local":
            from orchestrator.launch.local import launch_local

            summary = launch_local(plan, interactive=interactive)
        else:
            from orchestrator.launch.ray_train import launch_ray

            summary = launch_ray(plan)
    except BaseException as exc:
        write_json_atomic(
            Path(plan.run_dir) / "summary.json",
            {"status": "failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
             "error": f"{type(exc).__name__}: {exc}".splitlines()[0], "run_dir": plan.run_dir},
        )
        raise
    print_summary(summary)
    return summary


def _plan_only(cfg) -> bool:
    try:
        return bool(cfg.plan_only)
    except AttributeError:
        return False


def hydra_entry(cfg) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        return train(cfg, run_dir=run_dir, interactive=sys.stderr.isatty())
    except OrchestratorError as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep reports the failed member and goes on
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    import hydra

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(hydra_entry)
    app()


if __name__ == "__main__":
    main()
