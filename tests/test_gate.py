"""Issue 15's gate, without a cluster: secrets never enter a job's runtime_env, fault injection is inert unless
enabled, and bert-orch-submit refuses a job the plan would refuse before contacting anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator import submit
from orchestrator.errors import OrchestratorError
from orchestrator.launch import ray_job, ray_train
from orchestrator.worker.faults import Faults
from tests.conftest import compose

SECRET = "wandb-key-that-must-not-leak-0123456789"


def test_the_wandb_key_is_never_forwarded(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    env = ray_job.forwarded_env()
    assert "WANDB_API_KEY" not in env and env["WANDB_MODE"] == "offline"
    from orchestrator.driver import make_plan

    plan = make_plan(compose(["launcher=ray"]), run_dir=str(tmp_path / "r"), prepare=False)[0]
    assert SECRET not in repr(ray_train.worker_env(plan))
    assert SECRET not in repr(ray_train.trainer_configs(plan)[1])  # RunConfig: what Ray Train's state shows
    with pytest.raises(OrchestratorError, match="WANDB_API_KEY would be visible"):
        ray_job.runtime_env(None, {"WANDB_API_KEY": SECRET})


def test_fault_injection_is_inert_unless_enabled(monkeypatch, tmp_path):
    monkeypatch.setenv("BERT_ORCH_FAULT", "nan_loss_at=3;slow_step=2")
    monkeypatch.delenv("BERT_ORCH_FAULTS_ENABLED")
    off = Faults.from_env(tmp_path, 0)
    assert off.slow == 0.0 and not off.nan_once
    assert "BERT_ORCH_FAULT" not in ray_job.forwarded_env()  # and never sent with a Ray Job
    monkeypatch.setenv("BERT_ORCH_FAULTS_ENABLED", "1")
    on = Faults.from_env(tmp_path, 0)
    assert on.slow == 2.0 and on.nan_once == {3}


@pytest.mark.parametrize("overrides,key", [
    (["experiment=quickstart_pretrain", "optim.lr=abc", "train.max_steps=-3"], "optim.lr"),
    (["experiment=quickstart_pretrain", "train.max_steps=-3"], "train.max_steps"),
    (["experiment=quickstart_pretrain", "optim.lr=nan"], "optim.lr"),
    (["experiment=quickstart_pretrain", "train.global_batch_size=100"], "train.global_batch_size"),
    (["engine.zero_stage=7"], "engine.zero_stage"),  # the default pipeline: every stage is checked
    (["optim.lr=0.1"], "optim.lr"),  # a job-level override on the pipeline
])
def test_submit_refuses_a_bad_job_before_contacting_the_cluster(overrides, key, tmp_path, capsys):
    dead = f"http://127.0.0.1:{ray_job.free_port()}"  # nothing listens: a refusal naming it would mean we tried
    code = submit.main(["--address", dead, "--runs-root", str(tmp_path), *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert f"'{key}'" in err[0] and dead not in err[0], err


def test_a_malformed_address_is_one_line(tmp_path, capsys):
    code = submit.main(["--address", "http://[::1", "--runs-root", str(tmp_path), "experiment=quickstart_pretrain"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "cannot parse Ray address 'http://[::1'" in err[0], err


def test_squad2_data_under_version_1_is_refused_before_any_step(tmp_path):
    """It used to train until the first evaluation and die in the metric (max() of an empty sequence)."""
    from orchestrator.data.synthetic_tasks import write_synthetic_squad
    from orchestrator.driver import make_plan
    from orchestrator.errors import DataError

    paths = write_synthetic_squad(tmp_path, n_train=10, n_dev=10, seed=1, version_2=True)
    train_file, eval_file = paths["train"], paths["dev"]
    cfg = compose(["experiment=none", "task=qa", f"task.train_file={train_file}", f"task.eval_file={eval_file}",
                   "task.version_2=false", "task.max_seq_length=256", "launcher=local", "compute=cpu1", "engine=torch",
                   "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size_per_gpu=4"])
    with pytest.raises(DataError, match=r"has no answer \(SQuAD 2.0\) but task.version_2=false"):
        make_plan(cfg, str(tmp_path / "run"), prepare=True)


@pytest.mark.parametrize("key", ["task.train_file", "task.eval_file", "train.init_from"])
def test_missing_inputs_are_refused_when_only_planning(key, tmp_path):
    from orchestrator.driver import make_plan

    real = tmp_path / "real.tsv"
    real.write_text("sentence\tlabel\na b\t1\n")
    files = {"task.train_file": str(real), "task.eval_file": str(real)}
    files[key] = str(tmp_path / "missing")
    cfg = compose(["experiment=none", "task=classify", *(f"{k}={v}" for k, v in files.items() if k != "train.init_from"),
                   *([f"train.init_from={files['train.init_from']}"] if key == "train.init_from" else []),
                   "launcher=local", "compute=cpu1", "plan_only=true"])
    with pytest.raises(OrchestratorError) as ei:
        make_plan(cfg, str(tmp_path / "run"), prepare=False)
    assert str(tmp_path / "missing") in str(ei.value)


def test_a_cpu_job_that_cannot_fit_the_node_is_refused(tmp_path):
    """A 100,000-layer model on CPU used to be planned (and die in the worker)."""
    from orchestrator.driver import make_plan
    from orchestrator.errors import ConfigError

    big = ["experiment=quickstart_pretrain", "model.num_hidden_layers=100000", "plan_only=true"]
    with pytest.raises(ConfigError) as ei:
        make_plan(compose(big), str(tmp_path / "a"), prepare=False)
    assert ei.value.key == "compute.host_memory_gib" and "2 CPU worker(s)" in str(ei.value)
    plan = make_plan(compose([*big, "compute.host_memory_gib=8192"]), str(tmp_path / "b"), prepare=False)[0]
    assert plan.memory["total_gib"] * 2 < 8192
    remote = make_plan(compose([*big, "launcher.address=ray://head:10001"]), str(tmp_path / "c"), prepare=False)[0]
    assert remote.world_size == 2, "a cluster's node memory is unknown here: not checked"


def test_run_name_cannot_leave_runs_root(tmp_path):
    from orchestrator.driver import make_plan
    from orchestrator.errors import ConfigError

    for bad in ("../../x", "a/b", ".."):
        with pytest.raises(ConfigError, match="single directory name inside runs_root"):
            make_plan(compose(["experiment=quickstart_pretrain", f"run_name={bad}", "plan_only=true"]),
                      str(tmp_path / "r"), prepare=False)


def test_paths_on_the_command_line_are_one_line_and_leave_no_stray_dir(tmp_path):
    from tests.conftest import run_cli

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "c.txt").write_text("some text here.\n")
    prep = subprocess.run([sys.executable, "-m", "orchestrator.prepare", f"sources=[{tmp_path / 'c.txt'}]",
                           f"output_dir={a_file}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    err = [line for line in prep.stderr.splitlines() if line.strip()]
    assert prep.returncode == 2 and err == [f"error: config key 'output_dir': cannot write to '{a_file}': File exists"], prep.stderr
    quoted = run_cli(["experiment=quickstart_pretrain", "plan_only=true", f"hydra.run.dir='{tmp_path}/a b/c'"],
                     cwd=tmp_path, timeout=120)
    assert quoted.returncode == 0, quoted.stderr[-2000:]
    assert (tmp_path / "a b" / "c" / "plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b", "a_file", "c.txt"], "no directory named \"'\""
