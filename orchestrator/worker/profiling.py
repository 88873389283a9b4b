"""`train.profile_steps=[first, last]`: those optimizer steps run under torch.profiler on every rank, as
torchtitan's `profiling.enable_profiling` does. Per rank, in `<run dir>/profile/`:

- `rank<R>.json`: self time per step by category (collectives, matmul, attention, ...) and the top ops,
- `rank<R>.txt`: torch's own table of the ops with the most self time,
- `rank<R>.trace.json`: a Chrome / Perfetto trace of the profiled steps.

The window opens before step `first` and closes right after step `last`, so it holds the logging, evaluation and
checkpointing of steps first..last-1 when they fall due there (choose steps without them to see the step alone).
A collective's time includes waiting for the slowest rank, so comparing ranks shows imbalance. Writing the files
cannot fail the run: a failure is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

CATEGORIES = [  # first match wins; matched against the lower-cased op name
    ("collectives", ("gloo", "nccl", "c10d", "all_reduce", "allreduce", "reduce_scatter", "all_gather",
                     "allgather", "broadcast", "barrier", "record_param_comms")),
    # ZeRO's hooks copy each gradient into its bucket and, when one fills, reduce it; on a CPU that reduction blocks
    # until every rank has reached it, and torch.profiler records no op for the wait (gloo's Work.wait), so the wait
    # lands in the hook's self time. cProfile of a ZeRO-2 backward (HF BertForMaskedLM at the mini shape, fp32,
    # 2 ranks, 14 buckets): 136 of the hooks' ~150 ms per step were that wait, ~3 ms their Python.
    ("gradient hooks (AccumulateGrad: ZeRO's bucket copies and, on a CPU, the blocking reductions they start)",
     ("accumulategrad",)),
    ("optimizer", ("_foreach", "adam", "clip_grad", "norm_except", "lerp", "optimizer")),
    ("loss (log_softmax, nll)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "_softmax")),
    ("matmul", ("addmm", "::mm", "bmm", "matmul", "linear", "baddbmm", "mkldnn")),
    ("norm + activation + dropout", ("layer_norm", "gelu", "tanh", "dropout", "bernoulli")),
    ("dtype casts / copies", ("::copy_", "::to", "_to_copy", "clone", "contiguous")),
    ("embedding / gather", ("embedding", "index_select", "index", "gather", "nonzero", "masked")),
    ("elementwise", ("add", "mul", "div", "sub", "where", "fill", "zero", "eq", "ne", "sum", "argmax", "max")),
]


def categorize(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def summarize(averages, steps: int, top: int = 25) -> dict[str, Any]:
    """torch.profiler's key_averages() as self milliseconds per step: by category, and the `top` ops."""
    events = [e for e in averages if not e.key.startswith("## ")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            "self_fraction": e.self_cpu_time_total / total} for e in events[:top]]
    cats: dict[str, float] = {}
    for e in events:
        cat = categorize(e.key)
        cats[cat] = cats.get(cat, 0.0) + e.self_cpu_time_total
    categories = {k: {"ms_per_step": v / 1000 / steps, "fraction": v / total}
                  for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    return {"steps": steps, "self_ms_per_step": total / 1000 / steps, "categories": categories, "top_ops": ops}


class StepProfiler:
    """Starts torch.profiler before step `first` and writes the rank's files after step `last` (or, when the run
    stops inside the window, at close: then the files hold the steps that ran)."""

    def __init__(self, steps: Optional[list[int]], out_dir: Path, rank: int, cuda: bool):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.out_dir, self.rank, self.cuda = out_dir, rank, cuda
        self.prof: Any = None
        self.profiled: list[int] = []

    def before_step(self, step: int) -> None:
        if self.prof is None and not self.profiled and self.first <= step <= self.last:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities, record_shapes=False)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None:
            self.profiled.append(step)
            if step >= self.last:
                self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        if not self.profiled:
            return
        try:
            self._write(prof)
        except Exception as exc:  # the training result matters more than its profile
            logging.getLogger("orchestrator.worker").warning("profile of steps %s not written: %s", self.profiled, exc)

    def _write(self, prof) -> None:
        from orchestrator.io import atomic_write, write_text_atomic

        name, averages = f"rank{self.rank}", prof.key_averages()
        summary = {"rank": self.rank, "profiled_steps": self.profiled, **summarize(averages, len(self.profiled))}
        write_text_atomic(self.out_dir / f"{name}.json", json.dumps(summary, indent=2) + "\n")
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        write_text_atomic(self.out_dir / f"{name}.txt", averages.table(sort_by=sort, row_limit=30) + "\n")
        atomic_write(self.out_dir / f"{name}.trace.json", lambda tmp: prof.export_chrome_trace(str(tmp)))
