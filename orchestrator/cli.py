"""CLI stage: the Hydra app — compose -> validate -> prepare data -> build plan -> launch -> summary."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from orchestrator.errors import ConfigError, OrchestratorError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("orchestrator")


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def prepare_data(job) -> Any:
    """Driver-side data preparation: the tokenizer and the token arrays / features every worker loads."""
    from orchestrator.data.pretraining import prepare_pretraining_data
    from orchestrator.plan.job_plan import FINETUNE_TASKS, DatasetStats

    if job.task.name in FINETUNE_TASKS:
        return _prepare_finetune(job)
    prepared = prepare_pretraining_data(job)
    return DatasetStats.of(prepared), prepared


def _prepare_finetune(job):
    import json

    from orchestrator.data.finetune_prep import prepare_finetune_data
    from orchestrator.plan.job_plan import DatasetStats

    prepared = prepare_finetune_data(job, job.run_dir)
    if prepared.model_config_dir:  # the encoder's shape is the checkpoint's, whatever model= says
        src = json.loads((Path(prepared.model_config_dir) / "config.json").read_text())
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size"):
            setattr(job.model, key, src[key])
        job.model.name = f"from {prepared.model_config_dir}"
    return DatasetStats.of(prepared), None


def make_plan(cfg, run_dir: Optional[str] = None, prepare: bool = True):
    """Config (DictConfig or JobConfig) -> validated JobPlan. Raises OrchestratorError naming the key or file."""
    from orchestrator.config.schema import JobConfig, to_job_config
    from orchestrator.data.corpus import corpus_spec
    from orchestrator.data.tokenizer import load_tokenizer_dir
    from orchestrator.plan.job_plan import build_plan, check_run_dir, plan_batch, validate_config

    job = cfg if isinstance(cfg, JobConfig) else to_job_config(cfg)
    if run_dir and not job.run_dir:
        job.run_dir = run_dir
    validate_config(job)
    check_run_dir(job.run_dir or "")
    plan_batch(job)  # batch arithmetic refused before any data work (tokenising a corpus can take hours)
    stats = None
    prepared = None
    if prepare or job.train.epochs is not None:  # an epoch count needs the dataset's size
        stats, prepared = prepare_data(job)
    else:
        corpus_spec(job.data)  # missing or empty files are refused even when only planning
        if job.tokenizer.source == "dir":
            load_tokenizer_dir(job.tokenizer.path)
    if stats is not None and job.task.max_seq_length > job.model.max_position_embeddings:
        raise ConfigError("task.max_seq_length", f"{job.task.max_seq_length} exceeds the checkpoint's"
                          f" max_position_embeddings {job.model.max_position_embeddings}")
    plan = build_plan(job, stats)
    _check_resume_point(plan)
    return plan, prepared


def _check_resume_point(plan) -> None:
    """A run dir whose newest checkpoint lies beyond the planned steps cannot be resumed into this plan."""
    from orchestrator.worker.checkpoint import find_latest

    latest = find_latest(plan.run_dir, warn=lambda m: None)
    if latest is not None and latest.step > plan.total_steps:
        raise ConfigError(
            "train.max_steps",
            f"run dir '{plan.run_dir}' holds a checkpoint at step {latest.step}, beyond the {plan.total_steps}"
            " steps planned: give more steps or a new run dir",
        )


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


def compose_config(overrides: list[str]):
    """Compose conf/config.yaml with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# Overrides of the pipeline command that reach every stage: placement and speed, never the math.
PASS_THROUGH = ("launcher", "compute", "engine", "logger", "data.cache_dir", "data.loader_workers")


