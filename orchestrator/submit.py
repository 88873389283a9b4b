"""Launch stage (Ray Jobs): `bert-orch-submit` — submit `python -m orchestrator <overrides>` as a Ray Job.

    bert-orch-submit [--address http://head:8265] [--runs-root /shared/runs] [--no-wait] -- <overrides>
    bert-orch-submit --logs <job id>      # follow a job's logs until it ends
    bert-orch-submit --stop <job id>      # stop it; the newest complete checkpoint stays in the run dir
    bert-orch-submit --status <job id>

The job runs on the cluster's resources: inside a Ray Job, RAY_ADDRESS points at that cluster and the
Ray launcher joins it (it never starts a nested Ray). The run dir must be on storage every node sees:
BERT_ORCH_RUNS is set (absolute) in the job's runtime_env, so submitting the same overrides again gives
the same run dir and the run resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Optional, Sequence

from orchestrator.errors import OrchestratorError
from orchestrator.launch import ray_job


def resolve_run_dir(overrides: Sequence[str], runs_root: str) -> tuple[str, list[str]]:
    """Compose the config locally (bad keys are refused before anything is submitted) and return the
    absolute run dir the job will use, plus the overrides to send (a relative hydra.run.dir is absolutised,
    because the job's cwd is a temporary copy of the working dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from orchestrator.config.schema import register_resolvers
    from orchestrator.driver import CONF_DIR, check_without_files

    register_resolvers()

    overrides = list(overrides)
    old = os.environ.get("BERT_ORCH_RUNS")
    os.environ["BERT_ORCH_RUNS"] = runs_root
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            try:
                cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            except Exception as exc:  # hydra's override/compose errors: one line, naming the override
                raise OrchestratorError(f"cannot compose the job's config: {str(exc).splitlines()[0]}") from None
            check_without_files(cfg, overrides)  # nothing is uploaded for a job the plan would refuse
        run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    finally:
        GlobalHydra.instance().clear()
        if old is None:
            os.environ.pop("BERT_ORCH_RUNS", None)
        else:
            os.environ["BERT_ORCH_RUNS"] = old
    if not os.path.isabs(run_dir):
        run_dir = str(Path(run_dir).resolve())
        overrides = [o for o in overrides if not o.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]
    return run_dir, overrides


def submission_id(run_dir: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(run_dir).name).strip("-") or "run"
    return f"bert-{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def submit(
    overrides: Sequence[str],
    address: str,
    runs_root: Optional[str] = None,
    working_dir: Optional[str] = None,
    python: str = "python",
    entrypoint_num_cpus: float = 0.0,
    job_id: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
):
    """Submit one training run; returns (client, job id, run dir)."""
    runs_root = str(Path(runs_root or os.environ.get("BERT_ORCH_RUNS") or "runs").resolve())
    run_dir, overrides = resolve_run_dir(overrides, runs_root)
    client = ray_job.job_client(address)
    job_id = job_id or submission_id(run_dir)
    client.submit_job(
        entrypoint=ray_job.entrypoint(overrides, python=python),
        submission_id=job_id,
        runtime_env=ray_job.runtime_env(
            working_dir or ray_job.REPO_ROOT, ray_job.forwarded_env({"BERT_ORCH_RUNS": runs_root, **(env or {})})
        ),
        # the driver only waits on TorchTrainer: it must not take a CPU its workers need
        entrypoint_num_cpus=entrypoint_num_cpus,
        metadata={"run_dir": run_dir, "submitted_by": "bert-orch-submit"},
    )
    return client, job_id, run_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bert-orch-submit",
        description="Submit `python -m orchestrator <overrides>` to a Ray cluster as a Ray Job.",
        epilog="Token auth (Ray >= 2.59 heads): RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / "
        "~/.ray/auth_token; set automatically when a token is found.",
    )
    p.add_argument("--address", help="the head's dashboard, e.g. http://127.0.0.1:8265 "
                   "(default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, http://127.0.0.1:8265)")
    p.add_argument("--runs-root", help="absolute dir on storage shared by head and workers "
                   "(default: $BERT_ORCH_RUNS or ./runs, absolutised)")
    p.add_argument("--working-dir", help=f"uploaded as the job's cwd (default: {ray_job.REPO_ROOT})")
    p.add_argument("--python", default="python", help="the cluster's Python with the project's dependencies")
    p.add_argument("--submission-id", help="job id (default: bert-<run name>-<time>)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0)
    p.add_argument("--no-wait", action="store_true", help="print the job id and run dir and return")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stop", metavar="JOB_ID", help="stop a job (its newest complete checkpoint stays)")
    g.add_argument("--logs", metavar="JOB_ID", help="follow a job's logs until it ends")
    g.add_argument("--status", metavar="JOB_ID", help="print a job's status")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python -m orchestrator`")
    return p


_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    address = ray_job.resolve_address(args.address)
    try:
        if args.stop or args.logs or args.status:
            client = ray_job.job_client(address)
            job = args.stop or args.logs or args.status
            if args.stop:
                client.stop_job(job)
                try:
                    status = ray_job.wait_for_job(client, job, timeout_s=120)
                except TimeoutError as exc:
                    print(f"error: {exc} (asked to stop; `ray job status {job}` follows it)", file=sys.stderr)
                    return 1
                print(f"job {job}: {status}")
                # it may have ended by itself before the stop reached it: say so in the exit status
                return 0 if status == "STOPPED" else _EXIT.get(status, 1)
            if args.status:
                print(f"job {job}: {client.get_job_status(job).value}")
                return 0
            status = ray_job.tail_logs(client, job)
            print(f"job {job}: {status}")
            return _EXIT.get(status, 1)
        client, job, run_dir = submit(
            args.overrides, address, runs_root=args.runs_root, working_dir=args.working_dir, python=args.python,
            entrypoint_num_cpus=args.entrypoint_num_cpus, job_id=args.submission_id,
        )
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = client.get_address()
    print(f"job id   {job}")
    print(f"run dir  {run_dir}")
    print(f"address  {url}")
    print(f"logs     bert-orch-submit --address {url} --logs {job}")
    print(f"stop     bert-orch-submit --address {url} --stop {job}")
    sys.stdout.flush()
    if args.no_wait:
        return 0
    try:
        status = ray_job.tail_logs(client, job)
    except KeyboardInterrupt:
        print(f"\ndetached; job {job} keeps running (stop it with --stop {job})")
        return 130
    print(f"job {job}: {status}  run dir {run_dir}")
    return _EXIT.get(status, 1)


if __name__ == "__main__":
    sys.exit(main())
