"""Data stage (worker side): rows of a prepared, sharded dataset — memory-mapped Arrow shards, two-level order.

A global row index is (shard, offset) through the manifest's cumulative row counts, so any sample can be found
again without reading others. `ShardedStepOrder` shuffles shards per epoch, groups them in windows of
`shuffle_window_shards` and permutes rows within a window: memory O(shards + window rows), not O(rows), and the
rows of step s are computed from s alone, so a resume (or a resize that keeps the global batch) opens only the
shards that step s onwards needs. Shards are opened lazily (`shard_opens` counts it) and memory-mapped.
"""

from __future__ import annotations

import json
import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.rows import PreparedData, PretrainingRows
from orchestrator.errors import DataError

MANIFEST = "manifest.json"
KIND = "bert-orchestrator/prepared-dataset"
_MAX_OPEN_SHARDS = 64


def is_prepared_dir(path: str | os.PathLike) -> bool:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("kind") == KIND
    except ValueError:
        return False


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(os.path.expanduser(str(path))) / MANIFEST
    if not p.is_file():
        raise DataError(str(p), "no manifest: not a dataset written by `python -m orchestrator.prepare` (or unfinished)")
    try:
        m = json.loads(p.read_text())
    except ValueError as exc:
        raise DataError(str(p), f"manifest is not JSON: {exc}") from None
    if m.get("kind") != KIND:
        raise DataError(str(p), f"manifest kind is {m.get('kind')!r}, expected {KIND!r}")
    return m


class ShardedStepOrder:
    """Which rows every step consumes: per epoch, a shard permutation, then row permutations per shard window.

    Same interface as StepOrder (steps_per_epoch, epoch_of, global_rows, rank_micro_rows); the data position is
    a count of global samples, so the rows of a step depend on (seed, step, global batch) only.
    """

    def __init__(self, shard_rows: np.ndarray, global_batch_size: int, seed: int, window_shards: int = 4):
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.row_start = np.zeros(len(self.shard_rows) + 1, np.int64)
        np.cumsum(self.shard_rows, out=self.row_start[1:])
        self.n_rows = int(self.row_start[-1])
        if self.n_rows < global_batch_size:
            raise ValueError(f"{self.n_rows} rows cannot fill a global batch of {global_batch_size}")
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.window = max(1, int(window_shards))
        self.steps_per_epoch = self.n_rows // global_batch_size  # the last partial batch of an epoch is dropped
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order of the epoch, cumulative row counts of its windows)."""
        if self._layout is None or self._layout[0] != epoch:
            perm = np.random.default_rng([self.seed, 97, epoch]).permutation(len(self.shard_rows))
            sizes = np.add.reduceat(self.shard_rows[perm], np.arange(0, len(perm), self.window))
            group_start = np.zeros(len(sizes) + 1, np.int64)
            np.cumsum(sizes, out=group_start[1:])
            self._layout = (epoch, perm, group_start)
        return self._layout[1], self._layout[2]

    def group_rows(self, epoch: int, g: int) -> np.ndarray:
        """Global row ids of window g of the epoch, in their shuffled order."""
        key = (epoch, g)
        if key not in self._groups:
            perm, _ = self.layout(epoch)
            shards = perm[g * self.window : (g + 1) * self.window]
            ids = np.concatenate([np.arange(self.row_start[k], self.row_start[k + 1]) for k in shards])
            self._groups[key] = ids[np.random.default_rng([self.seed, 98, epoch, g]).permutation(len(ids))]
            while len(self._groups) > 2:
                self._groups.popitem(last=False)
        return self._groups[key]

    def rows_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Global row ids at positions within an epoch."""
        _, group_start = self.layout(epoch)
        g = np.searchsorted(group_start, positions, side="right") - 1
        out = np.empty(len(positions), np.int64)
        for gi in np.unique(g):
            sel = g == gi
            out[sel] = self.group_rows(epoch, int(gi))[positions[sel] - group_start[gi]]
        return out

    def global_rows(self, step: int) -> np.ndarray:
        epoch = self.epoch_of(step)
        s = step % self.steps_per_epoch
        g = self.global_batch_size
        return self.rows_at(epoch, np.arange(s * g, (s + 1) * g, dtype=np.int64))

    def rank_micro_rows(self, step: int, rank: int, world_size: int, micro: int, accum: int) -> list[np.ndarray]:
        """Rank r takes a contiguous slice of micro x accum rows of the global batch, split into micro batches."""
        rows = self.global_rows(step)
        per_rank = micro * accum
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        return [mine[m * micro : (m + 1) * micro] for m in range(accum)]

    def shard_of(self, row: int) -> int:
        return int(np.searchsorted(self.row_start, row, side="right") - 1)


