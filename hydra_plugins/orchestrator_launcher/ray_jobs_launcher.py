"""Launch stage (sweeps): a Hydra launcher that runs each sweep member as its own Ray Job.

Each member is `python -m orchestrator <member overrides> hydra.run.dir=<sweep dir>/<num>`, i.e. its own
driver with its own TorchTrainer and run dir. Members are admitted while the cluster's free resources
fit their Train workers (world_size x cpus_per_worker CPUs, + GPUs), so as many run at once as the
cluster allows; the sweep waits for all, a failed member is reported and the others go on, and the end
writes sweep_summary.csv/.json and prints a table sorted by the main metric.

Cluster: hydra.launcher.address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else a private
`ray start --head` on loopback for this sweep (own ports and temp dir), stopped when the sweep ends.
"""


import atexit
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class RayJobsLauncherConf:
    _target_: str = "hydra_plugins.orchestrator_launcher.ray_jobs_launcher.RayJobsLauncher"
    address: Optional[str] = None
    """Dashboard of the cluster (http://head:8265); null = RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else a private head."""
    num_cpus: Optional[int] = None
    """CPUs of the private head started when no address is given (null = all of this machine's)."""
    max_concurrent: Optional[int] = None
    """Cap on members running at once, on top of the resource fit (null = resources only)."""
    metric: Optional[str] = None
    """Dotted path into each member's summary.json; null = its main_metric, else final_eval.eval_mlm_acc."""
    metric_mode: str = "max"
    """max | min: how the summary sorts and what the sweeper optimises."""
    working_dir: Optional[str] = None
    """Uploaded as each job's cwd; null = this project's root."""
    python: str = "python"
    """The cluster's Python (with the project's dependencies) used in each member's entrypoint."""
    poll_s: float = 1.0
    resources_timeout_s: float = 60.0
    """How long to wait for the cluster's first resource report before failing the sweep."""
    member_timeout_s: Optional[float] = None
    """Stop a member still running after this long (null = no limit)."""
    wandb_group: Optional[str] = None
    """W&B group shared by members with logger=wandb (null = sweep-<sweep dir name>)."""


ConfigStore.instance().store(group="hydra/launcher", name="ray_jobs", node=RayJobsLauncherConf, provider="bert-orchestrator")


class RayJobsLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params = RayJobsLauncherConf(**{k: v for k, v in params.items() if k != "_target_"})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None
        self.results: list = []  # every member of the sweep, across launch() calls (a sweeper may call it often)
        self._client = None
        self._head = None
        self._sweep_dir: Optional[Path] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # -- cluster ---------------------------------------------------------------------------------

    def _connect(self):
        from orchestrator.launch import ray_job

        if self._client is not None:
            return self._client
        address = ray_job.resolve_address(self.params.address, default=None)
        if address is None:
            # token auth with a token of its own: nobody else on this machine can submit to it
            self._head = ray_job.LocalHead(num_cpus=self.params.num_cpus, auth=True).start()
            os.environ.update(self._head.client_env())
            atexit.register(self._stop_head)
            address = self._head.dashboard_url
            log.info(f"started a private Ray head for this sweep at {address} (temp dir {self._head.temp_dir})")
        self._client = ray_job.job_client(address)
        log.info(f"sweep members run as Ray Jobs on {self._client.get_address()}")
        return self._client

    def _stop_head(self) -> None:
        if self._head is not None:
            self._head.stop()
            self._head = None

    # -- members ---------------------------------------------------------------------------------

    def _prepare_member(self, num: int, overrides: Sequence[str]):
        """Compose the member, resolve its run dir and the resources its Train workers hold."""
        from orchestrator.driver import make_plan
        from orchestrator.errors import OrchestratorError
        from orchestrator.launch import ray_job
        from orchestrator.launch.sweep_summary import MemberResult

        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = num
            sweep_config.hydra.job.num = num
        HydraConfig.instance().set_config(sweep_config)
        assert self._sweep_dir is not None
        run_dir = self._sweep_dir / str(sweep_config.hydra.sweep.subdir)
        member_overrides = list(filter_overrides(overrides))
        res = MemberResult(num=num, overrides=member_overrides, run_dir=str(run_dir))
        try:
            from orchestrator.config.schema import to_job_config

            job = to_job_config(sweep_config)
            # a pipeline member runs its stages one after the other, each on the member's compute group
            if getattr(job, "pipeline", None) is not None and job.pipeline.stages:
                from orchestrator.driver import refuse_job_overrides_on_pipeline

                # what the member's own driver would refuse on the cluster, refused here before submitting
                refuse_job_overrides_on_pipeline(member_overrides)
                job.pipeline.stages = []
            plan, _ = make_plan(job, str(run_dir), prepare=False)
            res.need = ray_job.member_resources(plan)
            if plan.job.logger.name == "wandb" and not plan.job.logger.group:
                member_overrides.append(f"logger.group={self.params.wandb_group or 'sweep-' + self._sweep_dir.name}")
        except OrchestratorError as exc:  # refused by the plan: fails alone, never reaches the cluster
            res.status, res.error = "failed", str(exc).splitlines()[0]
            res.start_time = res.end_time = time.time()
        args = [*member_overrides, f"hydra.run.dir={run_dir}"]
        return res, sweep_config, ray_job.entrypoint(args, python=self.params.python)

    def _submit(self, client, res, entry: str) -> None:
        from orchestrator.launch import ray_job

        stamp = time.strftime("%Y%m%d-%H%M%S")
        res.job_id = f"sweep-{self._sweep_dir.name}-{res.num}-{stamp}".replace("_", "-").replace(":", "-")
        client.submit_job(
            entrypoint=entry,
            submission_id=res.job_id,
            runtime_env=ray_job.runtime_env(self.params.working_dir or ray_job.REPO_ROOT, ray_job.forwarded_env()),
            entrypoint_num_cpus=0,  # the driver only waits on its TorchTrainer; its workers need the CPUs
            metadata={"run_dir": res.run_dir, "sweep_dir": str(self._sweep_dir), "member": str(res.num)},
        )
        res.status, res.submitted_at = "running", time.time()
        log.info(f"\t#{res.num} submitted as {res.job_id} (needs {res.need}): {' '.join(res.overrides)}")

    def _finish(self, client, res, status: str) -> None:
        import json

        from orchestrator.launch import ray_job
        from orchestrator.launch.sweep_summary import read_metric

        info = client.get_job_info(res.job_id)
        res.start_time, res.end_time = ray_job.job_times(info)
        res.end_time = res.end_time or time.time()
        summary_path = Path(res.run_dir) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if status == "SUCCEEDED" and summary.get("status", "succeeded") not in ("failed", "interrupted"):
            res.status = "succeeded"
            res.steps = summary.get("steps")
            res.final_eval = dict(summary.get("final_eval") or {})
            _, res.metric = read_metric(summary, self.params.metric)
        else:
            res.status = "stopped" if status == "STOPPED" else "failed"
            logs = ""
            try:
                logs = client.get_job_logs(res.job_id)
            except Exception:
                pass
            res.error = summary.get("error") or ray_job.error_line(logs, fallback=info.message or status)
        log.info(f"\t#{res.num} {res.status}" + (f": {res.error}" if res.error else f", metric {res.metric}"))

    # -- the sweep -------------------------------------------------------------------------------

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from orchestrator.errors import OrchestratorError
        from orchestrator.launch import ray_job
        from orchestrator.launch.sweep_summary import DEFAULT_METRIC, print_summary, write_summary

        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if self._sweep_dir is None:  # absolute: members run in a copy of the working dir, maybe elsewhere
            self._sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        self._sweep_dir.mkdir(parents=True, exist_ok=True)
        client = self._connect()
        log.info(f"Launching {len(job_overrides)} jobs as Ray Jobs, sweep dir {self._sweep_dir}")

        members = [self._prepare_member(initial_job_idx + i, ov) for i, ov in enumerate(job_overrides)]
        # waits (bounded) for the cluster's first report: a head started a moment ago has none yet
        total = ray_job.cluster_resources(client.get_address(), timeout_s=self.params.resources_timeout_s).total
        for res, _, _ in members:
            if res.status == "pending" and not ray_job.fits(res.need, total):
                res.status = "failed"
                res.error = f"needs {res.need} but the whole cluster has {({k: total.get(k, 0.0) for k in res.need})}"
                res.start_time = res.end_time = time.time()
        pending = [(res, entry) for res, _, entry in members if res.status == "pending"]
        active: list = []
        try:
            while pending or active:
                for res in list(active):
                    status = str(client.get_job_status(res.job_id).value)
                    if status in ray_job.TERMINAL:
                        self._finish(client, res, status)
                        active.remove(res)
                    elif self.params.member_timeout_s and time.time() - res.submitted_at > self.params.member_timeout_s:
                        client.stop_job(res.job_id)
                reading = ray_job.read_cluster_resources(client.get_address()) if pending else None
                if reading is not None:  # no report this round: submit nothing, ask again next round
                    total, available = reading.total, reading.available
                    # the usage report lags a few seconds behind a new member's placement group: count our
                    # running members' needs against the total too, and take the tighter of the two
                    held = {}
                    for res in active:
                        for k, v in res.need.items():
                            held[k] = held.get(k, 0.0) + v
                    free = {k: min(available.get(k, 0.0), total.get(k, 0.0) - held.get(k, 0.0)) for k in total}
                    for item in list(pending):
                        res, entry = item
                        if self.params.max_concurrent and len(active) >= self.params.max_concurrent:
                            break
                        if ray_job.fits(res.need, free):
                            self._submit(client, res, entry)
                            pending.remove(item)
                            active.append(res)
                            for k, v in res.need.items():
                                free[k] = free.get(k, 0.0) - v
                time.sleep(self.params.poll_s)
        except KeyboardInterrupt:
            for res in active:
                log.warning(f"stopping {res.job_id}")
                client.stop_job(res.job_id)
            raise

        self.results.extend(res for res, _, _ in members)
        metric = self.params.metric or DEFAULT_METRIC
        csv_path = write_summary(self._sweep_dir, self.results, metric, self.params.metric_mode)
        print_summary(self.results, metric, self.params.metric_mode)
        log.info(f"sweep summary: {csv_path}")
        from orchestrator.report import report_or_warn

        report_or_warn(self._sweep_dir)

        returns: List[JobReturn] = []
        for res, sweep_config, _ in members:
            ret = JobReturn(
                overrides=res.overrides, cfg=OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"]),
                hydra_cfg=sweep_config, working_dir=res.run_dir, task_name=str(sweep_config.hydra.job.name),
            )
            if res.status == "succeeded":
                ret.status, ret.return_value = JobStatus.COMPLETED, res.metric
            else:
                ret.status = JobStatus.FAILED
                ret.return_value = OrchestratorError(f"sweep member #{res.num} {res.status}: {res.error}")
            returns.append(ret)
        return returns
