"""Worker stage: TrainerState — what a checkpoint's trainer_state.json saves and a resume loads."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TrainerState:
    """The loop's progress; everything else a resume needs lives in the engine's and the RNG's state."""

    step: int = 0
    best_metric: Optional[float] = None
    skipped_steps: int = 0
    rollbacks: int = 0
    loss_history: list[float] = field(default_factory=list)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)

    def to_checkpoint(self, *, epoch: int, world_size: int, grad_accum_steps: int, micro_batch_size_per_gpu: int,
                      global_batch_size: int, seed: int) -> dict[str, Any]:
        """trainer_state.json: this state plus the data position and the shape it was saved at."""
        return {
            **dataclasses.asdict(self),
            "consumed_samples": self.step * global_batch_size,
            "epoch": epoch,
            "world_size": world_size,
            "grad_accum_steps": grad_accum_steps,
            "micro_batch_size_per_gpu": micro_batch_size_per_gpu,
            "global_batch_size": global_batch_size,
            "seed": seed,
            "time": time.time(),
        }

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "TrainerState":
        return cls(
            step=int(saved["step"]),
            best_metric=saved.get("best_metric"),
            skipped_steps=int(saved.get("skipped_steps", 0)),
            rollbacks=int(saved.get("rollbacks", 0)),
            loss_history=list(saved.get("loss_history", [])),
            last_metrics=dict(saved.get("last_metrics", {})),
            last_eval=dict(saved.get("last_eval", {})),
        )