def run_pipeline(job, run_dir: str, passed: list[str], interactive: bool) -> dict[str, Any]:
    """Run the stages one after the other, each in <run_dir>/<stage>; compare the named stages at the end."""
    from rich.table import Table

    from orchestrator.worker.metrics import write_json_atomic

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    keep = [o for o in passed if o.lstrip("+~").split("=")[0].split(".")[0] in PASS_THROUGH
            or o.lstrip("+~").split("=")[0] in PASS_THROUGH]
    stages: dict[str, Any] = {}
    for st in job.pipeline.stages:
        overrides = [o.replace("{pipeline_dir}", str(Path(run_dir).resolve())) for o in st.overrides] + keep
        _console().rule(f"[bold]pipeline stage {st.name}: {' '.join(overrides)}")
        if job.plan_only:
            if any("{pipeline_dir}" in o for o in st.overrides):
                _console().print(f"  (stage {st.name} builds on earlier stages: planned when they have run)")
                continue
            train(compose_config([*overrides, "plan_only=true"]), run_dir=str(Path(run_dir) / st.name))
            continue
        result = train(compose_config(overrides), run_dir=str(Path(run_dir) / st.name), interactive=interactive)
        stages[st.name] = {k: result.get(k) for k in ("status", "final_eval", "main_metric", "best_metric", "run_dir")}
        stages[st.name]["overrides"] = overrides
    if job.plan_only:
        return {"status": "planned", "pipeline": True, "run_dir": run_dir}
    summary: dict[str, Any] = {"status": "completed", "pipeline": True, "stages": stages, "run_dir": run_dir}
    if job.pipeline.compare:
        table = Table(title="pipeline comparison")
        table.add_column("stage")
        metrics = sorted({k for n in job.pipeline.compare for k in (stages[n]["final_eval"] or {})})
        for m in metrics:
            table.add_column(m, justify="right")
        for n in job.pipeline.compare:
            ev = stages[n]["final_eval"] or {}
            table.add_row(n, *[f"{ev[m]:.4f}" if isinstance(ev.get(m), float) else str(ev.get(m, "")) for m in metrics])
        _console().print(table)
        summary["compare"] = {n: stages[n]["final_eval"] for n in job.pipeline.compare}
    write_json_atomic(Path(run_dir) / "summary.json", summary)
    return summary


def _refuse_job_overrides_on_pipeline(passed: list[str]) -> None:
    """A pipeline's stages compose their own jobs: a job-level override on its command line would be lost."""
    ignorable = PASS_THROUGH + ("experiment", "run_name", "runs_root", "plan_only", "hydra")
    for o in passed:
        key = o.lstrip("+~").split("=")[0]
        if key.split(".")[0] not in ignorable and key not in ignorable:
            raise ConfigError(
                key,
                "the experiment is a pipeline of jobs (the default, experiment=quickstart, pretrains then"
                " fine-tunes); to run one job choose its experiment, e.g. experiment=none (plain defaults) or experiment=quickstart_pretrain " + o,
            )


def train(cfg, run_dir: Optional[str] = None, interactive: bool = True, passed: Optional[list[str]] = None) -> dict[str, Any]:
    """Compose-free entry (tests call this): plan, write plan.json, launch, write summary on failure too."""
    from orchestrator.config.schema import JobConfig, to_job_config
    from orchestrator.worker.metrics import write_json_atomic

    job = cfg if isinstance(cfg, JobConfig) else to_job_config(cfg)
    if job.pipeline.stages:
        _refuse_job_overrides_on_pipeline(passed or [])
        return run_pipeline(job, job.run_dir or run_dir or "runs/pipeline", passed or [], interactive)
    plan, prepared = make_plan(job, run_dir, prepare=not job.plan_only)
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


def hydra_entry(cfg) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        passed = list(hc.overrides.task)
        return train(cfg, run_dir=run_dir, interactive=sys.stderr.isatty(), passed=passed)
    except OrchestratorError as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep reports the failed member and goes on
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _check_run_dir_args(argv: list[str]) -> None:
    """Hydra creates the run dir before our code runs, so a run dir given on the command line that cannot be
    created is refused here with one line naming the key, not with Hydra's traceback."""
    from orchestrator.plan.job_plan import check_run_dir

    if "-m" in argv or "--multirun" in argv:
        return  # members' dirs are made by the sweep launcher, under hydra.sweep.dir
    for arg in argv:
        key, eq, value = arg.lstrip("+").partition("=")
        if eq and key in ("hydra.run.dir", "runs_root") and value and "${" not in value:
            try:
                check_run_dir(value)
            except ConfigError as exc:
                print(f"error: {str(exc).replace('run_dir', key, 1)}", file=sys.stderr)
                sys.exit(2)


def main() -> None:
    import hydra

    _check_run_dir_args(sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(hydra_entry)
    app()


if __name__ == "__main__":
    main()
