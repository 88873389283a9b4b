"""Worker stage: rank, world size and the few collectives the loop needs (no-ops in one process)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @staticmethod
    def current() -> "Dist":
        if dist.is_available() and dist.is_initialized():
            return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return Dist(0, 1, 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def eval_rounds(self, n: int, micro: int) -> Iterator[tuple[list[int], float]]:
        """Split indices 0..n-1 over ranks in equal rounds; a rank with nothing left gets ([0], 0.0).

        Every rank runs the same number of forwards, which ZeRO-3 needs (each forward gathers weights).
        """
        per_round = micro * self.world
        rounds = max(1, -(-n // per_round))
        for r in range(rounds):
            lo = r * per_round + self.rank * micro
            idx = list(range(lo, min(lo + micro, n)))
            yield (idx, 1.0) if idx else ([0], 0.0)
