"""Worker stage: the entry points launchers call — one plan dict in, training done, summary out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


class RayReporter:
    """Tells Ray Train of each checkpoint; the files already sit in the run dir (Ray's storage), so no copy."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            checkpoint=checkpoint,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )


def ray_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the TorchTrainer: everything comes through its one config argument."""
    import os

    from orchestrator.worker.trainer import run

    # a Ray worker's parent is its node's raylet: when that is gone, so is the job this worker belonged to
    run(config["plan"], reporter=RayReporter(), interactive=False, parent_pid=os.getppid(), ray_worker=True)


def local_run(plan_dict: dict[str, Any], interactive: bool = True) -> dict[str, Any]:
    from orchestrator.worker.trainer import run

    return run(plan_dict, reporter=None, interactive=interactive)
