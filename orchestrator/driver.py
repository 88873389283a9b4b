"""Driver stage: compose -> validate -> prepare data -> plan -> pipeline stages -> launch -> summary.

What `python -m orchestrator` runs after parsing (cli.py), and what tests, the sweep launcher and the benches
call directly (`train`, `make_plan`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from orchestrator.console import console, print_plan, print_summary
from orchestrator.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def prepare_data(job) -> Any:
    """Driver-side data preparation: the tokenizer and the token arrays / features every worker loads."""
    from orchestrator.data.pretraining import prepare_pretraining_data
    from orchestrator.config.schema import FINETUNE_TASKS
    from orchestrator.plan.job_plan import DatasetStats

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
        from orchestrator.model.families import shape_from_config

        src = json.loads((Path(prepared.model_config_dir) / "config.json").read_text())
        shape_from_config(job.model, src, prepared.model_config_dir, "train.init_from")
        job.model.name = f"from {prepared.model_config_dir}"
    return DatasetStats.of(prepared), None


def make_plan(cfg, run_dir: Optional[str] = None, prepare: bool = True):
    """Config (DictConfig or JobConfig) -> validated JobPlan. Raises OrchestratorError naming the key or file."""
    from orchestrator.config.schema import JobConfig, check_job, to_job_config
    from orchestrator.data.corpus import corpus_spec
    from orchestrator.data.tokenizer import load_tokenizer_dir
    from orchestrator.plan.inputs import check_inputs
    from orchestrator.plan.job_plan import build_plan, check_run_dir, plan_batch

    job = cfg if isinstance(cfg, JobConfig) else to_job_config(cfg)
    if run_dir and not job.run_dir:
        job.run_dir = run_dir
    check_job(job)
    check_run_dir(job.run_dir or "")
    plan_batch(job)  # batch arithmetic refused before any data work (tokenising a corpus can take hours)
    check_inputs(job)  # init_from and fine-tuning files, also when only planning
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
    """A run dir's newest checkpoint is resumed only into the same job (train.resume), and only if it does not lie
    beyond the planned steps."""
    from orchestrator.plan.identity import identity_diff, job_identity
    from orchestrator.worker.checkpoint import find_latest

    latest = find_latest(plan.run_dir, warn=lambda m: None)
    if latest is None:
        return
    mode = plan.job.train.resume
    if mode == "never":
        raise ConfigError("train.resume", f"run dir '{plan.run_dir}' holds a checkpoint (step {latest.step}) and"
                                          " train.resume=never: choose a new run dir (run_name=... or hydra.run.dir=...)")
    diff = identity_diff(latest.state["identity"], job_identity(plan.config)) if "identity" in latest.state else []
    if plan.job.train.init_from and plan.dataset is None:  # unprepared (plan_only): the shape is init_from's, unread
        diff = [d for d in diff if not d.startswith("model.")]
    if diff and mode != "force":
        raise ConfigError("train.resume", f"run dir '{plan.run_dir}' holds a checkpoint (step {latest.step}) of a"
                                          f" different job: {'; '.join(diff)}. Choose a new run dir (run_name=... or"
                                          " hydra.run.dir=...), or train.resume=force to resume it anyway")
    if diff:
        console().print(f"[yellow]train.resume=force: resuming step {latest.step} of a different job ({'; '.join(diff)})")
    if latest.step > plan.total_steps:
        raise ConfigError(
            "train.max_steps",
            f"run dir '{plan.run_dir}' holds a checkpoint at step {latest.step}, beyond the {plan.total_steps}"
            " steps planned: give more steps or a new run dir",
        )


def compose_config(overrides: list[str]):
    """Compose conf/config.yaml with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# Overrides of the pipeline command that reach every stage: placement and speed, never the math.
PASS_THROUGH = ("launcher", "compute", "engine", "logger", "data.cache_dir", "data.loader_workers", "verbose")


def pass_through(passed: list[str]) -> list[str]:
    """The overrides of a pipeline command that reach its stages."""
    return [o for o in passed if o.lstrip("+~").split("=")[0].split(".")[0] in PASS_THROUGH
            or o.lstrip("+~").split("=")[0] in PASS_THROUGH]


