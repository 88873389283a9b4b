"""Bench: preparation tokens/s — our prepare job with 1 and 2 Ray workers vs a single-process HF datasets map.

    .venv/bin/python bench/prepare_throughput.py [--mb 300] [--dir /tmp/prep_bench]

One run, one corpus (generated jsonl, the 1 GB bench's generator), one vocabulary (trained once, then given to
every contender as a directory). One local Ray (2 CPUs) is started first and shared by both Ray runs, so its
start-up is not counted; Ray Data actor start-up is. The baseline is `datasets.load_dataset("json")` +
`Dataset.map(batched=True)` with the same fast tokenizer, single process, TOKENIZERS_PARALLELISM=false (one
core, like one of our workers). It only tokenises: no normalisation, dedup, sample building, packing or shards.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prepare_1gb import generate  # noqa: E402


def ours(corpus: Path, out: Path, tok_dir: Path, workers: int, launcher: str = "ray") -> dict:
    from orchestrator.config.prepare_schema import to_prepare_config
    from orchestrator.data.prepare_job import prepare_corpus

    shutil.rmtree(out, ignore_errors=True)
    cfg = to_prepare_config({
        "sources": [str(corpus)], "output_dir": str(out), "num_workers": workers, "shard_bytes": 16 * 2**20,
        "launcher": {"name": launcher}, "tokenizer": {"source": "dir", "path": str(tok_dir)},
    })
    t = time.perf_counter()
    st = prepare_corpus(cfg, echo=lambda s: None)
    secs = time.perf_counter() - t
    return {"tokens": st["tokens"], "seconds": secs, "tokens_per_s": st["tokens"] / secs,
            "pass1_seconds": st["timing"]["pass1_seconds"], "pass2_seconds": st["timing"]["pass2_seconds"],
            "pass2_tokens_per_s": st["tokens"] / st["timing"]["pass2_seconds"]}


def hf_baseline(corpus: Path, tok_dir: Path, cache: Path) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=sorted(str(p) for p in corpus.glob("*.jsonl")), split="train",
                               cache_dir=str(cache))
    t1 = time.perf_counter()
    counted = [0]

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        counted[0] += sum(len(x) for x in ids)
        return {"input_ids": ids}

    dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=None, load_from_cache_file=False)
    t2 = time.perf_counter()
    return {"tokens": counted[0], "seconds": t2 - t0, "tokens_per_s": counted[0] / (t2 - t0),
            "load_seconds": t1 - t0, "map_seconds": t2 - t1, "map_tokens_per_s": counted[0] / (t2 - t1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--dir", default="/tmp/prep_bench")
    args = ap.parse_args()
    base = Path(args.dir)
    corpus = base / "corpus"
    if not (base / "corpus.json").is_file():
        shutil.rmtree(corpus, ignore_errors=True)
        info = generate(corpus, args.mb * 2**20, seed=1, jsonl_share=1.0, files=4, dup_rate=0.0)
        (base / "corpus.json").write_text(json.dumps(info))
    info = json.loads((base / "corpus.json").read_text())

    # one vocabulary for everyone, trained on a sample by the prepare job itself (not timed)
    from orchestrator.config.prepare_schema import to_prepare_config
    from orchestrator.data.prepare_job import connect_ray, ensure_tokenizer

    tok_dir = base / "vocab" / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from orchestrator.data.prepare_job import _load_or_plan, content_config

        cfg = to_prepare_config({"sources": [str(corpus)], "output_dir": str(base / "vocab"), "launcher": {"name": "local"},
                                 "dedup": False, "tokenizer": {"sample_documents": 20000}})
        (base / "vocab").mkdir(parents=True, exist_ok=True)
        _, blocks = _load_or_plan(cfg, base / "vocab")
        ensure_tokenizer(cfg, blocks, {"out": str(base / "vocab"), "cfg": content_config(cfg)})

    import ray

    cfg = to_prepare_config({"sources": ["x"], "output_dir": "x", "num_workers": 2})
    os.environ.pop("RAY_ADDRESS", None)
    connect_ray(cfg)
    result = {"corpus_bytes": info["bytes"], "corpus_documents": info["documents"], "corpus_format": "jsonl",
              "cpus": os.cpu_count()}
    result["ours_ray_1_worker"] = ours(corpus, base / "out1", tok_dir, 1)
    result["ours_ray_2_workers"] = ours(corpus, base / "out2", tok_dir, 2)
    ray.shutdown()
    result["hf_datasets_map_batched_1_process"] = hf_baseline(corpus, tok_dir, base / "hf_cache")
    r1 = result["ours_ray_1_worker"]["tokens_per_s"]
    result["speedup_2_vs_1_workers"] = result["ours_ray_2_workers"]["tokens_per_s"] / r1
    result["ours_2_workers_vs_hf"] = result["ours_ray_2_workers"]["tokens_per_s"] / \
        result["hf_datasets_map_batched_1_process"]["tokens_per_s"]
    from orchestrator.serve.measure import emit_bench_result

    result["command"] = f"bench/prepare_throughput.py --mb {args.mb}"
    emit_bench_result(result, str(Path(__file__).resolve().parent / "results" / "prepare_throughput.json"), indent=1)
    for d in ("out1", "out2", "hf_cache"):
        shutil.rmtree(base / d, ignore_errors=True)


if __name__ == "__main__":
    main()
