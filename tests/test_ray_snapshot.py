"""Ray Train's list of a run's checkpoints (checkpoint_manager_snapshot.json) against the trainer's own rotation
(train.keep_last): a run started again in its dir must not be refused for a checkpoint the rotation removed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.launch.ray_train import RAY_SNAPSHOT, prune_ray_snapshot


def _result(step: int) -> dict:
    return {"version": 0, "checkpoint_dir_name": f"checkpoints/step_{step:08d}", "metrics": {"step": step}}


def _run_dir(tmp_path: Path, steps=(50, 100, 150)) -> Path:
    """What Ray wrote after three reported checkpoints (the format of Ray 2.60's snapshot)."""
    import ray

    run_dir = tmp_path / "run"
    for s in steps:
        (run_dir / "checkpoints" / f"step_{s:08d}").mkdir(parents=True)
    state = {
        "ray_version": ray.__version__, "checkpoint_results": [_result(s) for s in steps],
        "checkpoint_report_indices": list(range(len(steps))), "latest_checkpoint_result": _result(steps[-1]),
        "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(steps),
        "validated_checkpoint_dir_names": [f"checkpoints/step_{steps[0]:08d}"],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": [],
    }
    (run_dir / RAY_SNAPSHOT).write_text(json.dumps(state))
    return run_dir


def _ray_loads(run_dir: Path):
    """Ray Train's own checkpoint manager, as the controller of a new fit in this run dir builds it."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.context import StorageContext

    storage = StorageContext(storage_path=str(run_dir.parent), experiment_dir_name=run_dir.name)
    return CheckpointManager(checkpoint_config=CheckpointConfig(), storage_context=storage)


def test_a_rotated_away_checkpoint_is_dropped_from_rays_list_and_ray_then_starts(tmp_path):
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    run_dir = _run_dir(tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000050")  # keep_last=2 after the third checkpoint
    with pytest.raises(CheckpointManagerInitializationError, match="does not exist anymore"):
        _ray_loads(run_dir)  # what a resubmitted job met before
    assert prune_ray_snapshot(run_dir) == ["checkpoints/step_00000050"]
    manager = _ray_loads(run_dir)
    assert manager.latest_checkpoint_result.checkpoint.path.endswith("checkpoints/step_00000150")
    state = json.loads((run_dir / RAY_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in state["checkpoint_results"]] == [
        "checkpoints/step_00000100", "checkpoints/step_00000150"]
    assert state["checkpoint_report_indices"] == [1, 2] and state["validated_checkpoint_dir_names"] == []
    assert prune_ray_snapshot(run_dir) == [], "nothing more to drop: the file is left alone"


def test_when_the_newest_listed_checkpoint_is_gone_the_newest_left_is_ray_s_latest(tmp_path):
    run_dir = _run_dir(tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000150")
    assert prune_ray_snapshot(run_dir) == ["checkpoints/step_00000150"]
    assert _ray_loads(run_dir).latest_checkpoint_result.checkpoint.path.endswith("checkpoints/step_00000100")
    for s in (50, 100):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{s:08d}")
    prune_ray_snapshot(run_dir)
    assert _ray_loads(run_dir).latest_checkpoint_result is None


def test_a_run_dir_without_a_snapshot_is_left_alone(tmp_path):
    assert prune_ray_snapshot(tmp_path) == [] and not (tmp_path / RAY_SNAPSHOT).exists()


def test_a_fit_without_datasets_starts_no_ray_data_actor_and_one_with_datasets_keeps_it():
    """`torch_trainer` is Ray's TorchTrainer minus the DatasetManager actor (Ray Data) that Ray 2.60 starts for
    every fit: left out when no `datasets=` are passed (all our jobs), kept when some are."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    from orchestrator.launch.ray_train import torch_trainer

    def names(trainer) -> list[str]:
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    scaling = ScalingConfig(num_workers=2)
    stock = names(TorchTrainer(lambda c: None, scaling_config=scaling))
    ours = names(torch_trainer(lambda c: None, scaling_config=scaling))
    assert DatasetsCallback.__name__ in stock
    assert ours == [n for n in stock if n != DatasetsCallback.__name__]
    with_data = torch_trainer(lambda c: None, scaling_config=scaling, datasets={"train": lambda: None})
    assert isinstance(with_data, TorchTrainer) and names(with_data) == stock


def test_the_placement_group_cleaner_is_left_out_only_on_a_local_ray_this_process_started(monkeypatch):
    """Ray 2.60 starts a detached PlacementGroupCleaner actor per fit (a process polling the state API every
    second). On a local Ray this process started, which dies with it, `torch_trainer` leaves it out; on a cluster
    joined by address it is kept, unless that cluster has no dashboard (no state API for it to poll)."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from orchestrator.launch import ray_job
    from orchestrator.launch.ray_train import torch_trainer

    def has_cleaner() -> bool:
        callbacks = torch_trainer(lambda c: None, scaling_config=ScalingConfig(num_workers=2))._create_default_callbacks()
        return any(isinstance(c, PlacementGroupCleanerCallback) for c in callbacks)

    from orchestrator.launch import ray_train

    assert not ray_job.in_own_local_ray()  # no Ray here
    assert has_cleaner()
    monkeypatch.setattr(ray_train, "_has_state_api", lambda: False)  # a joined cluster without a dashboard
    assert not has_cleaner()
    monkeypatch.undo()
    monkeypatch.setattr(ray_job, "in_own_local_ray", lambda: True)
    assert not has_cleaner()


@pytest.mark.parametrize("workers, user, during", [(2, None, "0.5"), (16, None, None), (2, "3", "3")])
def test_a_node_sized_group_is_polled_every_half_second(workers, user, during, tmp_path, monkeypatch):
    """Ray Train's controller polls its group every 2 s, so every job's end is noticed up to 2 s late: a group of up
    to 8 workers is polled every 0.5 s while its fit runs (Ray passes the variable on to the controller at fit);
    larger groups keep Ray's default, and a value the user set is left alone."""
    import dataclasses

    from conftest import compose
    from orchestrator.driver import make_plan
    from orchestrator.launch import ray_train

    seen = {}

    class FakeTrainer:
        def fit(self):
            seen["poll"] = ray_train.os.environ.get(ray_train.POLL_ENV)
            (tmp_path / "run" / "summary.json").write_text('{"status": "completed"}')

    monkeypatch.setattr(ray_train, "connect", lambda plan: False)
    monkeypatch.setattr(ray_train, "torch_trainer", lambda *a, **k: FakeTrainer())
    if user is None:
        monkeypatch.delenv(ray_train.POLL_ENV, raising=False)
    else:
        monkeypatch.setenv(ray_train.POLL_ENV, user)
    plan = make_plan(compose(["experiment=quickstart_pretrain", "launcher=ray", "compute=cpu2"]), str(tmp_path / "run"),
                     prepare=False)[0]
    assert ray_train.launch_ray(dataclasses.replace(plan, world_size=workers)) == {"status": "completed"}
    assert seen["poll"] == during
    assert ray_train.os.environ.get(ray_train.POLL_ENV) == user, "set for the fit only"
