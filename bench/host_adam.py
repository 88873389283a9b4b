"""Bench: the host AdamW step of ZeRO-Offload: torch's fused AdamW (what our jobs use) against DeepSpeed's
`DeepSpeedCPUAdam` (a C++ op JIT-built with g++ on first use; this bench builds it if it is not cached) and torch's
foreach AdamW, alternating, on one flat fp32 parameter of BERT-base's size.

    .venv/bin/python bench/host_adam.py [--params 110000000] [--steps 5] [--rounds 3]
                                        [--out bench/results/host_adam.json]

Seconds per optimizer step (median over rounds of the mean over --steps steps, after one warm-up step), with
torch's threads as set (default: every core). Prints one JSON object with the ratios against DeepSpeedCPUAdam.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=110_000_000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from orchestrator.serve.measure import emit_bench_result

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's accelerator and op-build lines: stdout is the JSON
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(8))])  # loads (or JIT-builds) the op
    load_s = time.perf_counter() - t0
    make = {
        "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
        "deepspeed_cpu_adam": lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.01, adamw_mode=True),
        "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
    }
    times: dict[str, list[float]] = {k: [] for k in make}
    torch.manual_seed(0)
    for _ in range(args.rounds):
        for name, build in make.items():
            p = torch.nn.Parameter(torch.randn(args.params))
            p.grad = torch.randn(args.params) * 1e-3
            opt = build([p])
            opt.step()
            t = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - t) / args.steps)
            del opt, p
    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    out = {"bench": "host_adam", "params": args.params, "threads": torch.get_num_threads(),
           "s_per_step": med, "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()},
           "ratio_over_deepspeed_cpu_adam": {k: round(v / med["deepspeed_cpu_adam"], 3) for k, v in med.items()},
           "deepspeed_op_load_s": round(load_s, 1), "torch": torch.__version__}
    emit_bench_result(out, args.out)


if __name__ == "__main__":
    main()
