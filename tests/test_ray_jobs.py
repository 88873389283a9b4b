"""Ray Jobs on a real `ray start --head` (loopback, own ports and temp dir, token auth on): the documented
`ray job submit` path, stop + resubmit resumes from the newest checkpoint, and a dead address fails fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_jsonl
from orchestrator.launch import ray_job

SMOKE = ["experiment=quickstart_pretrain", "debug=smoke", "launcher=ray", "compute=cpu1"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(ray_head):
    return ray_head


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(extra)
    return env


@pytest.mark.slow
def test_ray_job_submit_cli_runs_on_the_cluster(head, tmp_path):
    """The README's `ray job submit` command: SUCCEEDED, the summary is in the shared run dir, and the job
    joined this cluster (no nested Ray: its Train workers' CPUs were taken from this head)."""
    runs = tmp_path / "runs"
    renv = {"env_vars": {"BERT_ORCH_RUNS": str(runs), "BERT_ORCH_CACHE": os.environ["BERT_ORCH_CACHE"],
                         "WANDB_MODE": "offline"}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
           "--entrypoint-num-cpus", "0", "--runtime-env-json", json.dumps(renv), "--no-wait",
           "--", "python", "-m", "orchestrator", *SMOKE]

    # token auth: without RAY_AUTH_MODE=token the CLI is refused, and says what to set
    t0 = time.time()
    denied = subprocess.run(cmd, cwd=REPO, env={k: v for k, v in _env().items() if k != "RAY_AUTH_MODE"},
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
    assert "authentication" in (denied.stdout + denied.stderr).lower(), denied.stderr[-2000:]
    print(f"unauthenticated submit refused in {time.time() - t0:.1f}s")

    out = subprocess.run(cmd, cwd=REPO, env=_env(RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = next(ln.split("'")[1] for ln in (out.stdout + out.stderr).splitlines() if "submitted successfully" in ln)
    client = ray_job.job_client(head.dashboard_url)
    peak_used = 0.0
    deadline = time.time() + 240
    while (status := str(client.get_job_status(job_id).value)) not in ray_job.TERMINAL:
        res = ray_job.cluster_resources(head.dashboard_url)
        peak_used = max(peak_used, res.total["CPU"] - res.available["CPU"])
        assert time.time() < deadline, "job did not finish in 240s"
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    summary = json.loads((runs / "quickstart_pretrain" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["final_eval"]["eval_mlm_acc"] > 0
    assert (runs / "quickstart_pretrain" / "export" / "model.safetensors").is_file()
    # no nested Ray: the driver connected to this head's GCS, never started a local instance ...
    assert "Connecting to existing Ray cluster at address: " in logs and f":{head.gcs_port}" in logs
    assert "Started a local Ray instance" not in logs
    # ... and its Train worker (1 CPU) ran on this head's resources, with the driver itself holding none
    assert peak_used == 1.0, peak_used
    from ray.util.state import list_nodes

    assert len(list_nodes(address=head.dashboard_url)) == 1


def _submit(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bert-orch-submit"), *args], cwd=REPO, env=_env(**(env_extra or {})),
                          capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_stopped_job_resumes_from_its_checkpoint_when_resubmitted(head, tmp_path):
    runs = tmp_path / "runs"
    # enough steps that the stop (a CLI start, then the Jobs API) lands mid-run on a fast CPU too (~100 steps/s of
    # 8 rows); the smallest step (8 rows, no accumulation) and few checkpoints keep the slow CPUs' run short
    total = 600
    overrides = [*SMOKE, f"train.max_steps={total}", "train.global_batch_size=8", "train.checkpoint_every_steps=50",
                 "train.keep_last=2", "train.log_every_steps=10", f"train.eval_every_steps={total}"]
    base = ["--address", head.dashboard_url, "--runs-root", str(runs)]
    secret = "wandb-key-that-must-not-leak-0123456789"
    first = _submit([*base, "--no-wait", *overrides], env_extra={"WANDB_API_KEY": secret}, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    job_id = next(ln.split()[-1] for ln in first.stdout.splitlines() if ln.startswith("job id"))
    # what anyone with access to the Jobs API reads back: no W&B key (the submitter's shell had one)
    client = ray_job.job_client(head.dashboard_url)
    info = client.get_job_info(job_id)
    assert secret not in repr(info) and secret not in repr(client.list_jobs())
    assert info.runtime_env["env_vars"]["BERT_ORCH_RUNS"] == str(runs)
    run_dir = Path(next(ln.split(None, 2)[-1] for ln in first.stdout.splitlines() if ln.startswith("run dir")))
    assert run_dir == runs / "quickstart_pretrain"
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 300
    # the third checkpoint: keep_last=2 has removed the first, which Ray Train's own list of the run still names
    while not (ckpts / "step_00000150").is_dir():
        assert time.time() < deadline, _submit([*base, "--status", job_id]).stdout
        time.sleep(0.2)
    stop = _submit([*base, "--stop", job_id], timeout=180)
    assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr[-2000:]
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert done
    # a checkpoint caught mid-write may remain as .step_N.tmp (never under its final name); every step_N is whole
    half = [p.name for p in ckpts.iterdir() if not p.name.startswith("step_")]
    assert all(n.startswith(".step_") and n.endswith(".tmp") for n in half), half
    if (run_dir / "summary.json").exists():
        assert json.loads((run_dir / "summary.json").read_text())["status"] != "completed"
    newest = ckpts / done[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest, "the newest checkpoint is complete"
    stopped_at = int(done[-1].split("_")[1])
    assert 150 <= stopped_at < total and "step_00000050" not in done
    assert "checkpoints/step_00000050" in (run_dir / "checkpoint_manager_snapshot.json").read_text()

    again = _submit([*base, *overrides], timeout=300)  # same overrides -> same run dir -> resume
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == total
    assert summary["resumed_from"] is not None and f"{stopped_at:08d}" in str(summary["resumed_from"]), summary["resumed_from"]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == total and set(range(stopped_at + 10, total + 1, 10)) <= set(steps)
    print(f"stopped at step {stopped_at}, resumed from {summary['resumed_from']}")


_JOIN = ("import ray, sys; from orchestrator.errors import OrchestratorError\n"
         "from orchestrator.launch.ray_job import connect_ray\n"
         "try:\n    connect_ray(sys.argv[1])\nexcept OrchestratorError as exc:\n    sys.exit(f'error: {exc}')\n"
         "print('joined', int(ray.cluster_resources()['CPU']))")


@pytest.mark.slow
def test_a_job_joins_a_token_cluster_with_the_token_at_hand_and_a_wrong_one_is_one_line(head, tmp_path):
    """On a head node `ray start` leaves the token in a file; joining by address (RAY_ADDRESS=<head>:6379 python -m
    orchestrator ...) sends it without RAY_AUTH_MODE being set. A wrong token is refused in one line saying what to
    set, not with Ray's traceback."""
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    env = {k: v for k, v in _env().items() if k != "RAY_AUTH_MODE"}
    procs = [subprocess.Popen([sys.executable, "-c", _JOIN, head.gcs_address], cwd=REPO, env={**env, **extra},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ({}, {"RAY_AUTH_TOKEN_PATH": str(wrong)})]
    (ok_out, ok_err), (bad_out, bad_err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0 and ok_out.strip() == "joined 2", ok_err[-2000:]
    assert procs[1].returncode == 1 and not bad_out
    assert bad_err.strip() == (f"error: {head.gcs_address} refused the token in {wrong}: this Ray cluster uses token"
                               " authentication: export RAY_AUTH_MODE=token and make the cluster's token available as"
                               " RAY_AUTH_TOKEN, in the file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (print"
                               " it on the head node with `ray get-auth-token`)"), bad_err[-2000:]
    # the head's dashboard given where a job wants the GCS: named in one line, at once
    dash = subprocess.run([sys.executable, "-c", _JOIN, head.dashboard_url], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert dash.returncode == 1 and dash.stderr.strip().startswith(f"error: '{head.dashboard_url}' is a Ray dashboard")


@pytest.mark.slow  # two CLI processes
def test_submit_to_an_address_with_no_cluster_fails_fast_naming_it(tmp_path):
    port = ray_job.free_port()
    address = f"http://127.0.0.1:{port}"
    t0 = time.time()
    out = _submit(["--address", address, "--runs-root", str(tmp_path), *SMOKE], timeout=60)
    took = time.time() - t0
    assert out.returncode == 2 and address in out.stderr, out.stderr[-2000:]
    assert took < 15, took
    print(f"bert-orch-submit: {took:.1f}s: {out.stderr.strip().splitlines()[-1]}")

    t0 = time.time()  # the sweep launcher too
    sweep = subprocess.run(
        [sys.executable, "-m", "orchestrator", "-m", *SMOKE, "optim.lr=1e-3,2e-3", f"hydra.launcher.address={address}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    took = time.time() - t0
    assert sweep.returncode != 0 and address in sweep.stderr, sweep.stderr[-2000:]
    assert took < 20, took
    print(f"launcher: {took:.1f}s")
