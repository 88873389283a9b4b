"""Worker stage: rank, world size and the few collectives the trainer needs (no-ops in one process).

Collectives run on tensors on `device`, the engine's device. Ray Train makes an NCCL process group for GPU
workers and NCCL serves CUDA tensors only, so a CPU tensor there fails with "No backend type associated with
device type cpu". Reducing on the engine's device needs no second (gloo) group and no copy of the values to
the host before the reduce; the one host read follows the reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @staticmethod
    def current(device: torch.device | None = None) -> "Dist":
        d = Dist(0, 1, 0)
        if dist.is_available() and dist.is_initialized():
            d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return d.on(device) if device is not None else d

    def on(self, device: torch.device) -> "Dist":
        return replace(self, device=torch.device(device))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; `t` must sit on this Dist's device (the one the process group serves)."""
        if t.device != self.device:
            raise ValueError(f"collective on a {t.device} tensor; the process group serves {self.device}")
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def all_gather_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` concatenated in rank order (same shape on every rank), differentiable: each rank's
        slice receives the gradient of every rank's loss (torch.distributed.nn, all-to-all in the backward)."""
        if t.device != self.device:
            raise ValueError(f"collective on a {t.device} tensor; the process group serves {self.device}")
        if self.world_size == 1:
            return t
        import warnings

        from torch.distributed.nn.functional import all_gather  # what sentence-transformers' gather uses

        with warnings.catch_warnings():  # torch 2.13 points to a private module instead; the public one works
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            return torch.cat(all_gather(t), dim=0)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sum of host values over ranks (evaluation totals): reduced on the device, read back once."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        return self.all_reduce(t).tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank (pickled through the group's own device)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank (a decision only rank 0 takes, e.g. which checkpoint to load)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def eval_rounds(self, n: int, micro: int) -> Iterator[tuple[list[int], float]]:
        """Split indices 0..n-1 over ranks in equal rounds; a rank with nothing left gets ([0], 0.0).

        Every rank runs the same number of forwards, which ZeRO-3 needs (each forward gathers weights).
        """
        per_round = micro * self.world_size
        rounds = max(1, -(-n // per_round))
        for r in range(rounds):
            lo = r * per_round + self.rank * micro
            idx = list(range(lo, min(lo + micro, n)))
            yield (idx, 1.0) if idx else ([0], 0.0)
