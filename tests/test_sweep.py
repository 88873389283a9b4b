"""Hydra multirun through our Ray Jobs launcher on a real 2-CPU head: members run concurrently as far as
the free CPUs allow, each in its own run dir; a member the plan refuses fails alone; Optuna search works."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_page_links_valid_pngs

pytestmark = pytest.mark.slow

SMOKE = ["experiment=quickstart_pretrain", "debug=smoke", "launcher=ray", "compute=cpu1"]


@pytest.fixture(scope="module")
def head(ray_head):
    return ray_head


def multirun(head, sweep_dir: Path, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "-m", *args, f"hydra.launcher.address={head.dashboard_url}",
         f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.poll_s=0.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    print(f"multirun took {time.time() - t0:.0f}s")
    print(out.stdout[-4000:])
    return out


def members(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())["members"]


def max_overlap(rows: list[dict]) -> int:
    events = sorted([(r["start_time"], 1) for r in rows] + [(r["end_time"], -1) for r in rows], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def test_grid_runs_two_at_a_time_and_a_member_refused_by_the_plan_fails_alone(head, tmp_path):
    """A 3 x 2 grid: three members run on the 2-CPU head, never more than two at a time, each in its own run dir;
    the three the plan refuses (ZeRO stage 4) fail alone, before reaching the cluster, and the sweep exits non-zero."""
    sweep_dir = tmp_path / "grid"
    out = multirun(head, sweep_dir, [*SMOKE, "logger=wandb", "optim.lr=1e-3,2e-3,3e-3", "engine.zero_stage=2,4"])
    assert out.returncode != 0, "a failed member makes the sweep's exit status non-zero"
    rows = members(sweep_dir)
    ran = [r for r in rows if r["status"] == "succeeded"]
    refused = [r for r in rows if r["status"] != "succeeded"]
    assert len(rows) == 6 and len(ran) == 3, rows
    for r in sorted(ran, key=lambda r: r["start_time"]):
        print(f"member {r['num']}: start {r['start_time']:.1f} end {r['end_time']:.1f} ({r['wall_s']:.0f}s) "
              f"{' '.join(r['overrides'][-2:])} eval_mlm_acc {r['metric']:.4f}")
    assert max_overlap(ran) == 2, "1-CPU members on a 2-CPU cluster: two at a time, never three"
    assert {tuple(sorted(o for o in r["overrides"] if o.startswith(("optim.lr", "engine.")))) for r in ran} == {
        ("engine.zero_stage=2", "optim.lr=0.001"), ("engine.zero_stage=2", "optim.lr=0.002"),
        ("engine.zero_stage=2", "optim.lr=0.003")}  # Hydra normalises 1e-3
    for r in ran:  # each its own run, in its own dir
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["steps"] == 20 and r["metric"] == pytest.approx(summary["final_eval"]["eval_mlm_acc"])
        plan = json.loads((Path(r["run_dir"]) / "plan.json").read_text())
        assert plan["config"]["logger"]["group"] == "sweep-grid", "logger=wandb members share a W&B group"
    assert len({r["run_dir"] for r in ran}) == 3
    for bad in refused:
        assert "engine.zero_stage=4" in bad["overrides"] and bad["status"] == "failed" and bad["job_id"] is None, bad
    with (sweep_dir / "sweep_summary.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [row["status"] for row in table] == ["succeeded"] * 3 + ["failed"] * 3
    metrics = [float(row["final_eval.eval_mlm_acc"]) for row in table[:3]]
    assert metrics == sorted(metrics, reverse=True), "best first"
    assert all("config key 'engine.zero_stage': 4 is not one of 0, 1, 2, 3" in row["error"] for row in table[3:])
    assert "sweep summary" in out.stdout
    page = sweep_dir / "report" / "index.html"
    assert f"report: {page}" in out.stdout, "the sweep ends by saying where its report is"
    # one plot per parameter that differs between the members that ran (all of them ran ZeRO-2)
    assert set(assert_page_links_valid_pngs(page)) == {"sweep_optim.lr.png"}


def test_optuna_search_runs_trials_as_ray_jobs(head, tmp_path):
    sweep_dir = tmp_path / "optuna"
    out = multirun(head, sweep_dir, [*SMOKE, "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=2",
                                     "hydra.sweeper.n_jobs=2", "hydra.sweeper.seed=0",
                                     "optim.lr=tag(log, interval(1e-4, 1e-2))"])
    assert out.returncode == 0, out.stderr[-4000:]
    rows = members(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "succeeded" for r in rows)
    lrs = {float(o.split("=", 1)[1]) for r in rows for o in r["overrides"] if o.startswith("optim.lr=")}
    assert len(lrs) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    from omegaconf import OmegaConf

    result = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert result.n_completed == 2 and result.best_value == pytest.approx(max(r["metric"] for r in rows))


def test_sweep_over_the_default_pipeline_is_refused_before_submitting(head, tmp_path):
    """The default experiment is a two-stage pipeline: a job-level sweep key would be lost, so every member is
    refused at once, naming the key, and nothing reaches the cluster."""
    sweep_dir = tmp_path / "pipe"
    t0 = time.time()
    out = multirun(head, sweep_dir, ["optim.lr=1e-3,3e-3"], timeout=300)
    assert out.returncode != 0
    rows = members(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "failed" and r["job_id"] is None for r in rows), rows
    assert all("optim.lr" in r["error"] and "pipeline" in r["error"] for r in rows), rows
    assert time.time() - t0 < 120
