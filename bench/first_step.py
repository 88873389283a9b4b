"""Bench: time to first step of a Ray job from the command line, this tree against another (`--baseline-tree`, e.g.
a `git worktree` of an older commit), alternating run by run so both see the same machine.

    .venv/bin/python bench/first_step.py [--baseline-tree DIR] [--runs 3] [--out bench/results/first_step.json]
    .venv/bin/python bench/first_step.py --join [--runs 3] [--out bench/results/first_step_join.json]
    .venv/bin/python bench/first_step.py --cold [--runs 3] [--out bench/results/first_step_cold.json]

A run is `python -m orchestrator experiment=quickstart_pretrain train.max_steps=2 train.log_every_steps=1` in a new
run dir, starting its own local Ray as README command 1 does, or with `--join` connecting to a running cluster
(RAY_ADDRESS of a `ray start --head` this bench starts on its own ports and stops at the end: a user's second
job on a cluster that is up); the token cache is warm (one unmeasured run of each tree first). With `--cold` there is
no unmeasured run and every run starts with an empty token cache (BERT_ORCH_CACHE) and an empty DeepSpeed op cache
(TORCH_EXTENSIONS_DIR): a user's first job on a machine where the package is installed (run this with a new venv's
python to include its first imports). Timed from the command's start to rank 0's first progress line ("step 1/2"),
and to its exit, with the whole machine's busy CPU-s (/proc/stat) over the run: the same job costing more CPU-s
means slower cores, not more work. Prints one JSON object: every run, medians, and the ratio this tree / baseline of
the medians.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIRST_STEP = re.compile(r"\] step 1/\d+ ")
JOB = ["experiment=quickstart_pretrain", "train.max_steps=2", "train.log_every_steps=1"]


def busy_cpu_s() -> float:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def one_run(tree: Path, run_dir: Path, env: dict, cold_dir: Path | None = None) -> dict:
    if cold_dir is not None:  # nothing cached: a new token cache and DeepSpeed op cache for this run alone
        env = {**env, "BERT_ORCH_CACHE": str(cold_dir / "cache"), "TORCH_EXTENSIONS_DIR": str(cold_dir / "ops")}
    c0, t0 = busy_cpu_s(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *JOB, f"hydra.run.dir={run_dir}"], cwd=tree,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, tail = None, deque(maxlen=20)  # the last lines, for an error
    for line in proc.stdout:
        if first is None and FIRST_STEP.search(line):
            first = time.perf_counter() - t0
        tail.append(line)
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"error: run in {tree} failed (exit {proc.returncode}):\n" + "".join(tail))
    return {"first_step_s": round(first, 2), "exit_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(busy_cpu_s() - c0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-tree", default=None, help="another checkout of this project, run the same way")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per tree (alternating)")
    ap.add_argument("--join", action="store_true",
                    help="join a running Ray cluster (one this bench starts with `ray start --head`) instead of "
                         "starting a local Ray per run")
    ap.add_argument("--cold", action="store_true",
                    help="every run with empty caches (token arrays, tokenizer, DeepSpeed ops) and no warm-up run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cold and args.join:
        ap.error("--cold measures a first job with its own local Ray; --join measures the next one on a running cluster")
    from orchestrator.launch.ray_job import LocalHead
    from orchestrator.serve.measure import emit_bench_result

    trees = {"this": REPO, **({"baseline": Path(args.baseline_tree).resolve()} if args.baseline_tree else {})}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    work = Path(tempfile.mkdtemp(prefix="first_step_bench_"))
    head = None
    try:
        if args.join:  # inside the try: a head that does not come up still leaves no work dir behind
            head = LocalHead(num_cpus=os.cpu_count()).start()
            env["RAY_ADDRESS"] = head.gcs_address
        rows: dict[str, list] = {name: [] for name in trees}
        if not args.cold:  # warm-up: token cache, page cache, DeepSpeed's op cache
            for name, tree in trees.items():
                one_run(tree, work / f"warm_{name}", env)
        for i in range(args.runs):
            for name, tree in trees.items():
                rows[name].append(one_run(tree, work / f"{name}_{i}", env,
                                          work / f"cold_{name}_{i}" if args.cold else None))
    finally:
        if head is not None:
            head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    out = {"bench": "first_step", "job": JOB, "ray": "joined a running cluster" if args.join else "local, started per run",
           "caches": "empty at every run (--cold)" if args.cold else "warm (one unmeasured run first)",
           "python": sys.executable, "runs": rows, "median": med}
    if "baseline" in med:
        out["ratio_this_over_baseline"] = {k: round(med["this"][k] / med["baseline"][k], 3) for k in med["this"]}
    emit_bench_result(out, args.out)


if __name__ == "__main__":
    main()
