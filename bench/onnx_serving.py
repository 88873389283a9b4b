"""Serving-ready export of every fine-tuning task in one run: train a small model per task on generated data
(launcher=local), then `bert-orch export` each: ONNX fp32 / int8 parity with PyTorch, accuracy, latency and
throughput, printed as one table.

    .venv/bin/python bench/onnx_serving.py [--model mini] [--threads 2] [--out bench/results/onnx_serving.json]

The figures are the run dirs' serving.json (orchestrator/serve/onnx_export.py says how each is measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from finetune_real import cli  # noqa: E402
from orchestrator.worker.hardware import cpu_has_native_bf16  # noqa: E402

TASKS = {  # task -> (synthetic data, extra overrides)
    "classify": ("sentiment", ["task.max_seq_length=64", "task.synthetic_train=600", "task.synthetic_eval=200"]),
    "ner": ("ner", ["task.max_seq_length=64", "task.synthetic_eval=200"]),
    "qa": ("squad", ["task.max_seq_length=128", "task.doc_stride=32", "task.max_query_length=16",
                     "task.synthetic_eval=60"]),
    "embed": ("retrieval", ["task.max_seq_length=64", "task.max_query_length=16", "task.hard_negatives=1"]),
    "rerank": ("retrieval", ["task.max_seq_length=64", "task.max_query_length=16", "task.hard_negatives=1",
                             "task.rerank_top_k=10"]),
}


def run(args) -> dict:
    from orchestrator.serve.onnx_export import export_run, table

    work = Path(tempfile.mkdtemp(prefix="onnx_serving_"))
    out: dict = {"model": args.model, "avx512_bf16": cpu_has_native_bf16(), "threads": args.threads, "tasks": {}}
    for task, (synthetic, extra) in TASKS.items():
        cli(["experiment=none", "launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}",
             "engine=torch", f"model={args.model}", f"task={task}", f"task.synthetic={synthetic}", *extra,
             "train.max_steps=null", f"train.epochs={args.epochs}", "train.eval_every_steps=null",
             "train.checkpoint_every_steps=100000", "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32",
             "optim.lr=1e-3"], work / task)
        t0 = time.perf_counter()
        doc = export_run(work / task, repeats=args.repeats, threads=args.threads)
        doc["export_command_s"] = time.perf_counter() - t0
        print(table(doc), flush=True)
        out["tasks"][task] = doc
    return out


def summary_table(res: dict) -> str:
    lines = ["| task | backend | max abs diff | agreement | accuracy | p50 ms (b=1) | p99 ms (b=1) | ex/s (b=32) |",
             "|---|---|---|---|---|---|---|---|"]
    for task, doc in res["tasks"].items():
        acc = doc.get("accuracy") or {}
        for name in ("torch_fp32", "onnx_fp32", "onnx_int8"):
            par, lat = doc["parity"].get(name, {}), doc["latency_ms_batch1"][name]
            lines.append(f"| {task} | {name} | {par.get('max_abs_diff', float('nan')):.1e} |"
                         f" {par.get('agreement', float('nan')):.4f} | {acc.get(name, float('nan')):.4f} |"
                         f" {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | {doc['throughput_examples_per_s'][name]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "onnx_serving.json"))
    args = ap.parse_args()
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(summary_table(res))


if __name__ == "__main__":
    main()
