"""Same-budget comparison of the model families: pretraining on wikitext-2 valid, then SST-2 fine-tuning.

    .venv/bin/python bench/families.py [--families bert roberta albert deberta_v2 modernbert] [--steps 300]
                                       [--data ../shared/data] [--out bench/results/families.json]

Every family gets the same `model=mini` shape (4 layers x 256), the same WordPiece vocabulary (trained once on the
corpus; the cache makes it one), the same batches (same seed, same global batch, same steps: the same tokens
seen), optimizer and schedule. Held-out MLM accuracy and training tokens/s come from each pretraining run; each run
is then fine-tuned the same way on an SST-2 training subset and scored on the SST-2 dev file. --rtd-families adds
rows trained with replaced-token detection (the generator's MLM accuracy, and the discriminator's token accuracy
next to calling every token original). All runs are ordinary CLI jobs (launcher=local, one process, one after
another). Prints a table and writes one JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.finetune_real import cli  # noqa: E402
from orchestrator.serve.measure import emit_bench_result  # noqa: E402


def _params(run_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(run_dir / "export" / "model.safetensors"), "pt") as f:  # tied weights are stored once
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=["bert", "roberta", "albert", "deberta_v2", "modernbert"])
    ap.add_argument("--rtd-families", nargs="*", default=[],
                    help="families also run with task.objective=rtd (ELECTRA / DeBERTa-v3 replaced-token detection)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps (x 32 rows x 128 tokens)")
    ap.add_argument("--sst2-train", type=int, default=8000, help="SST-2 training rows used for fine-tuning")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "families.json"))
    args = ap.parse_args()
    data = Path(args.data)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bert-orch-families-"))
    work.mkdir(parents=True, exist_ok=True)
    sst_train = work / "sst2_train_subset.tsv"
    with open(data / "sst2" / "train.tsv", newline="") as fh, open(sst_train, "w", newline="") as out:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer = csv.writer(out, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        for i, row in enumerate(reader):
            if i > args.sst2_train:
                break
            writer.writerow(row)
    common = ["launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}", "engine=torch",
              "model=mini", "train.seed=0"]
    rows = []
    t0 = time.perf_counter()
    jobs = [(f, "mlm") for f in args.families] + [(f, "rtd") for f in args.rtd_families]
    for family, objective in jobs:
        name = family if objective == "mlm" else f"{family}_rtd"
        pre_dir, ft_dir = work / f"{name}_pretrain", work / f"{name}_sst2"
        pre = cli([*common, "experiment=none", f"model.family={family}", f"task.objective={objective}", "data=text",
                   f"data.paths=[{data / 'wikitext-2' / 'valid.txt'}]", "tokenizer.vocab_size=8000",
                   "task.max_seq_length=128", f"train.max_steps={args.steps}", "train.global_batch_size=32",
                   "train.micro_batch_size_per_gpu=32", "optim.lr=1e-3", "schedule.warmup_steps=30",
                   f"train.eval_every_steps={args.steps}", f"train.checkpoint_every_steps={args.steps}",
                   "train.log_every_steps=50"], pre_dir)
        ft = cli([*common, "experiment=none", "task=classify", f"task.train_file={sst_train}",
                  f"task.eval_file={data / 'sst2' / 'dev.tsv'}", "task.max_seq_length=64",
                  f"train.init_from={pre_dir}", "train.max_steps=null", "train.epochs=1",
                  "train.eval_every_steps=null", "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32",
                  "optim.lr=3e-4", "schedule.warmup_ratio=0.1", "train.checkpoint_every_steps=100000",
                  "train.log_every_steps=50"], ft_dir)
        ev = pre["final_eval"]
        rows.append({
            "family": family, "objective": objective, "params": _params(pre_dir), "pretrain_steps": pre["steps"],
            "tokens_seen_max": pre["steps"] * json.loads((pre_dir / "plan.json").read_text())["tokens_per_step"], "eval_mlm_acc": ev["eval_mlm_acc"],
            "eval_mlm_loss": ev["eval_mlm_loss"], "baseline_most_frequent_acc": ev["eval_baseline_most_frequent_acc"],
            "eval_rtd_acc": ev.get("eval_rtd_acc"), "eval_rtd_baseline_all_original_acc":
                ev.get("eval_rtd_baseline_all_original_acc"),
            "train_tokens_per_s": pre.get("tokens_per_s"), "pretrain_wall_s": pre["command_wall_time_s"],
            "sst2_dev_accuracy": ft["final_eval"]["eval_accuracy"],
            "sst2_majority_baseline": ft["final_eval"]["eval_majority_baseline"], "sst2_steps": ft["steps"],
            "finetune_wall_s": ft["command_wall_time_s"],
        })
        print(json.dumps(rows[-1]), flush=True)
    table = ["| family | objective | params | held-out MLM acc | RTD acc (all-original) | tokens/s | SST-2 dev acc |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rtd = (f"{r['eval_rtd_acc']:.3f} ({r['eval_rtd_baseline_all_original_acc']:.3f})" if r["objective"] == "rtd"
               else "")
        mlm = f"{r['eval_mlm_acc']:.3f}" + (" (generator)" if r["objective"] == "rtd" else "")
        table.append(f"| {r['family']} | {r['objective']} | {r['params'] / 1e6:.2f}M | {mlm} | {rtd} |"
                     f" {r['train_tokens_per_s']:,.0f} | {r['sst2_dev_accuracy']:.3f} |")
    print("\n".join(table))
    result = {"bench": "families", "command": " ".join(["bench/families.py", *sys.argv[1:]]),
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows, "table": table,
              "bench_wall_s": time.perf_counter() - t0}
    emit_bench_result(result, Path(args.out), indent=2)


if __name__ == "__main__":
    main()
