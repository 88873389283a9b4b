"""bench/throughput.py and bench/profile_worker.py run end to end at a tiny size and emit their JSON keys; every
bench command the docs show parses with its script's own arguments.

No speed is asserted here: timing targets live in the benchmark output (bench/README.md), never in unit tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def _corpus(tmp_path: Path) -> Path:
    if DATA.is_file():
        return DATA
    return _own_corpus(tmp_path, 400)


def _own_corpus(tmp_path: Path, documents: int) -> Path:
    """No shared data: a text corpus of its own, `documents` distinct paragraphs separated by blank lines
    (distinct, so the held-out split, chosen by a hash of each document's text, gets its 5%)."""
    import random

    rng = random.Random(0)
    words = "the of and a in to was is for on as with by he at from his an were are which".split()
    paras = [" ".join(" ".join(rng.choice(words) for _ in range(12)).capitalize() + " ." for _ in range(4))
             for _ in range(documents)]
    f = tmp_path / f"corpus_{documents}.txt"
    f.write_text("\n\n".join(paras) + "\n")
    return f


def _bench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BERT_ORCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def _run(args: list[str], tmp_path: Path) -> dict:
    res = _bench(args, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


@pytest.mark.slow  # a bench subprocess
def test_throughput_bench_refuses_an_empty_heldout_split_before_any_phase(tmp_path):
    """No document falls in the 5% held-out split: one line naming the corpus, and no phase runs."""
    from orchestrator.data.corpus import is_eval_document, read_text_documents

    corpus = _own_corpus(tmp_path, 60)  # keep only the documents outside the held-out split
    docs = [d for d in read_text_documents([corpus]) if not is_eval_document(d, 0.05)]
    corpus.write_text("\n\n".join(" ".join(d) for d in docs) + "\n")
    res = _bench(["bench/throughput.py", "--model", "tiny", "--seq", "32", "--global-batch", "8", "--steps", "4",
                  "--phases", "b", "--vocab", "200", "--data", str(corpus), "--out", str(tmp_path / "tp.json")],
                 tmp_path)
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-3000:]
    assert str(corpus) in err[0] and "held-out split (0 documents" in err[0], err
    assert "Traceback" not in res.stderr and not (tmp_path / "tp.json").exists()


@pytest.mark.slow
def test_throughput_bench_tiny_all_three_phases(tmp_path):
    """(a) HF baseline, (b) launcher=local and (c) launcher=ray (2 workers, ZeRO-2) in one bench run; the HF phases
    at dropout 0, on the job's schedule (cosine here), with a learning-curve export at step 3."""
    out = tmp_path / "tp.json"
    r = _run(["bench/throughput.py", "--model", "tiny", "--seq", "32", "--global-batch", "8", "--steps", "6",
              "--warmup-steps", "2", "--log-every", "2", "--phases", "a,abf,b,c", "--eval-draws", "1", "--vocab", "2000",
              "--baseline-dropout", "0", "--override", "schedule=cosine", "--curve-every", "3",
              "--data", str(_corpus(tmp_path)), "--out", str(out)], tmp_path)
    assert json.loads(out.read_text()) == r
    for key in ("runs", "ratios", "mfu", "matmul_peak", "flops_per_token", "heldout_eval", "data_prep",
                "time_to_first_step_s", "tokens_per_s", "ours_bf16"):
        assert key in r, key
    from orchestrator.worker.hardware import cpu_has_native_bf16

    expected = ("a_hf_baseline", "b_local", "c_ray_zero2", *(("a_hf_bf16",) if cpu_has_native_bf16() else ()))
    for run in expected:
        assert r["runs"][run]["tokens_per_s"] > 0
        assert r["runs"][run]["time_to_first_step_s"] > 0
        assert 0.0 <= r["heldout_eval"]["models"][run]["mlm_acc"] <= 1.0
    curve = {f"{k}@3" for k in expected if k.startswith("a_hf")}
    assert set(r["heldout_eval"]["models"]) == set(expected) | curve
    for run in (k for k in expected if k.startswith("a_hf")):  # cosine from lr 1e-3, no warmup at 6 steps
        assert r["runs"][run]["hidden_dropout_prob"] == 0.0 and r["runs"][run]["schedule"] == "cosine"
        steps, lrs = zip(*r["runs"][run]["lr_at_step"])
        assert steps == (2, 4, 6)
        assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 6)) for s in steps])
    assert r["overrides"] == ["schedule=cosine"] and r["baseline_dropout"] == 0.0
    for scores in r["heldout_eval"]["models"].values():  # [MASK]-replaced positions are a subset of the selected
        assert 0.0 <= scores["mlm_acc_mask_only"] <= 1.0
    assert r["heldout_eval"]["mask_replaced_tokens"] < r["heldout_eval"]["masked_tokens"]
    assert r["runs"]["c_ray_zero2"]["world_size"] == 2
    for run in ("b_local", "c_ray_zero2"):  # where our steps went, from the trainer's own split
        split = r["runs"][run]["median_ms_per_step"]
        assert {"data", "forward", "sync", "backward", "step"} <= split.keys() and split["forward"] > 0, split
    assert "to_sync_spread" in r["runs"]["c_ray_zero2"]["median_ms_per_step"]
    c = r["runs"]["c_ray_zero2"]
    rows = c["window_ms_per_step"]
    assert len(rows) == len(c["window_tokens_per_s"]) and rows[0]["slowest_rank"] in (0, 1)
    assert [row["at_step"] for row in rows] == [4, 6] and all(row["step"] >= 0 for row in rows)  # the step phase's ms
    assert {"b_over_a", "c_over_b", "c_over_b_median_windows"} <= r["ratios"].keys()
    assert c["slow_windows"]["of"] == len(c["window_tokens_per_s"]) == 2
    assert r["mfu"]["b_local"]["mfu"] > 0
    assert r["data_prep"]["tokens_per_s_cold"] > 0


