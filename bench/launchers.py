"""Benchmark: tokens/s and time to first step of launcher=local vs launcher=ray, same model and global batch.

Run:  .venv/bin/python bench/launchers.py [--steps 60] [--out bench/results/launchers.json]
Prints one JSON object. Both jobs run in this invocation, one after the other, on the same machine,
so the ratio is meaningful even where absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], run_dir: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "orchestrator", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {
        "tokens_per_s": s["tokens_per_s"],
        "time_to_first_step_s": s["time_to_first_step_s"],
        "worker_wall_time_s": s["wall_time_s"],
        "command_wall_time_s": wall,
        "world_size": s["world_size"],
        "global_batch_size": s["global_batch_size"],
        "final_eval_mlm_acc": s["final_eval"].get("eval_mlm_acc"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common = [
        "experiment=quickstart_pretrain", f"model={args.model}", f"train.max_steps={args.steps}", f"train.global_batch_size={args.global_batch}",
        "train.micro_batch_size_per_gpu=null", "train.grad_accum_steps=1", f"task.max_seq_length={args.seq}",
        f"train.eval_every_steps={args.steps}", f"train.checkpoint_every_steps={args.steps}",
        "train.log_every_steps=10", "engine=zero2",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        local = run("local", [*common, "launcher=local", "compute=cpu1", "compute.cpus_per_worker=2"], Path(tmp, "local"))
        ray = run("ray", [*common, "launcher=ray", "compute=cpu2"], Path(tmp, "ray"))
    out = {
        "benchmark": "launchers",
        "model": args.model,
        "seq": args.seq,
        "global_batch_size": args.global_batch,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "local": local,
        "ray": ray,
        "ray_over_local_tokens_per_s": ray["tokens_per_s"] / local["tokens_per_s"],
        "note": "local: 1 process with both cores (2 torch threads); ray: 2 DeepSpeed ZeRO-2 workers x 1 core, gloo",
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
