"""Bench: what one Ray Train fit costs before and around the train function, Ray's stock `TorchTrainer` against
ours (`orchestrator.launch.ray_train.torch_trainer`, which leaves out the Ray Data actor of a job without
datasets), alternating in one process on one local Ray (2 CPUs, no dashboard), so both see the same machine.

    .venv/bin/python bench/ray_fit_overhead.py [--fits 4] [--out bench/results/ray_fit_overhead.json]

The train function imports torch and returns: what is measured is Ray Train's controller, worker group, helper
actors and teardown. CPU-s is the whole machine's busy time (/proc/stat) during the fit, every Ray process
included. Prints one JSON object (medians and the ratio ours/stock).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def busy_cpu_s() -> float:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _fn(config):
    import torch  # noqa: F401  (what every worker of ours imports first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fits", type=int, default=4, help="fits per contender (alternating)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.launch.ray_train import torch_trainer
    from orchestrator.serve.measure import cpu_info, emit_bench_result

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="ray_fit_bench_")
    rows = {"stock": [], "ours": []}
    for i in range(2 * args.fits + 1):
        name = "stock" if i % 2 == 0 else "ours"
        make = TorchTrainer if name == "stock" else torch_trainer
        c0, t0 = busy_cpu_s(), time.perf_counter()
        make(_fn, scaling_config=ScalingConfig(num_workers=2),
             run_config=RunConfig(storage_path=storage, name=f"fit{i}")).fit()
        row = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(busy_cpu_s() - c0, 2)}
        if i > 0:  # the first fit warms the page cache and Ray's worker pool for both
            rows[name].append(row)
        print(name, row, file=sys.stderr, flush=True)
    ray.shutdown()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "cpu_s")} for k, v in rows.items()}
    out = {
        "bench": "ray_fit_overhead", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_info(),
        "cores": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
        "fits_per_contender": args.fits, "median": med, "fits": rows,
        "ratio_ours_over_stock": {m: round(med["ours"][m] / med["stock"][m], 3) for m in ("wall_s", "cpu_s")},
    }
    emit_bench_result(out, args.out, indent=1)


if __name__ == "__main__":
    main()
