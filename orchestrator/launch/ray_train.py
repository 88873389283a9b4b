"""Launch stage: Ray Train V2 TorchTrainer — one DeepSpeed worker per GPU (gloo CPU workers without GPUs)."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

from orchestrator.plan.job_plan import JobPlan

log = logging.getLogger("orchestrator.launch")

# Passed through to every worker when the driver has them: W&B settings, DeepSpeed op cache, threading, and the
# tests' fault injection (inert unless enabled). Not the W&B key: Train workers' runtime env is visible through
# Ray's state API; workers read it from their node's environment, as the driver did.
_FORWARD_ENV = (
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_BASE_URL",
    "WANDB_SILENT",
    "TORCH_EXTENSIONS_DIR",
    "DS_ACCELERATOR",
    "HF_HUB_OFFLINE",
    "BERT_ORCH_CACHE",
    "BERT_ORCH_FAULT",
    "BERT_ORCH_FAULTS_ENABLED",
)


def worker_env(plan: JobPlan) -> dict[str, str]:
    job = plan.job
    from orchestrator.cluster.network import network_env

    env = network_env(job.compute.network, debug=job.compute.network_debug) if job.compute.use_gpu else {}
    env.update({k: os.environ[k] for k in _FORWARD_ENV if k in os.environ})
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(job.compute.cpus_per_worker)
    env.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub from a worker
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def connect(plan: JobPlan) -> bool:
    """Join launcher.address / RAY_ADDRESS (a cluster, or the one a Ray job runs in), else start a local Ray.

    Returns True when this call started Ray (and so should shut it down).
    """
    from orchestrator.launch.ray_job import connect_ray

    # a local Ray keeps its dashboard: it serves the state API, which Ray Train's placement-group cleaner polls
    return connect_ray(plan.job.launcher.address, num_cpus=plan.job.launcher.num_cpus)


def trainer_configs(plan: JobPlan) -> tuple[Any, Any]:
    """The (ScalingConfig, RunConfig) a plan's TorchTrainer runs with: one worker per GPU (or CPU worker),
    placement from compute.*, the run dir as Ray's storage, the worker env (network profile, forwarded vars).

    Pure construction (no Ray connection), so a test can start the same worker group with another train function.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    job = plan.job
    c = job.compute
    resources = {"CPU": float(c.cpus_per_worker)}
    if c.use_gpu:
        resources["GPU"] = 1.0
    if c.min_workers is not None and c.max_workers is not None:
        # elastic: Ray restarts the whole group from the newest checkpoint on every resize; the worker takes
        # the plan's grad accumulation for the size it gets (global batch kept) and re-shards ZeRO state
        scaling = ScalingConfig(
            num_workers=(c.min_workers, c.max_workers),
            use_gpu=c.use_gpu,
            resources_per_worker=resources,
            placement_strategy=c.placement_strategy,
            elastic_resize_monitor_interval_s=float(c.elastic_resize_interval_s),
        )
    else:
        scaling = ScalingConfig(
            num_workers=plan.world_size,
            use_gpu=c.use_gpu,
            resources_per_worker=resources,
            placement_strategy=c.placement_strategy,
        )
    run_dir = Path(plan.run_dir).resolve()
    # storage_path/name is the run dir itself: our checkpoints are Ray's checkpoints, nothing is copied
    run_config = RunConfig(
        name=run_dir.name,
        storage_path=str(run_dir.parent),
        failure_config=FailureConfig(max_failures=job.launcher.max_failures),
        worker_runtime_env={"env_vars": worker_env(plan)},
    )
    return scaling, run_config


def torch_trainer(train_fn, **kwargs):
    """Ray Train's `TorchTrainer`, minus the helper actors a job here does not need. Each is one more Python process
    per fit, started while the workers start (measured on a 2-core CPU):

    - the `DatasetManager` (Ray Data: pandas, pyarrow, fsspec), started for every fit, datasets or not. Our
      workers read their token shards themselves, so no job here passes `datasets=`: left out then. Per fit,
      31.6 -> 26.7 CPU-s and 18.0 -> 15.2 s (medians, bench/results/ray_fit_overhead.json).
    - the detached `PlacementGroupCleaner`, which polls the state API every second to remove the worker group's
      placement group if the controller dies while its driver lives on (4.6 CPU-s per fit in the test suite). On a
      local Ray this process started, a controller's death fails the fit, and the driver shuts that Ray down with
      its placement groups (a pipeline's shared Ray at the pipeline's end): left out there, kept on any cluster
      joined by address that runs a dashboard (without one there is no state API: the cleaner could only log
      "Failed to query Ray Train Controller actor state" every second of the job, so it is left out too).

    With datasets, on a joined cluster, or with a Ray lacking these callbacks, the same as `TorchTrainer`."""
    from ray.train.torch import TorchTrainer

    from orchestrator.launch.ray_job import in_own_local_ray

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray: its own defaults
        return TorchTrainer(train_fn, **kwargs)
    no_cleaner = in_own_local_ray() or not _has_state_api()

    class _Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            drop = (() if self.datasets else (DatasetsCallback,)) + ((PlacementGroupCleanerCallback,) if no_cleaner else ())
            return [c for c in callbacks if not isinstance(c, drop)]

    return _Trainer(train_fn, **kwargs)


