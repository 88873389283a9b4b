"""Distillation, measured in one run: a teacher pretrained here, its half-depth student distilled from it
(task=distill), both fine-tuned the same way on SST-2 and scored on the SST-2 dev file, then both classifiers'
inference throughput on the same dev batches.

    .venv/bin/python bench/distill.py [--model mini] [--steps 600] [--data ../shared/data] [--out bench/results/distill.json]

Targets (issue 17): the student keeps >= 95% of the teacher's SST-2 dev accuracy and runs >= 1.8x its throughput.
A randomly initialised encoder of the student's shape, fine-tuned the same way, is the reference that says how
much of either accuracy pretraining bought. Every stage is an ordinary CLI job (launcher=local, one process).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.finetune_real import cli  # noqa: E402
from orchestrator.serve.measure import emit_bench_result  # noqa: E402


def throughput(exports: dict[str, Path], sentences: list[str], batch: int, threads: int, rounds: int) -> dict:
    """Sentences/s of each fine-tuned classifier (transformers, torch.inference_mode, fp32) on the same padded
    batches; the models take turns, round after round, and each one's best round counts (the machine is noisy)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(next(iter(exports.values()))), local_files_only=True)
    batches = [tok(sentences[i:i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
               for i in range(0, len(sentences), batch)]
    models = {k: AutoModelForSequenceClassification.from_pretrained(str(p), local_files_only=True).eval()
              for k, p in exports.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(**batches[0])
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                for b in batches:
                    m(**b)
                times[k].append(time.perf_counter() - t0)
    n = len(sentences)
    return {k: {"sentences_per_s": n / min(ts), "median_sentences_per_s": n / statistics.median(ts),
                "layers": models[k].config.num_hidden_layers,
                "params": sum(p.numel() for p in models[k].parameters())} for k, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--family", default="bert")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=600, help="teacher pretraining steps; the distillation takes as many")
    ap.add_argument("--sst2-train", type=int, default=8000, help="SST-2 training rows used for fine-tuning")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "distill.json"))
    args = ap.parse_args()
    data = Path(args.data)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bert-orch-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, sst_train = work / "sst2_sentences.txt", work / "sst2_train_subset.tsv"
    with open(data / "sst2" / "train.tsv", newline="") as fh, open(corpus, "w") as text, \
            open(sst_train, "w", newline="") as sub:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer = csv.DictWriter(sub, fieldnames=reader.fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE,
                                escapechar="\\", lineterminator="\n")
        writer.writeheader()
        for i, row in enumerate(reader):
            text.write(row["sentence"].strip() + "\n\n")  # the unlabelled text of every training sentence
            if i < args.sst2_train:
                writer.writerow(row)
    with open(data / "sst2" / "dev.tsv", newline="") as fh:
        dev_sentences = [r["sentence"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    common = ["launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}", "engine=torch",
              "train.seed=0"]
    pretrain = ["experiment=none", "data=text", f"data.paths=[{corpus}]", "task.max_seq_length=64",
                f"train.max_steps={args.steps}", "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32",
                "optim.lr=1e-3", "schedule.warmup_steps=60", f"train.eval_every_steps={args.steps}",
                f"train.checkpoint_every_steps={args.steps}", "train.log_every_steps=50"]
    finetune = ["experiment=none", "task=classify", f"task.train_file={sst_train}",
                f"task.eval_file={data / 'sst2' / 'dev.tsv'}", "task.max_seq_length=64", "train.max_steps=null",
                "train.epochs=1", "train.eval_every_steps=null", "train.global_batch_size=32",
                "train.micro_batch_size_per_gpu=32", "optim.lr=3e-4", "schedule.warmup_ratio=0.1",
                "train.checkpoint_every_steps=100000", "train.log_every_steps=50"]
    t0 = time.perf_counter()
    teacher = cli([*common, *pretrain, f"model={args.model}", f"model.family={args.family}",
                   "tokenizer.vocab_size=8000"], work / "teacher")
    student = cli([*common, *pretrain, "task=distill", f"task.distill_from={work / 'teacher'}"], work / "student")
    ft = {name: cli([*common, *finetune, f"train.init_from={work / name}"], work / f"{name}_sst2")
          for name in ("teacher", "student")}
    s_plan = json.loads((work / "student" / "plan.json").read_text())["config"]["model"]
    random_init = cli([*common, *finetune, f"model={args.model}", f"model.family={args.family}",
                       f"model.num_hidden_layers={s_plan['num_hidden_layers']}", "tokenizer=dir",
                       f"tokenizer.path={work / 'teacher' / 'export'}"], work / "random_sst2")
    speed = throughput({name: work / f"{name}_sst2" / "export" for name in ("teacher", "student")}, dev_sentences,
                       32, args.threads, args.rounds)
    acc = {name: ft[name]["final_eval"]["eval_accuracy"] for name in ft}
    result = {
        "bench": "distill", "command": " ".join(["bench/distill.py", *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "teacher": {"layers": speed["teacher"]["layers"], "params": speed["teacher"]["params"],
                    "pretrain_eval_mlm_acc": teacher["final_eval"]["eval_mlm_acc"], "sst2_dev_accuracy": acc["teacher"],
                    "sentences_per_s": speed["teacher"]["sentences_per_s"], "pretrain_wall_s": teacher["command_wall_time_s"]},
        "student": {"layers": speed["student"]["layers"], "params": speed["student"]["params"],
                    "distill_eval_mlm_acc": student["final_eval"]["eval_mlm_acc"], "sst2_dev_accuracy": acc["student"],
                    "sentences_per_s": speed["student"]["sentences_per_s"], "distill_wall_s": student["command_wall_time_s"]},
        "random_init_student_shape_sst2_dev_accuracy": random_init["final_eval"]["eval_accuracy"],
        "sst2_majority_baseline": ft["teacher"]["final_eval"]["eval_majority_baseline"],
        "accuracy_kept": acc["student"] / acc["teacher"],
        "throughput_ratio": speed["student"]["sentences_per_s"] / speed["teacher"]["sentences_per_s"],
        "median_throughput_ratio": speed["student"]["median_sentences_per_s"] / speed["teacher"]["median_sentences_per_s"],
        "targets": {"accuracy_kept": 0.95, "throughput_ratio": 1.8},
        "bench_wall_s": time.perf_counter() - t0,
    }
    # a teacher that learned nothing makes "accuracy kept" meaningless (two majority-class classifiers keep 100%)
    result["teacher_learned"] = (teacher["final_eval"]["eval_mlm_acc"]
                                 > teacher["final_eval"]["eval_baseline_most_frequent_acc"] + 0.02
                                 and acc["teacher"] > result["sst2_majority_baseline"] + 0.05)
    result["teacher"]["pretrain_baseline_most_frequent_acc"] = teacher["final_eval"]["eval_baseline_most_frequent_acc"]
    result["meets_targets"] = (result["teacher_learned"] and result["accuracy_kept"] >= 0.95
                               and result["throughput_ratio"] >= 1.8)
    emit_bench_result(result, Path(args.out), indent=2)


if __name__ == "__main__":
    main()