class ShardedRows(PretrainingRows):
    """Rows of one split of a prepared dataset; same contract as PretrainingRows (len, row, step_order)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, spec, vocab_size: int, continuation: np.ndarray,
                 seed: int, nsp: bool, special_ids: np.ndarray, sbo: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        info = self.manifest["splits"][split]
        self.split = split
        self.files = [s["rows_file"] for s in info["shards"]]
        self.shard_rows = np.asarray([s["rows"] for s in info["shards"]], dtype=np.int64)
        self.row_start = np.zeros(len(self.shard_rows) + 1, np.int64)
        np.cumsum(self.shard_rows, out=self.row_start[1:])
        self.window = int(self.manifest.get("order", {}).get("shuffle_window_shards", 4))
        self.spec = spec
        self.seed = seed
        self.nsp = nsp
        self.sbo = sbo
        self.continuation = continuation
        self.random_ids = np.setdiff1d(np.arange(vocab_size), special_ids).astype(np.int64)
        self._open: OrderedDict[int, tuple] = OrderedDict()
        self.shard_opens: Counter = Counter()

    def __getstate__(self):  # DataLoader workers re-open their own memory maps
        st = dict(self.__dict__)
        st["_open"] = OrderedDict()
        return st

    def __len__(self) -> int:
        return int(self.row_start[-1])

    def step_order(self, global_batch_size: int, seed: int) -> ShardedStepOrder:
        return ShardedStepOrder(self.shard_rows, global_batch_size, seed, self.window)

    def locate(self, i: int) -> tuple[int, int]:
        """Global row -> (shard, offset in shard)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} outside [0, {len(self)})")
        k = int(np.searchsorted(self.row_start, i, side="right") - 1)
        return k, int(i - self.row_start[k])

    def _shard(self, k: int) -> tuple:
        hit = self._open.get(k)
        if hit is not None:
            self._open.move_to_end(k)
            return hit
        import pyarrow as pa

        path = self.data_dir / self.files[k]
        try:
            batch = pa.ipc.open_file(pa.memory_map(str(path), "r")).get_batch(0)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(str(path), f"cannot read shard: {exc}") from None
        self.shard_opens[k] += 1

        def parts(name: str) -> tuple[np.ndarray, np.ndarray]:
            col = batch.column(name)
            return col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=True)

        entry = (parts("tokens"), parts("segment_lengths"), parts("nsp_labels"), batch)
        self._open[k] = entry
        if len(self._open) > _MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return entry

    def _segments(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k, j = self.locate(i)
        (t_off, t_val), (s_off, s_val), (n_off, n_val), _ = self._shard(k)
        tokens = t_val[t_off[j] : t_off[j + 1]]
        seg = s_val[s_off[j] : s_off[j + 1]]
        labels = n_val[n_off[j] : n_off[j + 1]]
        return tokens, seg, labels

    def row_tokens(self, i: int) -> int:
        tokens, seg, labels = self._segments(i)
        return int(len(tokens) + len(labels) * (3 if self.nsp else 2))

    def row(self, i: int, epoch: int) -> dict[str, np.ndarray]:
        tokens, seg, labels = self._segments(i)
        per_sample = 2 if self.nsp else 1
        bounds = np.concatenate([[0], np.cumsum(seg)])
        segments = [
            (
                tokens[bounds[k * per_sample] : bounds[k * per_sample + 1]],
                tokens[bounds[k * 2 + 1] : bounds[k * 2 + 2]] if self.nsp else None,
                labels[k],
            )
            for k in range(len(labels))
        ]
        return self.assemble(segments, i, epoch)


def prepared_data(job):
    """Driver side for data.source=prepared: validate the manifest against the job's task; nothing is read else."""
    import time

    from orchestrator.errors import ConfigError

    t0 = time.perf_counter()
    if not job.data.prepared_dir:
        raise ConfigError("data.prepared_dir", "data.source=prepared needs the output_dir of a prepare job")
    d = Path(os.path.expanduser(job.data.prepared_dir)).resolve()
    if not (d / MANIFEST).is_file():
        raise ConfigError("data.prepared_dir", f"'{d}' holds no manifest.json (run `python -m orchestrator.prepare`"
                                              " with output_dir there, or let a killed one finish)")
    m = read_manifest(d)
    task, t = m["task"], job.task
    for key in ("max_seq_length", "nsp", "packing"):
        if task[key] != getattr(t, key):
            raise ConfigError("data.prepared_dir", f"'{d}' was prepared with {key}={task[key]}, the job has"
                                                  f" task.{key}={getattr(t, key)}: prepare again or change task.{key}")
    tok_dir = d / m["tokenizer"]["dir"]
    if not (tok_dir / "tokenizer.json").is_file():
        raise DataError(str(tok_dir), "prepared dataset lacks its tokenizer (tokenizer.json)")
    train, ev = m["splits"]["train"], m["splits"]["eval"]
    if train["rows"] == 0:
        raise DataError(str(d), "prepared dataset holds no training rows")
    return PreparedData(
        data_dir=str(d),
        tokenizer_dir=str(tok_dir),
        train_rows=int(train["rows"]),
        eval_rows=int(ev["rows"]),
        train_tokens=int(train["tokens"]),
        vocab_size=int(m["tokenizer"]["vocab_size"]),
        most_frequent_token_id=int(m.get("most_frequent_token_id", -1)),
        seconds=time.perf_counter() - t0,
        tokens_per_second=0.0,
        cached=True,
    )