def _has_state_api() -> bool:
    """The connected cluster runs a dashboard (which serves the state API)."""
    try:
        from ray._private.worker import get_dashboard_url

        return bool(get_dashboard_url())
    except Exception:  # another Ray's internals: assume it has one, as Ray does
        return True


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def prune_ray_snapshot(run_dir: Path) -> list[str]:
    """Ray Train keeps every checkpoint a run reported in the run dir's checkpoint_manager_snapshot.json and,
    when a run is started again in that dir (the same command, a resubmitted Ray Job), refuses to start if one of
    them no longer exists. The trainer rotates its checkpoints itself (train.keep_last) and resumes from its own
    scan of checkpoints/, so before a fit the entries of checkpoints that are gone are dropped (one atomic write;
    the run dir's lock is held). Returns the dropped dir names."""
    from orchestrator.io import write_text_atomic

    path = run_dir / RAY_SNAPSHOT
    if not path.is_file():
        return []
    state = json.loads(path.read_text())

    def exists(result: Optional[dict]) -> bool:
        return result is not None and (run_dir / result["checkpoint_dir_name"]).is_dir()

    results, indices = state.get("checkpoint_results", []), state.get("checkpoint_report_indices", [])
    dropped = [r["checkpoint_dir_name"] for r in results if not exists(r)]
    if not dropped:
        return []
    kept = [(r, i) for r, i in zip(results, indices) if exists(r)]
    state["checkpoint_results"], state["checkpoint_report_indices"] = [r for r, _ in kept], [i for _, i in kept]
    if not exists(state.get("latest_checkpoint_result")):
        state["latest_checkpoint_result"] = kept[-1][0] if kept else None
    pending = [(r, v) for r, v in zip(state.get("pending_training_results", []),
                                      state.get("pending_validation_specs", [])) if exists(r)]
    state["pending_training_results"], state["pending_validation_specs"] = [r for r, _ in pending], [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        state[key] = [n for n in state.get(key, []) if (run_dir / n).is_dir()]
    write_text_atomic(path, json.dumps(state))
    return dropped


# The local Ray a pipeline's stages share: set by `shared_local_ray`, it holds the (address, num_cpus) of the local
# Ray its first Ray stage started.
_SHARED: dict[str, Any] = {"on": False, "started": None}


@contextlib.contextmanager
def shared_local_ray():
    """Within this block, the local Ray the first Ray job starts stays up for the next ones and is shut down at the
    end: a pipeline's stages pay one local start (~6 s, ~13 CPU-s of daemons on 2 cores), not one each. A job
    asking for another address or CPU count gets a Ray of its own, as outside the block."""
    _SHARED["on"] = True
    try:
        yield
    finally:
        started = _SHARED["started"]
        _SHARED.update(on=False, started=None)
        if started is not None:
            import ray

            ray.shutdown()


def launch_ray(plan: JobPlan) -> dict[str, Any]:
    import ray

    from orchestrator.worker.entry import ray_train_loop

    # Ray Train's preemption watcher (an actor per worker group that relays node-drain notices to
    # ray.train.get_preemption_info()) is observability our trainer does not read: preemption reaches it as SIGTERM
    # (a checkpoint at the current step) or as a lost worker (a restart from the newest checkpoint). Off, it costs
    # no actor process per job and no ERROR line per job about its constructor arguments; set
    # RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 to have it anyway. (Read by the controller from this process's env.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    dropped = prune_ray_snapshot(Path(plan.run_dir).resolve())
    if dropped:
        log.info("Ray's checkpoint list: %d rotated-away checkpoint(s) dropped (%s)", len(dropped), ", ".join(dropped))
    # a local Ray takes seconds to start, most of them spent waiting on its daemons: import the trainer's modules
    # (torch among them, ~2.7 s) meanwhile
    importing = threading.Thread(target=importlib.import_module, args=("ray.train.torch",), daemon=True)
    importing.start()
    wants = (plan.job.launcher.address, plan.job.launcher.num_cpus)
    if _SHARED["started"] not in (None, wants):  # the shared local Ray is not what this job asks for
        ray.shutdown()
        _SHARED["started"] = None
    started = connect(plan)
    importing.join()
    if started and _SHARED["on"]:  # kept for the next job of the block, which shuts it down
        _SHARED["started"], started = wants, False
    # Ray Train's controller polls its worker group every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, passed on to the
    # controller at fit): a group that has finished, or lost a worker, is noticed up to 2 s late, at the end of every
    # job. A group of up to 8 workers (one node) is polled every 0.5 s, a few actor calls a second; larger ones keep
    # Ray's default, as does a value set by the user. (A 2-step quickstart_pretrain: 23.8 -> 21.0 s, medians of 4.)
    fast_poll = POLL_ENV not in os.environ and max(plan.world_size, plan.job.compute.max_workers or 0) <= 8
    try:
        scaling, run_config = trainer_configs(plan)
        trainer = torch_trainer(
            ray_train_loop,
            train_loop_config={"plan": plan.to_dict()},
            scaling_config=scaling,
            run_config=run_config,
        )
        if fast_poll:
            os.environ[POLL_ENV] = "0.5"
        trainer.fit()
        return json.loads((Path(plan.run_dir).resolve() / "summary.json").read_text())
    finally:
        if fast_poll:
            os.environ.pop(POLL_ENV, None)
        if started:
            ray.shutdown()
