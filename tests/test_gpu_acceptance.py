"""bench/gpu_acceptance.py, its CPU side: step selection by GPU count, the commands it would run (composed into
real plans), peak lookup, MFU arithmetic, pass/fail evaluation of run dirs, the JSON report, the no-GPU exit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose

_spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "bench" / "gpu_acceptance.py")
ga = importlib.util.module_from_spec(_spec)
sys.modules["gpu_acceptance"] = ga  # dataclasses resolve annotations through the module
_spec.loader.exec_module(ga)


def _facts(n: int, name: str = "NVIDIA A100-SXM4-80GB", major: int = 8, mem: float = 79.3, cpus: int = 32,
           nvlink: bool | None = True) -> dict:
    return {
        "torch_cuda": "12.4", "nccl": "2.21.5", "cudnn": 90100, "driver": "550.54.15",
        "devices": [{"index": i, "name": name, "gpu_key": ga.gpu_key(name), "capability": f"{major}.0",
                     "bf16_native": major >= 8, "memory_gib": mem} for i in range(n)],
        "nvlink_all": nvlink if n > 1 else None, "cpu_count": cpus, "versions": {}, "cuda_visible_devices": None,
    }


# ------------------------------------------------------------------------------------------- peaks, MFU


@pytest.mark.parametrize("name,key,bf16", [
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA H100 80GB HBM3", "H100", 989.0),
    ("NVIDIA H100 PCIe", "H100_PCIE", 756.0),
    ("NVIDIA H100 NVL", "H100_NVL", 835.0),
    ("NVIDIA GH200 480GB", "GH200", 989.0),
    ("NVIDIA H200", "H200", 989.0),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L40", "L40", 181.0),
    ("NVIDIA A10", "A10", 125.0),
    ("NVIDIA A10G", "A10G", 70.0),
    ("NVIDIA A30", "A30", 165.0),
    ("NVIDIA RTX A6000", "RTX_A6000", 154.8),
    ("NVIDIA GeForce RTX 4090", "RTX_4090", 165.2),
    ("Tesla V100-SXM2-16GB", "V100", None),  # no bf16 tensor cores
    ("Tesla T4", "T4", None),
    ("NVIDIA RTX 6000 Ada Generation", None, None),  # not in the table: MFU null
])
def test_device_name_to_peak(name, key, bf16):
    assert ga.gpu_key(name) == key
    assert ga.peak_tflops(name, "bf16") == bf16


def test_pre_ampere_gpus_have_fp16_peaks():
    assert ga.peak_tflops("Tesla V100-SXM2-16GB", "fp16") == 125.0
    assert ga.peak_tflops("Tesla T4", "fp16") == 65.0


def test_mfu_arithmetic():
    # 200k tokens/s on one A100 at 5.245e8 FLOPs/token = 1.049e14 FLOP/s = 33.6% of 312 TFLOP/s
    assert ga.mfu(200_000, 5.245e8, 1, 312.0) == pytest.approx(200_000 * 5.245e8 / 312e12)
    assert ga.mfu(200_000, 5.245e8, 1, 312.0) == pytest.approx(0.3362, abs=1e-4)
    # the job's tokens/s is spread over its GPUs
    assert ga.mfu(400_000, 5.245e8, 2, 312.0) == pytest.approx(ga.mfu(200_000, 5.245e8, 1, 312.0))
    for missing in ((None, 5e8, 1, 312.0), (1e5, None, 1, 312.0), (1e5, 5e8, 1, None), (0.0, 5e8, 1, 312.0)):
        assert ga.mfu(*missing) is None


def test_no_gpu_message_says_why():
    cpu = ga.no_gpu_message("2.13.0+cpu", None)
    assert "\n" not in cpu and "CPU-only build" in cpu and "at least one NVIDIA GPU" in cpu
    cuda = ga.no_gpu_message("2.13.0+cu124", "12.4")
    assert "CUDA 12.4 build" in cuda and "nvidia-smi" in cuda


# ------------------------------------------------------------------------------------------- steps


def _by_name(specs):
    return {s.name: s for s in specs}


def test_one_gpu_runs_facts_local_and_ray_and_skips_what_needs_two(tmp_path):
    specs = ga.plan_steps(_facts(1), tmp_path)
    assert [s.name for s in specs] == ["facts", "doctor", "local_bf16", "ray_1gpu_zero2", "ray_2gpu_zero2_kill"]
    s = _by_name(specs)
    assert {n for n, x in s.items() if x.skip_reason} == {"doctor", "ray_2gpu_zero2_kill"}
    assert "2+ GPUs (found 1)" in s["doctor"].skip_reason and "2+ GPUs" in s["ray_2gpu_zero2_kill"].skip_reason
    assert s["local_bf16"].gpus == 1 and s["ray_1gpu_zero2"].gpus == 1
    # sized to finish fast on one GPU: under 1M tokens per training step (seconds of compute even on an L4)
    for x in (s["local_bf16"], s["ray_1gpu_zero2"]):
        assert x.expect["steps"] * ga.MICRO_BATCH * 128 <= 1_000_000


@pytest.mark.parametrize("n,nvlink,workers,network", [
    (2, True, 2, "nvlink_single_node"), (2, False, 2, "tcp"), (4, None, 4, "tcp"), (8, True, 8, "nvlink_single_node"),
    (16, True, 8, "nvlink_single_node"),
])
def test_two_or_more_gpus_run_everything(tmp_path, n, nvlink, workers, network):
    from orchestrator.cluster.network import NETWORK_PROFILES

    s = _by_name(ga.plan_steps(_facts(n, nvlink=nvlink), tmp_path))
    assert not any(x.skip_reason for x in s.values())
    d = s["doctor"]
    assert d.gpus == workers and d.expect == {"world_size": workers, "network": network}
    assert network in NETWORK_PROFILES
    a = d.argv
    assert a[1:3] == ["-m", "orchestrator.doctor"] and "--use-gpu" in a
    assert a[a.index("--num-workers") + 1] == str(workers) and a[a.index("--network") + 1] == network
    assert a[a.index("--json-out") + 1] == str(tmp_path / "doctor.json")
    k = s["ray_2gpu_zero2_kill"]
    assert k.gpus == 2 and k.env == {"BERT_ORCH_FAULT": "kill_rank=1@step=30"}
    assert k.expect["resumed_from_step"] == 20 and k.expect["fault"] == "kill_rank=1@step=30"


def test_pre_ampere_gpus_train_in_fp16(tmp_path):
    s = _by_name(ga.plan_steps(_facts(2, name="Tesla V100-SXM2-32GB", major=7, mem=31.7), tmp_path))
    assert "local_fp16" in s and "local_bf16" not in s
    for x in s.values():
        if x.kind == "train":
            assert "engine.fp16=true" in x.argv and "engine.bf16=false" in x.argv and x.expect["precision"] == "fp16"


def _overrides(spec) -> list[str]:
    argv = spec.argv
    assert argv[0] == sys.executable and argv[1:3] == ["-m", "orchestrator"]
    return [a for a in argv[3:] if not a.startswith("hydra.run.dir=")]


@pytest.mark.parametrize("n", [1, 2])
def test_training_commands_compose_into_the_intended_plans(tmp_path, n):
    """The exact overrides each training step would run, composed and planned here (no data, no GPU needed)."""
    from orchestrator.driver import make_plan

    facts = _facts(n, name="NVIDIA L4", mem=22.0, cpus=8)
    specs = [s for s in ga.plan_steps(facts, tmp_path / "out") if s.kind == "train" and not s.skip_reason]
    assert [s.name for s in specs] == ["local_bf16", "ray_1gpu_zero2"] + (["ray_2gpu_zero2_kill"] if n >= 2 else [])
    for s in specs:
        assert s.argv[-1] == f"hydra.run.dir={tmp_path / 'out' / s.name}" and s.run_dir == str(tmp_path / "out" / s.name)
        plan, _ = make_plan(compose(_overrides(s)), run_dir=str(tmp_path / "plans" / s.name), prepare=False)
        j = plan.job
        assert (j.model.hidden_size, j.model.num_hidden_layers, j.model.num_attention_heads) == (768, 12, 12)
        assert plan.max_seq_length == 128 and j.task.name == "pretrain" and j.data.source == "synthetic"
        assert j.engine.backend == "deepspeed" and j.engine.bf16 is True and not j.engine.fp16
        assert j.compute.use_gpu and j.compute.gpus_per_node == s.gpus and plan.world_size == s.expect["world_size"]
        assert j.compute.gpu_type == "L4" and j.compute.gpu_memory_gib == 22.0
        assert plan.micro_batch_size_per_gpu == 32 and plan.grad_accum_steps == 1
        assert plan.total_steps == s.expect["steps"] and j.train.log_every_steps == ga.LOG_EVERY
        assert plan.warmup_steps == ga.WARMUP_STEPS and j.logger.name == "none"
        if s.name.startswith("local"):
            assert j.launcher.name == "local" and j.engine.zero_stage == 1 and plan.total_steps == 200
        else:
            assert j.launcher.name == "ray" and j.engine.zero_stage == 2
            assert j.launcher.num_cpus >= s.gpus * j.compute.cpus_per_worker  # the workers fit the local Ray
        if s.name == "ray_2gpu_zero2_kill":
            assert j.train.checkpoint_every_steps == 20 and j.launcher.max_failures == 2 and j.train.keep_last == 3
            assert plan.global_batch_size == 64
        elif s.kind == "train":
            assert j.launcher.max_failures == 0 and j.train.checkpoint_every_steps == s.expect["steps"]


def test_cpus_per_worker_fits_the_box():
    assert ga.cpus_per_worker(1, 32) == 8 and ga.cpus_per_worker(2, 8) == 3
    assert ga.cpus_per_worker(2, 2) == 1 and ga.cpus_per_worker(1, 1) == 1


# ------------------------------------------------------------------------------------------- evaluation


def _train_window(step: int, tps: float) -> dict:
    return {"step": step, "loss": 7.0 - step / 100, "tokens_per_s": tps, "time": 1000.0 + step}


def test_steady_tokens_per_s_skips_warmup_and_the_window_after_a_restart():
    recs = [_train_window(10, 1.0), _train_window(20, 2.0), _train_window(30, 100.0), _train_window(40, 300.0)]
    assert ga.steady_tokens_per_s(recs, warmup_steps=20) == pytest.approx(2 / (1 / 100 + 1 / 300))  # 150
    resumed = [*recs[:2], {"event": "resume", "step": 20}, _train_window(30, 5.0), _train_window(40, 100.0),
               {"step": 40, "eval_mlm_loss": 6.0}, _train_window(50, 300.0)]
    assert ga.steady_tokens_per_s(resumed, warmup_steps=20) == pytest.approx(150.0)
    assert ga.steady_tokens_per_s(recs[:2], warmup_steps=20) is None


def _fake_run(spec, steps_logged, resumed_from="step_00000020", fault_fired=True, status="completed", loss=6.5):
    run = Path(spec.run_dir)
    (run / ".faults").mkdir(parents=True, exist_ok=True)
    recs = [_train_window(s, 90_000.0 if s <= 20 else 100_000.0) for s in steps_logged]
    if spec.expect.get("resumed_from_step"):
        recs.insert(2, {"event": "resume", "step": 20})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "plan.json").write_text(json.dumps({"cost": {"flops_per_token": 5.2e8}, "dataset": {"vocab_size": 557}}))
    (run / "summary.json").write_text(json.dumps({
        "status": status, "steps": steps_logged[-1], "world_size": spec.expect["world_size"],
        "final_train": {"loss": loss}, "resumed_from": str(run / "checkpoints" / resumed_from) if resumed_from else None}))
    if fault_fired and spec.expect.get("fault"):
        (run / ".faults" / spec.expect["fault"]).write_text(json.dumps({"time": 1.0, "rank": 1, "step": 30}))


def test_evaluate_train_kill_step(tmp_path):
    spec = _by_name(ga.plan_steps(_facts(2), tmp_path))["ray_2gpu_zero2_kill"]
    steps = list(range(10, 61, 10))
    _fake_run(spec, steps)
    res = ga.evaluate_train(spec, 0, "NVIDIA A100-SXM4-80GB")
    assert res["status"] == "pass", res["failures"]
    # windows 40, 50, 60 (30 is the first after the restart, 10-20 are warm-up): 100k tokens/s over 2 GPUs
    assert res["tokens_per_s"] == pytest.approx(100_000.0) and res["tokens_per_s_per_gpu"] == pytest.approx(50_000.0)
    assert res["peak_tflops_per_gpu"] == 312.0 and res["flops_per_token"] == 5.2e8
    assert res["mfu"] == pytest.approx(50_000 * 5.2e8 / 312e12)
    assert res["killed_after_step"] == 30 and res["resumed_from"].endswith("step_00000020")
    json.dumps(res)

    assert ga.evaluate_train(spec, 1, "NVIDIA A100-SXM4-80GB")["failures"] == ["exit status 1"]
    assert ga.evaluate_train(spec, None, "x")["failures"][0] == "timed out"
    assert ga.evaluate_train(spec, 0, "NVIDIA RTX 6000 Ada Generation")["mfu"] is None  # unknown GPU: null MFU
    (Path(spec.run_dir) / ".faults" / spec.expect["fault"]).unlink()
    assert any("never fired" in f for f in ga.evaluate_train(spec, 0, "x")["failures"])
    _fake_run(spec, steps, resumed_from=None)
    assert any("resumed_from None" in f for f in ga.evaluate_train(spec, 0, "x")["failures"])
    _fake_run(spec, steps, loss=float("nan"))
    assert any("not finite" in f for f in ga.evaluate_train(spec, 0, "x")["failures"])
    _fake_run(spec, [10, 20, 30, 40])
    fails = ga.evaluate_train(spec, 0, "x")["failures"]
    assert any("40 steps != 60" in f for f in fails) and any("logged steps" in f for f in fails)


def test_evaluate_train_missing_run_dir_fails(tmp_path):
    spec = _by_name(ga.plan_steps(_facts(1), tmp_path))["local_bf16"]
    res = ga.evaluate_train(spec, 1, "NVIDIA L4")
    assert res["status"] == "fail" and res["failures"][0] == "exit status 1" and res["tokens_per_s"] is None


def test_evaluate_doctor(tmp_path):
    spec = _by_name(ga.plan_steps(_facts(2), tmp_path))["doctor"]
    out = tmp_path / "doctor.json"
    good = {"world_size": 2, "backend": "nccl", "failures": [], "notes": ["n"],
            "all_reduce": [{"size_bytes": 8 << 20, "busbw_gbps": 80.0}, {"size_bytes": 256 << 20, "busbw_gbps": 210.0}]}
    out.write_text(json.dumps(good))
    res = ga.evaluate_doctor(spec, 0, out)
    assert res["status"] == "pass" and res["largest_busbw_gbps"] == 210.0 and res["backend"] == "nccl"
    out.write_text(json.dumps({**good, "failures": ["bus bandwidth 20.0 GB/s is below 25%"]}))
    res = ga.evaluate_doctor(spec, 1, out)
    assert res["status"] == "fail" and res["failures"] == ["doctor exit status 1", "bus bandwidth 20.0 GB/s is below 25%"]
    out.unlink()
    assert ga.evaluate_doctor(spec, 0, out)["failures"] == [f"no doctor JSON at {out}"]


# ------------------------------------------------------------------------------------------- report


def test_skipped_and_facts_steps_run_nothing(tmp_path):
    facts = _facts(1)
    results = ga.run_all(ga.plan_steps(facts, tmp_path / "out")[:2], facts, tmp_path / "out")
    assert results == [{"name": "facts", "kind": "facts", "gpus": 0, "status": "pass", "seconds": 0.0, "failures": []},
                       {"name": "doctor", "kind": "doctor", "gpus": 1, "status": "skipped",
                        "reason": "the doctor's all-reduce needs 2+ GPUs (found 1)"}]
    assert not (tmp_path / "out").exists()


def test_report_is_one_json_with_a_verdict(tmp_path):
    facts = _facts(1, name="NVIDIA L4")
    results = [{"name": "facts", "status": "pass"}, {"name": "doctor", "status": "skipped", "reason": "r"},
               {"name": "local_bf16", "status": "pass", "tokens_per_s": 60_000.0, "mfu": 0.26}]
    rep = ga.assemble_report(facts, results, time.time() - 5, tmp_path)
    assert rep["gpu_acceptance"] == "pass" and rep["failed_steps"] == [] and rep["gpus"] == 1
    assert rep["device"] == "NVIDIA L4" and rep["precision"] == "bf16" and rep["total_seconds"] >= 5
    assert list(rep["steps"]) == ["facts", "doctor", "local_bf16"] and rep["steps"]["local_bf16"]["mfu"] == 0.26
    assert json.loads(json.dumps(rep)) == rep
    rep = ga.assemble_report(facts, [*results, {"name": "ray_1gpu_zero2", "status": "fail"}], time.time(), tmp_path)
    assert rep["gpu_acceptance"] == "fail" and rep["failed_steps"] == ["ray_1gpu_zero2"]
    assert ga.assemble_report(facts, [{"name": "doctor", "status": "skipped"}], time.time(), tmp_path)["gpu_acceptance"] == "fail"


@pytest.mark.slow  # the script's own process (imports torch)
def test_without_a_gpu_it_exits_with_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "out"
    t0 = time.time()
    for extra in ([], ["--dry-run"]):
        p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_acceptance.py"), "--out-dir", str(out), *extra],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == ga.NO_GPU_EXIT == 3
        assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert p.stderr.startswith("gpu_acceptance: no CUDA GPU visible to torch")
    assert not out.exists(), "nothing ran, nothing was written"
    print(f"\n[no-gpu exit] two runs in {time.time() - t0:.1f}s")


@pytest.mark.slow  # a real 30-step training job (~16 s)
def test_run_step_runs_a_real_job_and_judges_its_run_dir(tmp_path):
    """run_step's subprocess, log and env handling and evaluate_train on the files a real run writes (a 30-step
    smoke job on the CPU; the GPU steps differ only in their overrides, composed above)."""
    out = tmp_path / "out"
    out.mkdir()
    run_dir = out / "cpu_smoke"
    run_dir.mkdir()
    (run_dir / "stale.txt").write_text("an earlier run's dir is removed first")
    spec = ga.StepSpec(
        "cpu_smoke", "train", gpus=1, run_dir=str(run_dir), timeout_s=600,
        argv=[sys.executable, "-m", "orchestrator", "experiment=none", "debug=smoke", "launcher=local", "compute=cpu1",
              "engine=torch", "engine.bf16=false", "train.max_steps=30", "train.log_every_steps=10",
              "train.eval_every_steps=30", "train.checkpoint_every_steps=30", f"hydra.run.dir={run_dir}"],
        expect={"world_size": 1, "steps": 30, "precision": "bf16"})
    res = ga.run_step(spec, _facts(1, name="cpu (test)"), out)
    print(f"\n[run_step cpu smoke] {res['seconds']}s, {res['tokens_per_s']:.0f} tokens/s")
    assert res["status"] == "pass", (res, Path(res["log"]).read_text()[-3000:])
    assert res["steps"] == 30 and res["world_size"] == 1 and res["tokens_per_s"] > 0 and res["final_loss"] > 0
    assert res["flops_per_token"] > 0 and res["vocab_size"] > 0
    assert res["mfu"] is None and res["peak_tflops_per_gpu"] is None  # not a GPU of the table
    assert not (run_dir / "stale.txt").exists()
    assert Path(res["log"]).read_text().startswith(" ".join(spec.argv))
    failing = ga.StepSpec("cpu_bad", "train", gpus=1, run_dir=str(out / "cpu_bad"), timeout_s=120,
                          argv=[*spec.argv[:-1], "train.global_batch_size=7", f"hydra.run.dir={out / 'cpu_bad'}"],
                          expect=spec.expect)
    res = ga.run_step(failing, _facts(1, name="cpu (test)"), out)
    assert res["status"] == "fail" and res["failures"][0] == "exit status 2", res
