"""Ray Train + DeepSpeed on 2 CPU workers (gloo): the default job learns, kill -9 resumes (ZeRO 0-3 agreement:
test_offload.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_page_links_valid_pngs, compose, progress_steps, read_jsonl
from orchestrator.driver import train
from orchestrator.run_lock import wait_for_earlier_workers

pytestmark = pytest.mark.slow

def test_default_pipeline_pretrains_then_finetunes(tmp_path, capfd, monkeypatch):
    """README command 1's job (experiment=quickstart on 2 CPU ZeRO-2 workers on Ray), run in full as the command
    runs it, starting its own local Ray: pretraining beats the most-frequent-token baseline; both fine-tunes report
    next to each other; the three stages share that one local Ray, shut down at the end."""
    import ray

    from orchestrator.launch import ray_job

    assert not ray.is_initialized(), "this test starts the local Ray itself, as README command 1 does"
    starts, own = [], []
    connect_ray, in_own_local_ray = ray_job.connect_ray, ray_job.in_own_local_ray
    monkeypatch.setattr(ray_job, "connect_ray", lambda *a, **kw: starts.append(connect_ray(*a, **kw)) or starts[-1])
    monkeypatch.setattr(ray_job, "in_own_local_ray", lambda: own.append(in_own_local_ray()) or own[-1])
    run_dir = tmp_path / "default"
    summary = train(compose(["experiment=quickstart"]), run_dir=str(run_dir), interactive=False)
    assert starts == [True, False, False] and not ray.is_initialized(), "one local Ray for 3 stages, then down"
    assert own == [True] * 3, "its own local Ray: no placement-group cleaner actor per fit"
    out = capfd.readouterr().out  # this process's output, Ray's forwarded worker lines included
    # one progress line per log step of the pretraining stage, and none of the libraries' routine lines (the
    # fine-tune from the pretrained encoder is where transformers printed its UNEXPECTED load report)
    assert progress_steps(out, 300) == list(range(10, 301, 10))
    pre = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    ev = pre["final_eval"]
    print("held-out MLM accuracy", ev["eval_mlm_acc"], "most-frequent-token baseline", ev["eval_baseline_most_frequent_acc"])
    assert pre["world_size"] == 2 and pre["steps"] == 300
    assert ev["eval_mlm_acc"] > 2 * ev["eval_baseline_most_frequent_acc"], ev
    plan = json.loads((run_dir / "pretrain" / "plan.json").read_text())
    assert plan["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert (run_dir / "pretrain" / "export" / "model.safetensors").is_file()
    ft, rnd = summary["compare"]["finetune"], summary["compare"]["finetune_random_init"]
    print("fine-tuned accuracy: pretrained", ft["eval_accuracy"], "random init", rnd["eval_accuracy"])
    ft_plan = json.loads((run_dir / "finetune" / "plan.json").read_text())
    assert ft_plan["config"]["train"]["init_from"].endswith("pretrain") and ft_plan["world_size"] == 2
    assert ft["eval_accuracy"] >= rnd["eval_accuracy"] + 0.15, "pretraining helps by 15 points or more"
    from orchestrator.report import write_report

    links = assert_page_links_valid_pngs(write_report(run_dir))
    assert {"pretrain_loss.png", "pretrain_eval.png", "finetune_eval.png", "finetune_random_init_eval.png"} <= set(links)


KILL_RUN = [
    "experiment=quickstart_pretrain", "launcher=ray", "compute=cpu2", "engine=zero2", "data.synthetic_documents=600", "task.max_seq_length=64",
    "train.max_steps=30", "train.global_batch_size=16", "train.micro_batch_size_per_gpu=8",
    "train.log_every_steps=1", "train.eval_every_steps=30", "train.checkpoint_every_steps=10", "train.keep_last=5",
    "launcher.num_cpus=2",
]


def _cli(run_dir: Path, stdout=subprocess.PIPE, fault: str = ""):
    # as in a user's shell: no RAY_AUTH_MODE (the session's token file stays named), so the local Ray's token auth
    # is the default the command chooses, without Ray's warning line
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BERT_ORCH_FAULT", "RAY_AUTH_MODE")}
    if fault:
        env["BERT_ORCH_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *KILL_RUN, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def test_ray_job_killed_with_sigkill_resumes_with_same_command(tmp_path):
    """The whole driver (and the Ray it started) is killed -9 mid-run; the same command resumes from the newest
    checkpoint, redoes the steps after it with the losses the killed run had logged (same state, same data), and
    ends as a clean run."""
    run_dir = tmp_path / "killed"
    proc = _cli(run_dir, fault="slow_step=0.2")  # time to land the kill mid-run, on any CPU
    deadline = time.time() + 600

    def logged() -> dict[int, float]:
        try:
            return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
        except (OSError, ValueError):  # not yet written, or a line being written
            return {}

    while not ((run_dir / "checkpoints" / "step_00000010").is_dir() and max(logged(), default=0) >= 12):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    at_kill = max(logged())
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray's GCS and raylet; the Ray workers have groups of their own
    proc.wait()
    # the workers outlive the raylet: each stops at its next step, without writing it (and releases the run dir)
    orphan_s = wait_for_earlier_workers(run_dir, timeout_s=60)
    before = logged()
    killed_at = max(before)
    assert killed_at - at_kill <= 2, f"the orphaned workers trained on from step {at_kill} to {killed_at}"
    assert killed_at < 30, "the kill landed after the run had finished"
    assert not (run_dir / "summary.json").exists() or json.loads((run_dir / "summary.json").read_text())["status"] != "completed"
    log = run_dir.parent / "again.log"
    with log.open("w") as fh:  # output to a file, as under nohup
        again = _cli(run_dir, stdout=fh)
        again.wait(timeout=900)
    out = log.read_text()
    assert again.returncode == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == 30
    resumed_at = int(Path(summary["resumed_from"]).name.split("_")[1])
    assert summary["steps_this_start"] == 30 - resumed_at
    # rank 0's progress, one line per log step from the resume point on, through Ray's log stream to a file
    assert progress_steps(out, 30) == list(range(resumed_at + 1, 31))
    page = run_dir / "report" / "index.html"
    assert f"report: {page}" in out, "a run ends by saying where its report is"
    assert {"loss.png", "eval.png", "lr.png"} <= set(assert_page_links_valid_pngs(page))
    after = logged()
    assert sorted(after) == list(range(1, 31))
    redone = [s for s in before if s > resumed_at]
    assert len(redone) >= 2, (resumed_at, killed_at)  # the optimizer and LR schedule of the resumed steps show too
    for s in range(1, killed_at + 1):
        assert after[s] == pytest.approx(before[s], rel=1e-6), s
    print(f"killed at step {at_kill}, workers gone {orphan_s:.1f} s later at step {killed_at}, resumed from"
          f" {resumed_at}: steps {redone} redone with the same losses")
