"""Data stage: which rows every step and rank consume — a pure function of (seed, step), not of world size.

The data position is counted in global samples (step x global_batch_size), so a resume, or a resize that
keeps the global batch, continues exactly where the previous run stopped: no row seen twice or skipped.
"""

from __future__ import annotations

import numpy as np


class StepOrder:
    def __init__(self, n_rows: int, global_batch_size: int, seed: int):
        if n_rows < global_batch_size:
            raise ValueError(f"{n_rows} rows cannot fill a global batch of {global_batch_size}")
        self.n_rows = n_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = n_rows // global_batch_size  # the last partial batch of an epoch is dropped
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 99, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_rows(self, step: int) -> np.ndarray:
        epoch = self.epoch_of(step)
        s = step % self.steps_per_epoch
        g = self.global_batch_size
        return self.permutation(epoch)[s * g : (s + 1) * g]

    def rank_micro_rows(self, step: int, rank: int, world_size: int, micro: int, accum: int) -> list[np.ndarray]:
        """Rank r takes a contiguous slice of micro x accum rows of the global batch, split into micro batches."""
        rows = self.global_rows(step)
        per_rank = micro * accum
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        return [mine[m * micro : (m + 1) * micro] for m in range(accum)]
