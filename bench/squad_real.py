"""The SQuAD 2.0 subset (4 articles, real questions) as a retrieval set and as extractive QA, after a short
pretraining on its paragraphs here.

    .venv/bin/python bench/squad_real.py [--data ../shared/data] [--out bench/results/squad_real.json]

Split by article: the last article (Sky (United Kingdom)) is held out, the other three train.
  1. pretrain a small BERT on every paragraph (+ wikitext-2 valid for vocabulary), launcher=local;
  2. task=embed from it: answerable training questions -> their paragraphs (+1 BM25-mined hard negative);
     evaluated as retrieval of the held-out questions over all 148 paragraphs, beside BM25;
  3. task=rerank from it: the same pairs (3 hard negatives), reranking BM25's top 20 per held-out question;
  4. task=qa (SQuAD 2.0) from it: three articles train, the fourth evaluates; EM/F1 (HasAns / NoAns) beside
     the "always no answer" baseline.
Prints the tables and one JSON object. Reads ../shared/data only here, never at run time of the package.
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

METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10")


def split_squad(squad: Path, eval_title: str, out: Path) -> tuple[Path, Path]:
    """SQuAD json -> (train json of the other articles, eval json of eval_title)."""
    data = json.loads(squad.read_text())
    train = [a for a in data["data"] if a["title"] != eval_title]
    held = [a for a in data["data"] if a["title"] == eval_title]
    paths = out / "qa_train.json", out / "qa_eval.json"
    for path, articles in zip(paths, (train, held)):
        path.write_text(json.dumps({"version": data.get("version", "v2.0"), "data": articles}))
    return paths


def prepare(data: Path, work: Path) -> dict:
    from orchestrator.data.retrieval import squad_to_retrieval, write_beir, write_pairs

    squad = data / "squad-v2-subset" / "dev-4articles.json"
    pairs, held, titles = squad_to_retrieval(squad)
    write_pairs(pairs, work / "train_pairs.jsonl")
    write_beir(held, work / "eval_beir")
    qa_train, qa_eval = split_squad(squad, titles[0], work)
    corpus = work / "pretrain.txt"
    with open(corpus, "w") as out:
        out.write("\n\n".join(held.corpus.values()) + "\n\n")  # every paragraph (no question text)
        out.write((data / "wikitext-2" / "valid.txt").read_text())
    return {"pairs": work / "train_pairs.jsonl", "beir": work / "eval_beir", "qa_train": qa_train, "qa_eval": qa_eval,
            "corpus": corpus, "eval_title": titles[0], "train_pairs": len(pairs), "eval_queries": len(held.queries),
            "corpus_docs": len(held.corpus)}


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="squad_real_"))
    files = prepare(Path(args.data), work)
    common = ["launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}", "engine=torch",
              f"model={args.model}"]
    if args.pretrained:  # an earlier run of this bench (or any BERT run dir on the same paragraphs)
        pre = json.loads((Path(args.pretrained) / "summary.json").read_text())
        pre["command_wall_time_s"] = 0.0
        init = f"train.init_from={Path(args.pretrained).resolve()}"
    else:
        pre = cli([*common, "experiment=quickstart_pretrain", "data=text", f"data.paths=[{files['corpus']}]",
                   "tokenizer.vocab_size=8000", "task.max_seq_length=128", f"train.max_steps={args.pretrain_steps}",
                   "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32", "optim.lr=1e-3",
                   "train.eval_every_steps=100000", "train.checkpoint_every_steps=100000"], work / "pretrain")
        init = f"train.init_from={work / 'pretrain'}"
    retr = ["experiment=none", f"task.train_file={files['pairs']}", f"task.eval_file={files['beir']}", init,
            "train.max_steps=null", "train.eval_every_steps=null", "train.checkpoint_every_steps=100000",
            "schedule.warmup_ratio=0.1", "train.log_every_steps=20"]
    embed = cli([*common, *retr, "task=embed", "task.hard_negatives=1", f"train.epochs={args.epochs}",
                 "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32", f"optim.lr={args.lr}",
                 "task.max_seq_length=192"], work / "embed")
    rerank = cli([*common, *retr, "task=rerank", "task.hard_negatives=3", f"train.epochs={args.epochs}",
                  "train.global_batch_size=16", "train.micro_batch_size_per_gpu=16", f"optim.lr={args.lr}"],
                 work / "rerank")
    qa = cli([*common, "experiment=none", "task=qa", "task.version_2=true", f"task.train_file={files['qa_train']}",
              f"task.eval_file={files['qa_eval']}", init, "task.max_seq_length=256", "task.doc_stride=64",
              "train.max_steps=null", f"train.epochs={args.qa_epochs}", "train.eval_every_steps=null",
              "train.checkpoint_every_steps=100000", "train.global_batch_size=32", "train.micro_batch_size_per_gpu=16",
              "optim.lr=1e-4", "schedule.warmup_ratio=0.1", "train.log_every_steps=20"], work / "qa")
    e, r, q = embed["final_eval"], rerank["final_eval"], qa["final_eval"]
    return {
        "data": {k: v for k, v in files.items() if not isinstance(v, Path)},
        "model": args.model, "avx512_bf16": cpu_has_native_bf16(),
        "pretrain": {"steps": pre["steps"], "eval_mlm_acc": pre["final_eval"].get("eval_mlm_acc"),
                     "most_frequent_token_acc": pre["final_eval"].get("eval_baseline_most_frequent_acc"),
                     "wall_s": pre["command_wall_time_s"], "run_dir": init.split("=", 1)[1]},
        "retrieval": {"bm25": {k: e[f"eval_bm25_{k}"] for k in METRICS},
                      "embed": {k: e[f"eval_{k}"] for k in METRICS},
                      "bm25_top20_reranked": {k: r[f"eval_{k}"] for k in METRICS},
                      "bm25_as_seen_by_rerank": {k: r[f"eval_bm25_{k}"] for k in METRICS}},
        "qa": {k.removeprefix("eval_"): v for k, v in q.items()
               if k.startswith(("eval_exact", "eval_f1", "eval_HasAns", "eval_NoAns", "eval_no_answer"))},
        "wall_s": {"embed": embed["command_wall_time_s"], "rerank": rerank["command_wall_time_s"],
                   "qa": qa["command_wall_time_s"]},
    }


def table(res: dict) -> str:
    lines = ["| ranking (held-out article) | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in res["retrieval"].items():
        if name != "bm25_as_seen_by_rerank":
            lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |")
    q = res["qa"]
    lines += ["", "| QA (held-out article) | EM | F1 | HasAns EM | HasAns F1 | NoAns EM |", "|---|---|---|---|---|---|",
              f"| fine-tuned | {q['exact']:.1f} | {q['f1']:.1f} | {q.get('HasAns_exact', 0):.1f} |"
              f" {q.get('HasAns_f1', 0):.1f} | {q.get('NoAns_exact', 0):.1f} |",
              f"| always no answer | {q['no_answer_baseline_exact']:.1f} | {q['no_answer_baseline_f1']:.1f} | 0.0 | 0.0"
              " | 100.0 |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "squad_real.json"))
    ap.add_argument("--model", default="mini")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--epochs", type=float, default=8, help="embed and rerank epochs")
    ap.add_argument("--lr", type=float, default=5e-4, help="embed and rerank peak learning rate")
    ap.add_argument("--pretrained", default=None, help="skip stage 1: start from this pretraining run dir")
    ap.add_argument("--qa-epochs", type=float, default=3)
    args = ap.parse_args()
    if not (Path(args.data) / "squad-v2-subset" / "dev-4articles.json").is_file():
        raise SystemExit(f"no SQuAD subset under {args.data} (--data)")
    t0 = time.perf_counter()
    res = run(args)
    res["total_wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
