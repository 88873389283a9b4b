"""A run dir holds one job: a checkpoint resumes only into the same job, planning never writes into a live run,
and a second job on a held run dir is refused naming the holder (a SIGKILLed holder does not block); a start waits
for the workers of an earlier one, which may outlive their killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose, run_cli
from orchestrator.driver import make_plan, train
from orchestrator.errors import ConfigError
from orchestrator.plan.identity import job_identity
from orchestrator.run_lock import WORKERS_LOCK, RunDirBusy, run_dir_lock, wait_for_earlier_workers
from orchestrator.worker import checkpoint as ckpt

BASE = ["experiment=quickstart_pretrain", "launcher=local", "compute=cpu1", "engine=torch", "train.max_steps=100"]


def _plan(run_dir: Path, *extra: str):
    return make_plan(compose([*BASE, *extra]), str(run_dir), prepare=False)[0]


def _checkpoint(run_dir: Path, step: int, *extra: str) -> None:
    """A checkpoint as the trainer writes it (state + identity + manifest), of the job BASE + extra."""
    plan = _plan(run_dir, *extra)
    state = {"step": step, "world_size": 1, "identity": job_identity(plan.config)}
    ckpt.save(run_dir, step, 0, lambda: None, lambda d: (d / "engine.json").write_text("{}"), state, keep_last=2)


def test_a_checkpoint_resumes_only_into_the_same_job(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 50)
    with pytest.raises(ConfigError) as ei:
        _plan(run, "optim.lr=0.5", "train.global_batch_size=128", "model=mini")
    msg = str(ei.value)
    assert ei.value.key == "train.resume" and "step 50" in msg
    for key in ("optim.lr: 0.003 -> 0.5", "train.global_batch_size: 64 -> 128", "model.hidden_size: 128 -> 256"):
        assert key in msg, msg
    # what does not change the math resumes: a longer budget, placement, logging and checkpoint cadence
    same = _plan(run, "train.max_steps=200", "engine.activation_checkpointing=true", "train.log_every_steps=5",
                 "train.checkpoint_every_steps=10", "train.micro_batch_size_per_gpu=16", "logger.project=other")
    assert same.total_steps == 200
    assert _plan(run, "optim.lr=0.5", "train.resume=force").job.optim.lr == 0.5
    with pytest.raises(ConfigError, match="train.resume=never"):
        _plan(run, "train.resume=never")


def test_plan_only_writes_nothing_into_a_run(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 50)
    (run / "plan.json").write_text('{"the": "live run\'s plan"}')
    train(compose([*BASE, "plan_only=true"]), run_dir=str(run))
    assert json.loads((run / "plan.json").read_text()) == {"the": "live run's plan"}
    fresh = tmp_path / "fresh"
    train(compose([*BASE, "plan_only=true"]), run_dir=str(fresh))
    assert (fresh / "plan.json").is_file(), "a new run dir still gets its plan"


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with run_dir_lock(run):
        t0 = time.time()
        with pytest.raises(RunDirBusy) as ei:
            train(compose([*BASE, "train.max_steps=4"]), run_dir=str(run))
        assert time.time() - t0 < 5, "refused at once, not after waiting"
    assert f"pid {os.getpid()} on " in str(ei.value) and str(run) in str(ei.value)
    assert not (run / "plan.json").exists(), "the refused job wrote nothing"


def test_a_sigkilled_holder_does_not_block_the_next_start(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from orchestrator.run_lock import run_dir_lock\n"
                               f"with run_dir_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid} on "):
            with run_dir_lock(run):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_dir_lock(run):  # the kernel released the dead holder's lock
        pass


def _orphan(run: Path, until: str = "") -> subprocess.Popen:
    """A worker of an earlier start that outlives its driver: it holds the run dir's worker lock until killed, or
    until the file `until` appears in the run dir (and half a second more)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, time; from orchestrator.run_lock import worker_hold\n"
                               f"with worker_hold({str(run)!r}):\n    print('held', flush=True)\n"
                               f"    while not {until!r} or not os.path.exists(os.path.join({str(run)!r}, {until!r})):"
                               " time.sleep(0.05)\n    time.sleep(0.5)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_start_waits_for_the_workers_of_an_earlier_start(tmp_path):
    run = tmp_path / "run"
    assert wait_for_earlier_workers(run) == 0.0, "a new run dir has no earlier workers"
    holder = _orphan(run)
    try:
        t0 = time.time()
        with pytest.raises(RunDirBusy) as ei:
            wait_for_earlier_workers(run, timeout_s=0.5)
        assert 0.5 <= time.time() - t0 < 10
        assert str(run / WORKERS_LOCK) in str(ei.value) and f"pids {holder.pid} on this node" in str(ei.value)
    finally:
        holder.kill()
        holder.wait()
    assert wait_for_earlier_workers(run, timeout_s=0.5) < 0.5, "a killed worker's hold is gone with it"
    # the job itself waits, saying so, until the earlier worker has exited; then it trains
    holder = _orphan(run, until="go")
    job = subprocess.Popen([sys.executable, "-m", "orchestrator", *BASE, "train.max_steps=2", f"hydra.run.dir={run}"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in job.stdout:
        lines.append(line)
        if "waiting for the workers of an earlier start to exit" in line:
            assert f"(pids {holder.pid} on this node)" in line, line
            assert not (run / "plan.json").exists(), "the waiting start wrote nothing into the run dir"
            (run / "go").touch()
    assert job.wait(timeout=120) == 0, "".join(lines)[-3000:]
    holder.wait(timeout=30)
    assert (run / "go").exists(), "the job did not wait"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_the_workers_hold_ends_with_the_worker_not_with_its_forked_children(tmp_path):
    """A training worker forks (DataLoader workers): its hold on the run dir must end when it exits, even while a
    child it forked lives on, or every start after a kill would wait for those children."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; from orchestrator.run_lock import worker_hold\n"
                               f"with worker_hold({str(run)!r}):\n"
                               "    child = os.fork()\n"
                               "    if child == 0:\n        time.sleep(60); os._exit(0)\n"
                               "    print(child, flush=True); time.sleep(0.5)\n"
                               "os._exit(0)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.wait(timeout=30)
        os.kill(child, 0)  # the forked child is still alive
        assert wait_for_earlier_workers(run, timeout_s=5) < 5
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_two_local_jobs_on_one_run_dir(tmp_path):
    """What an auditor ran: two `debug=local` jobs on one run dir. The second is refused naming the first; the
    first completes with one metrics line per step."""
    run = tmp_path / "run"
    args = ["experiment=quickstart_pretrain", "debug=local", "train.max_steps=20", "train.log_every_steps=1",
            f"hydra.run.dir={run}"]
    env = {**os.environ, "BERT_ORCH_FAULT": "slow_step=0.2"}
    first = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run / ".lock").is_file() and (run / ".lock").read_text()):
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.1)
    second = run_cli(args, timeout=120)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by pid {first.pid} on " in second.stderr.strip().splitlines()[-1], second.stderr[-2000:]
    assert first.returncode == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 21)), steps


def test_default_run_dirs_differ_by_config_and_repeat_by_command(tmp_path):
    """The auditor's three jobs all landed in runs/pretrain_tiny; now each config has its own dir."""
    from orchestrator.submit import resolve_run_dir

    def run_dir(*overrides: str) -> str:
        return resolve_run_dir(["experiment=none", *overrides], str(tmp_path))[0]

    base = run_dir()
    assert Path(base).name.startswith("pretrain_tiny-") and run_dir() == base, "the same command, the same dir"
    assert run_dir("compute=cpu1", "launcher=local", "train.log_every_steps=5", "logger.project=x") == base
    others = {run_dir("optim.lr=1e-4"), run_dir("optim.lr=3e-4", "engine=zero3", "train.seed=1"),
              run_dir("data=text", "data.paths=[corpus/x.txt]")}
    assert len(others) == 3 and base not in others, others
    assert run_dir("run_name=mine") == str(tmp_path / "mine")
    assert resolve_run_dir(["experiment=quickstart_pretrain"], str(tmp_path))[0] == str(tmp_path / "quickstart_pretrain")