def check_without_files(cfg, passed: list[str]) -> None:
    """Everything that needs no file or cluster: types, ranges, cross-field rules and batch arithmetic, of the job or
    of every stage of a pipeline (bert-orch-submit runs this before uploading; paths are checked on the cluster)."""
    from orchestrator.config.schema import check_job, to_job_config
    from orchestrator.plan.job_plan import plan_batch

    job = to_job_config(cfg)
    if job.pipeline.stages:
        refuse_job_overrides_on_pipeline(passed)
        for st in job.pipeline.stages:
            overrides = [o.replace("{pipeline_dir}", "/pipeline") for o in st.overrides] + pass_through(passed)
            check_without_files(compose_config(overrides), [])
        return
    check_job(job)
    plan_batch(job)


def run_pipeline(job, run_dir: str, passed: list[str], interactive: bool) -> dict[str, Any]:
    """Run the stages one after the other, each in <run_dir>/<stage>; compare the named stages at the end."""
    from rich.table import Table

    from orchestrator.io import write_json_atomic
    from orchestrator.launch.ray_train import shared_local_ray

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    keep = pass_through(passed)
    if not any(o.lstrip("+").startswith("logger.group=") for o in keep):  # W&B: a pipeline's stages in one group
        keep.append(f"logger.group=pipeline-{Path(run_dir).resolve().name}")
    stages: dict[str, Any] = {}
    with shared_local_ray():  # one local Ray for all the stages, not a start per stage
        for st in job.pipeline.stages:
            _run_stage(st, run_dir, keep, job.plan_only, interactive, stages)
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
        console().print(table)
        summary["compare"] = {n: stages[n]["final_eval"] for n in job.pipeline.compare}
    write_json_atomic(Path(run_dir) / "summary.json", summary)
    return summary


def _run_stage(st, run_dir: str, keep: list[str], plan_only: bool, interactive: bool, stages: dict[str, Any]) -> None:
    overrides = [o.replace("{pipeline_dir}", str(Path(run_dir).resolve())) for o in st.overrides] + keep
    console().rule(f"[bold]pipeline stage {st.name}: {' '.join(overrides)}")
    if plan_only:
        if any("{pipeline_dir}" in o for o in st.overrides):
            console().print(f"  (stage {st.name} builds on earlier stages: planned when they have run)")
            return
        train(compose_config([*overrides, "plan_only=true"]), run_dir=str(Path(run_dir) / st.name))
        return
    result = train(compose_config(overrides), run_dir=str(Path(run_dir) / st.name), interactive=interactive)
    stages[st.name] = {k: result.get(k) for k in ("status", "final_eval", "main_metric", "best_metric", "run_dir")}
    stages[st.name]["overrides"] = overrides


def refuse_job_overrides_on_pipeline(passed: list[str]) -> None:
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
    """Compose-free entry (tests call this): plan, write plan.json, launch, write summary on failure too. A job that
    runs holds its run dir's lock from before its data preparation to its summary; a second one is refused."""
    from orchestrator.config.schema import JobConfig, to_job_config
    from orchestrator.plan.job_plan import check_run_dir
    from orchestrator.run_lock import run_dir_lock

    job = cfg if isinstance(cfg, JobConfig) else to_job_config(cfg)
    target = job.run_dir or run_dir or ("runs/pipeline" if job.pipeline.stages else None)
    if job.plan_only or target is None:
        return _train(job, run_dir, interactive, passed)
    check_run_dir(target)
    with run_dir_lock(target):
        return _train(job, run_dir, interactive, passed)


def _train(job, run_dir: Optional[str], interactive: bool, passed: Optional[list[str]]) -> dict[str, Any]:
    from orchestrator.io import write_json_atomic

    if job.pipeline.stages:
        refuse_job_overrides_on_pipeline(passed or [])
        return run_pipeline(job, job.run_dir or run_dir or "runs/pipeline", passed or [], interactive)
    plan, prepared = make_plan(job, run_dir, prepare=not job.plan_only)
    print_plan(plan, prepared)
    if plan.job.plan_only:
        held = [n for n in ("plan.json", "checkpoints", "summary.json") if (Path(plan.run_dir) / n).exists()]
        if held:  # planning never touches a run: another job may be using it
            console().print(f"plan.json not written: {plan.run_dir} holds a run ({', '.join(held)})")
        else:
            plan.write(plan.run_dir)
        return {"status": "planned", "plan": plan.to_dict()}
    from orchestrator.run_lock import wait_for_earlier_workers

    wait_for_earlier_workers(plan.run_dir, say=console().print)  # before this start writes anything into the run dir
    plan.write(plan.run_dir)
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
