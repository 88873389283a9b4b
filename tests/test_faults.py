"""Fault injection (issue 6): NaN skip and rollback, damaged checkpoints, SIGTERM, a killed Ray worker, and an
elastic 2-node cluster that shrinks and grows. Faults come from BERT_ORCH_FAULT (orchestrator/worker/faults.py).

Run with -s to see the measured recovery times and work lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose, read_jsonl
from orchestrator.driver import train

SMALL = [
    "experiment=quickstart_pretrain", "data.synthetic_documents=600", "task.max_seq_length=64",
    "train.global_batch_size=16", "train.micro_batch_size_per_gpu=8", "train.log_every_steps=1",
    "train.write_ledger=true", "train.keep_last=5",
]
LOCAL = [*SMALL, "launcher=local", "compute=cpu1"]


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def _ledger_steps(run_dir: Path) -> dict[int, list[int]]:
    """step -> rows of that step over all ranks; each (rank, step) must appear once."""
    rows: dict[int, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    for f in sorted((run_dir / "ledger").glob("rank*.jsonl")):
        for rec in read_jsonl(f):
            assert (f.name, rec["step"]) not in seen, f"{f.name} records step {rec['step']} twice"
            seen.add((f.name, rec["step"]))
            rows.setdefault(rec["step"], []).extend(rec["rows"])
    return rows


def _assert_epoch_exactly_once(run_dir: Path, steps: int, global_batch: int) -> None:
    plan = json.loads((run_dir / "plan.json").read_text())
    per_epoch = plan["steps_per_epoch"]
    rows = _ledger_steps(run_dir)
    assert sorted(rows) == list(range(1, steps + 1))
    for s, r in rows.items():
        assert len(r) == global_batch, f"step {s} saw {len(r)} rows"
    epoch = [x for s in range(1, min(steps, per_epoch) + 1) for x in rows[s]]
    assert len(epoch) == len(set(epoch)), "a row was seen twice within the epoch"
    if steps >= per_epoch:
        assert len(epoch) == per_epoch * global_batch


_PG_ENV = ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RAY_ADDRESS")


def _fault_env(monkeypatch, spec: str) -> None:
    monkeypatch.setenv("BERT_ORCH_FAULT", spec)


# ---------------------------------------------------------------- plan


def test_elastic_range_keeps_global_batch_or_is_refused():
    from orchestrator.driver import make_plan
    from orchestrator.errors import ConfigError

    base = [*SMALL, "launcher=ray", "compute=cpu2", "train.max_steps=10", "launcher.max_failures=3"]
    plan, _ = make_plan(compose([*base, "compute.min_workers=1", "compute.max_workers=2"]), run_dir="/tmp/x/p1", prepare=False)
    assert plan.world_size == 2 and plan.grad_accum_steps == 1
    assert any("1 -> accum 2" in n for n in plan.notes)
    with pytest.raises(ConfigError) as ei:
        make_plan(compose([*base, "compute.min_workers=1", "compute.max_workers=3"]), run_dir="/tmp/x/p2", prepare=False)
    assert "train.global_batch_size" in str(ei.value) and "[3]" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        make_plan(compose([*base, "compute.min_workers=1", "compute.max_workers=2", "launcher.max_failures=0"]),
                  run_dir="/tmp/x/p3", prepare=False)
    assert "launcher.max_failures" in str(ei.value)


# ---------------------------------------------------------------- divergence guard (local, DeepSpeed ZeRO-2)


@pytest.mark.slow  # real training jobs (the unit tier: test_trainer.py)
def test_nan_step_is_skipped_and_nan_run_rolls_back(tmp_path, monkeypatch):
    """NaN at step 6: skipped (no LR tick). NaN at 10, 11, 12 (3 in a row): roll back to step 8, redo, finish."""
    _fault_env(monkeypatch, "nan_loss_at=6,10,11,12")
    run_dir = tmp_path / "nan"
    t0 = time.time()
    summary = train(compose([*LOCAL, "engine=zero2", "train.max_steps=16", "train.checkpoint_every_steps=4",
                             "train.eval_every_steps=16", "train.max_bad_steps_in_row=3"]),
                    run_dir=str(run_dir), interactive=False)
    print(f"\n[nan] wall {time.time() - t0:.1f}s")
    assert summary["status"] == "completed" and summary["steps"] == 16
    assert summary["rollbacks"] == 1 and summary["skipped_steps"] == 4
    recs = _metrics(run_dir)
    skipped = [r["step"] for r in recs if r.get("event") == "skipped_step"]
    assert skipped == [6]  # the skip events of 10-12 were past the rollback point and are dropped with them
    rb = [r for r in recs if r.get("event") == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 8 and rb[0]["from_step"] == 12 and len(rb[0]["bad_steps"]) == 3
    train_recs = {r["step"]: r for r in recs if "loss" in r}
    assert sorted(train_recs) == list(range(1, 17))
    assert train_recs[6]["lr"] == train_recs[5]["lr"], "a skipped step does not advance the LR schedule"
    assert all(r["loss"] is not None for s, r in train_recs.items() if s != 6)
    _assert_epoch_exactly_once(run_dir, 16, 16)


@pytest.mark.slow  # real training jobs (the unit tier: test_trainer.py)
def test_loss_spike_is_skipped(tmp_path, monkeypatch):
    _fault_env(monkeypatch, "spike_loss_at=9")
    run_dir = tmp_path / "spike"
    summary = train(compose([*LOCAL, "engine=torch", "train.max_steps=12", "train.checkpoint_every_steps=12",
                             "train.eval_every_steps=12", "train.spike_factor=4"]), run_dir=str(run_dir), interactive=False)
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == 0
    ev = [r for r in _metrics(run_dir) if r.get("event") == "skipped_step"]
    assert [r["step"] for r in ev] == [9] and ev[0]["reason"].startswith("loss spike")


@pytest.mark.slow  # real training jobs (the unit tier: test_trainer.py)
def test_sticky_bad_data_fails_after_max_rollbacks(tmp_path, monkeypatch):
    from orchestrator.worker.trainer import DivergenceError

    _fault_env(monkeypatch, "nan_loss_sticky_at=3,4")
    with pytest.raises(DivergenceError, match="max_rollbacks"):
        train(compose([*LOCAL, "engine=torch", "train.max_steps=8", "train.checkpoint_every_steps=2",
                       "train.eval_every_steps=8", "train.max_bad_steps_in_row=2", "train.max_rollbacks=1"]),
              run_dir=str(tmp_path / "sticky"), interactive=False)


# ---------------------------------------------------------------- damaged checkpoint


@pytest.mark.slow  # real training jobs (the unit tier: test_trainer.py)
def test_truncated_newest_checkpoint_resumes_from_previous(tmp_path):
    run_dir = tmp_path / "trunc"
    args = [*LOCAL, "engine=torch", "train.checkpoint_every_steps=4", "train.eval_every_steps=100"]
    train(compose([*args, "train.max_steps=8"]), run_dir=str(run_dir), interactive=False)
    victim = run_dir / "checkpoints" / "step_00000008" / "engine_state.pt"
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    summary = train(compose([*args, "train.max_steps=12"]), run_dir=str(run_dir), interactive=False)
    assert summary["resumed_from"].endswith("step_00000004")
    assert summary["skipped_checkpoints"] and "step_00000008" in summary["skipped_checkpoints"][0]
    events = [r for r in _metrics(run_dir) if r.get("event") == "checkpoint_skipped"]
    assert events and "manifest says" in events[0]["reason"]
    assert [r["step"] for r in _metrics(run_dir) if "loss" in r] == list(range(1, 13))
    _assert_epoch_exactly_once(run_dir, 12, 16)


# ---------------------------------------------------------------- SIGTERM (preemption), local launcher


@pytest.mark.slow  # real training jobs (the unit tier: test_trainer.py)
def test_sigterm_saves_checkpoint_at_stop_step_and_rerun_resumes(tmp_path):
    run_dir = tmp_path / "term"
    args = [*LOCAL, "engine=zero2", "train.max_steps=40", "train.checkpoint_every_steps=100", "train.eval_every_steps=100",
            f"hydra.run.dir={run_dir}"]
    # not the in-process runs' process-group env (their MASTER_PORT is still bound in this process)
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV}
    env["BERT_ORCH_FAULT"] = "slow_step=0.3"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not any(r.get("step", 0) >= 5 for r in (_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else [])):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    t_term = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    t_exit = time.time()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted", out[-3000:]
    stopped = summary["steps"]
    assert 5 <= stopped < 40
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}").is_dir()
    assert max(r["step"] for r in _metrics(run_dir) if "loss" in r) == stopped
    print(f"\n[sigterm] stopped at step {stopped}, {t_exit - t_term:.1f}s from SIGTERM to exit (work lost: 0 steps)")
    env.pop("BERT_ORCH_FAULT")
    again = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"].endswith(f"step_{stopped:08d}")
    assert [r["step"] for r in _metrics(run_dir) if "loss" in r] == list(range(1, 41))
    _assert_epoch_exactly_once(run_dir, 40, 16)


# ---------------------------------------------------------------- Ray: a worker dies


def _recovery(run_dir: Path, t_fail: float, resume_step: int) -> float:
    """Seconds from the failure to the first step finished after the resume (from the ledger)."""
    rows = read_jsonl(run_dir / "ledger" / "rank0.jsonl")
    return next(r["time"] for r in rows if r["step"] == resume_step + 1) - t_fail


@pytest.mark.slow
def test_sigkill_one_ray_worker_group_restarts_and_finishes(ray_cluster, tmp_path, monkeypatch):
    """Rank 1 SIGKILLs itself after step 8 (checkpoint at 5): Ray restarts the group, it resumes at step 5."""
    _fault_env(monkeypatch, "kill_rank=1@step=8")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "kill"
    summary = train(compose([*SMALL, "launcher=ray", "compute=cpu2", "engine=zero2", "logger=wandb", "train.max_steps=null", "train.epochs=1",
                             "train.checkpoint_every_steps=5", "train.eval_every_steps=1000", "launcher.max_failures=2"]),
                    run_dir=str(run_dir), interactive=False)
    steps = summary["steps"]
    assert summary["status"] == "completed" and summary["resumed_from"].endswith("step_00000005")
    assert [r["step"] for r in _metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))
    _assert_epoch_exactly_once(run_dir, steps, 16)
    marker = json.loads((run_dir / ".faults" / "kill_rank=1@step=8").read_text())
    resume = [r for r in _metrics(run_dir) if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["rng"] == "restored"
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{summary['wandb_run_id']}"))
    assert len(offline) == 2, "the restarted group continues the same W&B run id"
    # world size 2, two starts: two segments in all means only rank 0 ever opened a W&B run
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2, "a W&B run from a rank other than 0"
    resumed_at = int(Path(summary["resumed_from"]).name.split("_")[1])
    assert marker["step"] == 8 and summary["steps_this_start"] == steps - resumed_at
    print(f"\n[ray kill] killed after step {marker['step']}, resumed at {resumed_at}: work lost"
          f" {marker['step'] - resumed_at} steps; recovery (kill -> first step after"
          f" resume) {_recovery(run_dir, marker['time'], resumed_at):.1f}s; total {summary['wall_time_s']:.0f}s")


@pytest.mark.slow
def test_resume_at_other_world_size_then_roll_back(ray_cluster, tmp_path, monkeypatch):
    """A ZeRO-2 checkpoint of 1 worker resumes on 2 (universal conversion); NaN runs then roll back both to that
    world-1 checkpoint (universal again) and to a world-2 one (plain load on the same engine)."""
    run_dir = tmp_path / "xw"
    base = [*SMALL, "engine=zero2", "train.checkpoint_every_steps=4", "train.eval_every_steps=100",
            "train.max_bad_steps_in_row=3", "train.max_rollbacks=2"]
    train(compose([*base, "launcher=local", "compute=cpu1", "train.max_steps=8"]), run_dir=str(run_dir), interactive=False)
    _fault_env(monkeypatch, "nan_loss_at=9,10,11,13,14,15")
    summary = train(compose([*base, "launcher=ray", "compute=cpu2", "train.max_steps=20"]), run_dir=str(run_dir),
                    interactive=False)
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["rollbacks"] == 2
    recs = _metrics(run_dir)
    resume = [r for r in recs if r.get("event") == "resume"][-1]
    assert resume["saved_world_size"] == 1 and resume["universal_conversion_s"] > 0 and resume["rng"] == "reseeded"
    rb = [(r["step"], r["from_step"]) for r in recs if r.get("event") == "rollback"]
    assert rb == [(8, 11), (12, 15)]
    train_recs = {r["step"]: r for r in recs if "loss" in r}
    assert sorted(train_recs) == list(range(1, 21))
    assert train_recs[4]["grad_accum_steps"] == 2 and train_recs[20]["grad_accum_steps"] == 1
    _assert_epoch_exactly_once(run_dir, 20, 16)
    print(f"\n[cross-world] universal conversion 1->2 {resume['universal_conversion_s']:.1f}s; rollbacks "
          + ", ".join(f"{r['from_step']}->{r['step']} in {r['seconds']:.1f}s" for r in recs if r.get("event") == "rollback"))


@pytest.mark.slow
def test_a_straggling_ray_worker_is_named_in_the_step_time_split(ray_cluster, tmp_path, monkeypatch):
    """Rank 1 of 2 sleeps 100 ms in every forward: once past the first window (which also holds each rank's
    one-time first-step costs), every log record names it as the rank the other waited for, rank 0's wait at the
    step's sync shows the 100 ms, and the forward's mean over ranks holds half of it."""
    _fault_env(monkeypatch, "straggler_rank=1@seconds=0.1")
    run_dir = tmp_path / "straggler"
    summary = train(compose([*SMALL, "launcher=ray", "compute=cpu2", "engine=zero2", "train.max_steps=12",
                             "train.log_every_steps=4", "train.eval_every_steps=12", "train.checkpoint_every_steps=12",
                             "train.write_ledger=false"]), run_dir=str(run_dir), interactive=False)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    recs = [r for r in _metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in recs] == [4, 8, 12]
    for r in recs[1:]:
        assert r["slowest_rank"] == 1, r
        assert r["time_to_sync_spread_ms"] >= 70 and r["time_sync_max_ms"] >= 70, r
        assert r["time_forward_ms"] >= 50, r
    print(f"\n[straggler] rank 1 +100 ms/forward: spread {recs[-1]['time_to_sync_spread_ms']:.0f} ms,"
          f" rank 0 waits {recs[-1]['time_sync_max_ms']:.0f} ms per step")


# ---------------------------------------------------------------- Ray: elastic 2-node cluster




@pytest.mark.slow
def test_elastic_two_node_cluster_shrinks_and_grows(tmp_path, monkeypatch):
    """ZeRO-2, one CPU worker per node: remove a node -> world 1 (accum doubled, universal checkpoint), add it
    back -> world 2; the global batch, the data order and the step count are kept."""
    from ray.cluster_utils import Cluster

    # Ray 2.60's elastic controller first retries a lost node's old group size until the worker-group start
    # timeout (default 60 s) and only then shrinks; both count as failures. A shorter timeout for the test's
    # cluster (its processes inherit this env):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", os.environ.get("ELASTIC_TEST_START_TIMEOUT_S", "20"))
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    run_dir = tmp_path / "elastic"
    env = {k: v for k, v in os.environ.items() if k not in _PG_ENV}
    env["BERT_ORCH_FAULT"] = "slow_step=0.7"
    args = [*SMALL, "launcher=ray", f"launcher.address={cluster.address}", "compute=cpu2", "engine=zero2",
            "compute.min_workers=1", "compute.max_workers=2", "compute.elastic_resize_interval_s=5",
            "launcher.max_failures=6", "train.max_steps=null", "train.epochs=1", "train.checkpoint_every_steps=5",
            "train.eval_every_steps=1000", f"hydra.run.dir={run_dir}"]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)

    def wait_for(pred, what, timeout=600):
        deadline = time.time() + timeout
        while True:
            try:
                if pred():
                    return
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, f"driver exited while waiting for {what}: " + (tmp_path / "driver.log").read_text()[-4000:]
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.3)

    seen = {"max_step": 0}

    def recs():
        r = _metrics(run_dir)
        seen["max_step"] = max([seen["max_step"]] + [x["step"] for x in r if "loss" in x])
        return r

    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_00000010").is_dir(), "checkpoint 10 at world 2")
        t_start = time.time()
        t_remove = time.time()
        cluster.remove_node(nodes[1])
        wait_for(lambda: any("loss" in r and r.get("world_size") == 1 for r in recs()), "training at world size 1")
        shrink = [r for r in recs() if r.get("event") == "resume" and r["world_size"] == 1][-1]
        first1 = next(r for r in recs() if "loss" in r and r.get("world_size") == 1)
        removed_at = seen["max_step"]  # the highest step logged before the shrunk group truncated the log
        wait_for(lambda: any(json.loads((p / "trainer_state.json").read_text())["world_size"] == 1
                             for p in (run_dir / "checkpoints").glob("step_*")), "a checkpoint at world size 1")
        t_add = time.time()
        nodes[1] = cluster.add_node(num_cpus=1)
        wait_for(lambda: any("loss" in r and r.get("world_size") == 2 and r["time"] > t_add for r in recs()),
                 "training at world size 2 again")
        grown_at = seen["max_step"]
        grow = [r for r in recs() if r.get("event") == "resume" and r["world_size"] == 2][-1]
        first2 = next(r for r in recs() if "loss" in r and r.get("world_size") == 2 and r["time"] > t_add)
        assert proc.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = summary["steps"]
    total = time.time() - t_start
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["global_batch_size"] == 16
    assert first1["grad_accum_steps"] == 2 and first1["consumed_samples"] == first1["step"] * 16
    assert shrink["saved_world_size"] == 2 and shrink["universal_conversion_s"] > 0
    assert grow["saved_world_size"] == 1 and first2["grad_accum_steps"] == 1
    assert [r["step"] for r in recs() if "loss" in r] == list(range(1, steps + 1))
    _assert_epoch_exactly_once(run_dir, steps, 16)
    print(f"\n[elastic] node removed at ~step {removed_at}, resumed at world 1 from step {shrink['step']}"
          f" (work lost {removed_at - shrink['step']} steps), first world-1 step {first1['time'] - t_remove:.1f}s"
          f" after the removal; universal conversion {shrink['universal_conversion_s']:.1f}s (2->1),"
          f" {grow['universal_conversion_s'] or 0:.1f}s (1->2); node added -> first world-2 step"
          f" {first2['time'] - t_add:.1f}s (reached step {grown_at} at world 1, resumed from step {grow['step']}:"
          f" {grown_at - grow['step']} steps redone); {steps} steps, {total:.0f}s from first removal to the end")
