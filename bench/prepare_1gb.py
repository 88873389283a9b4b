"""Bench: prepare a generated >= 1 GB corpus with 2 Ray CPU workers; peak memory of the whole process tree.

    .venv/bin/python bench/prepare_1gb.py [--gb 1.0] [--dir /tmp/prep1g] [--workers 2] [--keep]

Generates text + jsonl files (Zipf-distributed pseudo-words, multi-sentence documents, 1% exact duplicates),
runs `python -m orchestrator.prepare launcher=ray num_workers=2` in a subprocess (which starts its own local
Ray: GCS, raylet, workers are all its descendants) and samples RSS (every 0.2 s) and PSS (every ~2 s) of every
process in that tree. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_SYL = ["ka", "lo", "mir", "ta", "ven", "so", "dra", "bel", "quin", "zor", "mu", "rae", "fen", "tho", "li", "an",
        "er", "ost", "pre", "ul", "gi", "nor", "sk", "wy", "ja", "es", "tri", "bo", "ce", "hu"]


def _vocabulary(n: int, rng: np.random.Generator) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words.add("".join(_SYL[i] for i in rng.integers(0, len(_SYL), k)))
    return sorted(words)


def generate(out_dir: Path, total_bytes: int, seed: int = 0, jsonl_share: float = 0.4, files: int = 6,
             dup_rate: float = 0.01) -> dict:
    """Documents of 3-30 sentences of 5-25 Zipf-distributed pseudo-words; text files and jsonl files."""
    rng = np.random.default_rng(seed)
    vocab = np.asarray(_vocabulary(60000, rng), dtype=object)
    zipf_p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    zipf_p /= zipf_p.sum()
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file = total_bytes // files
    n_docs = 0
    n_dups = 0
    recent: list[str] = []
    for fi in range(files):
        jsonl = fi < round(files * jsonl_share)
        path = out_dir / (f"part{fi:02d}.jsonl" if jsonl else f"part{fi:02d}.txt")
        written = 0
        with open(path, "w", encoding="utf-8") as fh:
            while written < per_file:
                words = vocab[rng.choice(len(vocab), size=20000, p=zipf_p)]
                wi = 0
                buf = []
                while wi < len(words) - 30 * 25:
                    if recent and rng.random() < dup_rate:
                        doc = recent[int(rng.integers(len(recent)))]
                        n_dups += 1
                    else:
                        sents = []
                        for _ in range(int(rng.integers(3, 31))):
                            k = int(rng.integers(5, 26))
                            if wi + k > len(words):
                                break
                            s = " ".join(words[wi : wi + k])
                            wi += k
                            sents.append(s[:1].upper() + s[1:] + ".")
                        doc = " ".join(sents)
                        if len(recent) < 1000:
                            recent.append(doc)
                        else:
                            recent[int(rng.integers(1000))] = doc
                    n_docs += 1
                    buf.append(json.dumps({"text": doc, "id": n_docs}) + "\n" if jsonl else doc + "\n\n")
                    if len(buf) >= 64:
                        break
                chunk = "".join(buf)
                fh.write(chunk)
                written += len(chunk.encode("utf-8"))
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return {"dir": str(out_dir), "bytes": size, "documents": n_docs, "duplicates_generated": n_dups}


class TreeSampler:
    """Peak total RSS (and PSS, which counts shared pages once) of a process and all its descendants."""

    def __init__(self, pid: int, every_s: float = 0.2, pss_every: int = 10):
        import psutil

        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.peak_by_name: dict[str, int] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        n = 0
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            names: dict[str, int] = {}
            for p in procs:
                try:
                    r = p.memory_info().rss
                    rss += r
                    nm = p.name()[:40]
                    names[nm] = names.get(nm, 0) + r
                    if n % self.pss_every == 0:
                        pss += p.memory_full_info().pss
                except psutil.Error:
                    pass
            if rss > self.peak_rss:
                self.peak_rss, self.peak_by_name = rss, names
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(procs))
            n += 1
            time.sleep(self.every_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self.thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/prep1g")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-mb", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the corpus and output for a re-run")
    args = ap.parse_args()
    base = Path(args.dir)
    corpus = base / "corpus"
    out = base / "prepared"
    if not (corpus / "DONE").is_file():
        shutil.rmtree(corpus, ignore_errors=True)
        t = time.perf_counter()
        info = generate(corpus, int(args.gb * 2**30))
        info["seconds"] = time.perf_counter() - t
        (corpus / "DONE").write_text(json.dumps(info))
    info = json.loads((corpus / "DONE").read_text())
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "orchestrator.prepare", f"sources=[{corpus}/part*]", f"output_dir={out}",
           "launcher=ray", "launcher.address=null", f"num_workers={args.workers}",
           f"shard_bytes={args.shard_mb * 2**20}", "max_seq_length=128"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeSampler(proc.pid) as sampler:
        log = proc.stdout.read()
        proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(log[-5000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    stats = json.loads((out / "stats.json").read_text())
    top = sorted(sampler.peak_by_name.items(), key=lambda kv: -kv[1])[:8]
    result = {
        "corpus_bytes": info["bytes"],
        "corpus_gib": info["bytes"] / 2**30,
        "corpus_files": len(list(corpus.glob("part*"))),
        "documents_read": stats["documents_read"],
        "documents": stats["documents"],
        "duplicates_dropped": stats["duplicates_dropped"],
        "tokens": stats["tokens"],
        "unknown_token_rate": stats["unknown_token_rate"],
        "train_rows": stats["train_rows"],
        "shards": stats["timing"]["blocks"],
        "ray_workers": args.workers,
        "job_seconds": stats["timing"]["seconds"],
        "wall_seconds_incl_ray_start": wall,
        "pass1_seconds": stats["timing"]["pass1_seconds"],
        "tokenizer_seconds": stats["timing"]["tokenizer_seconds"],
        "pass2_seconds": stats["timing"]["pass2_seconds"],
        "tokens_per_s": stats["timing"]["tokens_per_s"],
        "peak_rss_all_processes_gib": sampler.peak_rss / 2**30,
        "peak_pss_all_processes_gib": sampler.peak_pss / 2**30,
        "peak_process_count": sampler.peak_procs,
        "rss_at_peak_by_process_gib": {k: round(v / 2**30, 3) for k, v in top},
        "output_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }
    result["peak_memory_limit_gib"] = 3.0
    result["peak_memory_within_limit"] = result["peak_pss_all_processes_gib"] < 3.0
    print(json.dumps(result, indent=1))
    out_json = REPO / "bench" / "results" / "prepare_1gb.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