def test_the_bench_counts_a_runs_slow_windows_against_its_median_window():
    """A host's slow stretch lowers a run's tokens/s but not its median window; the bench says how many windows it
    held (below 0.85 of the median)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "bench" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    steady = [6000.0, 6100.0, 5900.0, 6050.0, 5950.0]
    got = bench.window_spread(steady + [4000.0, 4200.0, 5200.0])  # 5200 is within 0.85 of the median (5925)
    assert got["median_window_tokens_per_s"] == 5925.0
    assert got["slow_windows"] == {"below_fraction_of_median": 0.85, "of": 8, "count": 2}
    assert bench.window_spread([]) == {}


@pytest.mark.slow  # a bench subprocess
def test_profile_worker_tiny(tmp_path):
    r = _run(["bench/profile_worker.py", "--model", "tiny", "--seq", "32", "--global-batch", "8", "--warmup", "1",
              "--steps", "3", "--profile-steps", "2", "--vocab", "2000", "--data", str(_corpus(tmp_path)),
              "--out", str(tmp_path / "prof.json")], tmp_path)
    assert set(r["split"]) == {"data", "forward", "backward", "optimizer"}
    assert abs(sum(v["fraction"] for v in r["split"].values()) - 1.0) < 1e-6
    assert r["top_ops"] and r["categories"]


# every `python bench/<script>.py ...` in the docs and in the bench scripts' own docstrings (usage lines: the
# `[--option VALUE]` brackets dropped, so the optional arguments are parsed too)
_PARSE_ONLY = r"""
import argparse, json, re, runpy, shlex, sys
from pathlib import Path

class Parsed(Exception):
    pass

original = argparse.ArgumentParser.parse_args

def parse_then_stop(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed()

argparse.ArgumentParser.parse_args = parse_then_stop
files = [Path(p) for p in ("README.md", "bench/README.md", "cluster/README.md")] + sorted(Path("bench").glob("*.py"))
command = re.compile(r"(?:\.venv/bin/)?python3? (bench/\w+\.py)([^`|#\n]*)")
out = []
for f in files:
    for i, line in enumerate(f.read_text().splitlines(), 1):
        for m in command.finditer(line):
            sys.argv = [m.group(1), *shlex.split(re.sub(r"[\[\]]", "", m.group(2)))]
            try:
                runpy.run_path(m.group(1), run_name="__main__")
                result = "ran without parsing its arguments"
            except Parsed:
                result = "ok"
            except SystemExit as exc:
                result = f"refused (exit {exc.code})"
            out.append({"where": f"{f}:{i}", "argv": sys.argv, "result": result})
print(json.dumps(out))
"""


def test_every_documented_bench_command_parses():
    """A bench command a user pastes from the docs is accepted by the script's argparse (nothing is run: the
    parse is stopped right after it succeeds), and every script under bench/ has at least one."""
    res = subprocess.run([sys.executable, "-c", _PARSE_ONLY], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    found = json.loads(res.stdout.splitlines()[-1])
    bad = [f"{c['where']}: {' '.join(c['argv'])}: {c['result']}" for c in found if c["result"] != "ok"]
    assert not bad, "\n".join(bad)
    documented = {c["argv"][0] for c in found}
    assert documented == {f"bench/{p.name}" for p in (REPO / "bench").glob("*.py")}, documented
