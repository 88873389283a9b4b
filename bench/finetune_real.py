"""Real-data fine-tuning runs: SST-2 (sentiment) and WNUT-17 (NER), each after a short pretraining here.

    .venv/bin/python bench/finetune_real.py sst2   [--data ../shared/data] [--out bench/results/sst2.json]
    .venv/bin/python bench/finetune_real.py wnut17 [--data ../shared/data] [--out bench/results/wnut17.json]

Both stages are ordinary CLI jobs (launcher=local, one process): a small BERT is pretrained on the task's
own unlabelled text (plus wikitext-2 for WNUT), then fine-tuned from that run dir. Prints one JSON object
with the figures, the majority/zero baselines and wall times. Reads ../shared/data only here, never at
run time of the package.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.worker.hardware import cpu_has_native_bf16  # noqa: E402


def cli(overrides: list[str], run_dir: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "orchestrator", *overrides, f"hydra.run.dir={run_dir}"],
                         cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(overrides)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["command_wall_time_s"] = time.perf_counter() - t0
    return summary


def sst2(data: Path, work: Path, args) -> dict:
    corpus = work / "sst2_train_sentences.txt"
    with open(data / "sst2" / "train.tsv", newline="") as fh, open(corpus, "w") as out:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            out.write(row["sentence"].strip() + "\n\n")  # one document per sentence
    common = ["launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}", "engine=torch", "model=tiny"]
    pre = cli([*common, "experiment=quickstart_pretrain", "data=text", f"data.paths=[{corpus}]",
               "tokenizer.vocab_size=8000", "task.max_seq_length=64", f"train.max_steps={args.pretrain_steps}",
               "train.global_batch_size=64", "train.micro_batch_size_per_gpu=64", "optim.lr=2e-3",
               "train.eval_every_steps=500", "train.checkpoint_every_steps=500"], work / "pretrain")
    ft = cli([*common, "experiment=none", "task=classify", f"task.train_file={data / 'sst2' / 'train.tsv'}",
              f"task.eval_file={data / 'sst2' / 'dev.tsv'}", "task.max_seq_length=64",
              f"train.init_from={work / 'pretrain'}", "train.max_steps=null", f"train.epochs={args.epochs}",
              "train.eval_every_steps=null", "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32",
              "optim.lr=1e-4", "schedule.warmup_ratio=0.1", "train.checkpoint_every_steps=100000",
              "train.log_every_steps=100"], work / "finetune")
    ev = ft["final_eval"]
    return {
        "task": "sst2",
        "pretrain": {"steps": pre["steps"], "eval_mlm_acc": pre["final_eval"]["eval_mlm_acc"],
                     "baseline_most_frequent_acc": pre["final_eval"]["eval_baseline_most_frequent_acc"],
                     "wall_s": pre["command_wall_time_s"]},
        "finetune": {"epochs": args.epochs, "steps": ft["steps"], "dev_accuracy": ev["eval_accuracy"],
                     "dev_macro_f1": ev["eval_macro_f1"], "dev_mcc": ev["eval_mcc"],
                     "majority_baseline": ev["eval_majority_baseline"], "wall_s": ft["command_wall_time_s"]},
        "points_above_majority": 100 * (ev["eval_accuracy"] - ev["eval_majority_baseline"]),
        "total_wall_s": pre["command_wall_time_s"] + ft["command_wall_time_s"],
    }


def wnut17(data: Path, work: Path, args) -> dict:
    corpus = work / "ner_text.txt"
    with open(corpus, "w") as out:
        for split in ("dev.conll",):  # the labelled training file's text; test text stays unseen
            words: list[str] = []
            for line in open(data / "wnut17" / split, encoding="utf-8"):
                if line.strip():
                    words.append(line.split("\t")[0])
                elif words:
                    out.write(" ".join(words) + "\n\n")
                    words = []
        wt = data / "wikitext-2" / "valid.txt"
        if wt.is_file():
            out.write(wt.read_text(encoding="utf-8"))
    common = ["launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}", "engine=torch", "model=tiny"]
    pre = cli([*common, "experiment=quickstart_pretrain", "data=text", f"data.paths=[{corpus}]",
               "tokenizer.vocab_size=8000", "tokenizer.lowercase=false", "task.max_seq_length=128",
               f"train.max_steps={args.pretrain_steps}", "train.global_batch_size=32",
               "train.micro_batch_size_per_gpu=32", "optim.lr=2e-3", "train.eval_every_steps=500",
               "train.checkpoint_every_steps=500"], work / "pretrain")
    ft = cli([*common, "experiment=none", "task=ner", f"task.train_file={data / 'wnut17' / 'dev.conll'}",
              f"task.eval_file={data / 'wnut17' / 'test.conll'}", "task.max_seq_length=128",
              f"train.init_from={work / 'pretrain'}", "train.max_steps=null", f"train.epochs={args.epochs}",
              "train.eval_every_steps=null", "train.global_batch_size=16", "train.micro_batch_size_per_gpu=16",
              "optim.lr=1e-3", "schedule.warmup_ratio=0.1", "train.checkpoint_every_steps=100000",
              "train.log_every_steps=20"], work / "finetune")
    return {
        "task": "wnut17",
        "pretrain": {"steps": pre["steps"], "eval_mlm_acc": pre["final_eval"]["eval_mlm_acc"],
                     "wall_s": pre["command_wall_time_s"]},
        "finetune": {"epochs": args.epochs, "steps": ft["steps"], "test_precision": ft["final_eval"]["eval_precision"],
                     "test_recall": ft["final_eval"]["eval_recall"], "test_f1": ft["final_eval"]["eval_f1"],
                     "per_type": ft["final_eval_details"]["eval_per_type"], "wall_s": ft["command_wall_time_s"]},
        "total_wall_s": pre["command_wall_time_s"] + ft["command_wall_time_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["sst2", "wnut17"])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs (default: sst2 1, wnut17 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data = Path(args.data)
    # a fresh work dir by default: a reused one would resume the finished runs and time nothing
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=f"bert-orch-{args.task}-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.epochs is None:
        args.epochs = 1.0 if args.task == "sst2" else 10.0
    t0 = time.perf_counter()
    result = (sst2 if args.task == "sst2" else wnut17)(data, work, args)
    result["command"] = " ".join(["bench/finetune_real.py", *sys.argv[1:]])
    result["args"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
    result["bench_wall_s"] = time.perf_counter() - t0  # incl. reading and writing the corpora
    result["hardware"] = {"cpus": os.cpu_count(), "cpu_flags_bf16": cpu_has_native_bf16()}
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out or REPO / "bench" / "results" / f"{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
