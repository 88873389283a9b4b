"""ZeRO stages 0-3 follow one loss curve; ZeRO-Offload for real: optimizer (ZeRO-2) and parameter + optimizer (ZeRO-3)
offload train on 2 CPU workers with torch's fused AdamW on the host, follow the same curve as the job without
offload, skip a NaN step and resume after a kill.

The jobs without a kill (ZeRO 0-3, ZeRO-2 + offload) train one after another in ONE Ray Train worker group (one
group start, not five), each with a NaN loss at step 3; the killed ZeRO-3 offload job runs alone (Ray restarts
its group) and is compared with that group's ZeRO-3 curve.

No job builds a C++ op: offload steps with torch's fused AdamW, not DeepSpeedCPUAdam (a g++ JIT build of 80-240 s
on 2 cores, which these tests used to wait for)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compose, read_jsonl, run_cli, train_in_one_worker_group
from orchestrator.driver import train

RUN = [
    "launcher=ray", "compute=cpu2", "data.synthetic_documents=600", "task.max_seq_length=64",
    "train.max_steps=12", "train.global_batch_size=16", "train.micro_batch_size_per_gpu=4",
    "train.log_every_steps=1", "train.eval_every_steps=12", "train.checkpoint_every_steps=6",
    "optim.lr=2e-3", "schedule.warmup_steps=2",
]
NAN_AT = 3
GROUP = {"zero0": ["engine=zero0"], "zero1": ["engine=zero1"], "zero2": ["engine=zero2"], "zero3": ["engine=zero3"],
         "zero2_offload": ["engine=zero2", "engine.offload_optimizer=true"]}
# Offload changes where the optimizer runs (fused AdamW on the host instead of foreach AdamW), not the math.
# Measured max relative loss difference, offload vs not, over the 12 steps: 7.0e-8 (ZeRO-2, 1.3e-7 with the NaN
# step) and 6.4e-8 (ZeRO-3, across the kill and resume): float32 rounding. 1e-5 leaves a margin of ~75x.
REL_TOL = 1e-5


def _records(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def _curve(run_dir: Path) -> dict[int, float | None]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _max_rel_diff(ref: dict[int, float | None], other: dict[int, float | None]) -> float:
    assert sorted(ref) == sorted(other) == list(range(1, 13))
    assert [s for s, v in ref.items() if v is None] == [s for s, v in other.items() if v is None]
    return max(abs(other[s] - v) / abs(v) for s, v in ref.items() if v is not None)


def _zero_offload(run_dir: Path) -> dict:
    return json.loads((run_dir / "plan.json").read_text())["deepspeed_config"]["zero_optimization"]


@pytest.mark.slow  # a DeepSpeed job in a subprocess (its imports are what is checked)
def test_a_zero2_job_imports_deepspeeds_muon_kernels_but_not_torchinductor(tmp_path):
    """ZeRO's partitioning code imports DeepSpeed's Muon module, whose torch.compile decorators would import
    TorchInductor (1.7 CPU-s per worker) in a job that compiles nothing: the engine defers them to their first
    call. The same job's import log shows the Muon module and no Inductor."""
    out = run_cli(["experiment=quickstart_pretrain", "launcher=local", "compute=cpu1", "engine=zero2",
                   "train.max_steps=2", "train.eval_every_steps=2", "train.checkpoint_every_steps=2",
                   "data.synthetic_documents=100", "task.max_seq_length=32", f"hydra.run.dir={tmp_path / 'z2'}"],
                  env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "deepspeed.runtime.zero.muon.original_muon" in imported and "deepspeed.runtime.zero.stage_1_and_2" in imported
    assert not {m for m in imported if m.startswith("torch._inductor.compile_fx")}


def test_deferred_compile_compiles_once_on_the_first_call(monkeypatch):
    """What DeepSpeed's `compiler.compile()` returns after `defer_deepspeed_compile`: torch.compile is applied to
    the function at its first call, once, and the call goes to the compiled function."""
    from deepspeed.runtime import compiler

    from orchestrator.worker.engine import defer_deepspeed_compile

    monkeypatch.setattr(compiler, "compile", compiler.compile)  # restored after the test
    calls = []

    def fake_torch_compile(fn):
        calls.append(fn)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_torch_compile)
    defer_deepspeed_compile()
    defer_deepspeed_compile()  # idempotent

    @compiler.compile()
    def double(x):
        """doubles"""
        return 2 * x

    assert calls == [] and double.__doc__ == "doubles" and double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert len(calls) == 1


# ---------------------------------------------------------------- the optimizer itself (one process)


def test_the_host_optimizer_of_offload_is_torchs_fused_adamw_with_the_same_groups_and_update():
    """The offload optimizer is torch's fused AdamW (no C++ op to build), keeps the BERT param groups (no decay on
    biases/LayerNorm) and lr/betas/eps, and its update is AdamW's (decoupled weight decay), not Adam with an L2
    term; the plan's DeepSpeed config lets DeepSpeed take it."""
    from types import SimpleNamespace

    from orchestrator.worker.engine import build_optimizer, param_groups, steps_on_host

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    eng = lambda o, p: SimpleNamespace(offload_optimizer=o, offload_param=p)  # noqa: E731
    assert steps_on_host(eng(True, False), cpu) and steps_on_host(eng(True, False), cuda)
    assert steps_on_host(eng(True, True), cuda) and steps_on_host(eng(False, True), cpu)
    assert not steps_on_host(eng(False, True), cuda), "param offload alone keeps the fp32 master on the GPU"
    assert not steps_on_host(eng(False, False), cpu)

    # big lr and weight decay, so that a lost decay or an L2-style decay shows far above float rounding
    optim = SimpleNamespace(name="adamw", lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.98, eps=1e-6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    ours = build_optimizer(model, optim, on_host=True)
    assert type(ours) is torch.optim.AdamW and ours.defaults["fused"]
    assert build_optimizer(copy.deepcopy(model), optim, device=cpu).defaults["fused"], "a CPU worker's: fused too"
    on_gpu = build_optimizer(copy.deepcopy(model), optim, device=cuda).defaults  # built, never stepped, here
    assert on_gpu["foreach"] and not on_gpu["fused"], "a GPU's stays foreach"
    # the reference: torch's single-tensor AdamW over the same groups
    ref = torch.optim.AdamW(param_groups(twin, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                            eps=optim.eps, foreach=False, fused=False)
    for g, rg in zip(ours.param_groups, ref.param_groups, strict=True):
        assert [p.shape for p in g["params"]] == [p.shape for p in rg["params"]]
        assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-2, (0.9, 0.98), 1e-6, rg["weight_decay"])
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        x = torch.randn(32, 8)
        for m, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start))
    assert moved > 1e-2, "the steps moved the weights"
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 2 Ray workers


@pytest.fixture(scope="module")
def group_runs(ray_cluster, tmp_path_factory):
    """The five jobs without a kill, each with a NaN loss at step 3, trained in one worker group."""
    root = tmp_path_factory.mktemp("zero")
    ops = root / "torch_extensions"  # the workers' C++ op cache: offload builds none
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BERT_ORCH_FAULT", f"nan_loss_at={NAN_AT}")
        mp.setenv("TORCH_EXTENSIONS_DIR", str(ops))
        summaries = train_in_one_worker_group([(compose([*RUN, *extra]), root / name) for name, extra in GROUP.items()])
    assert not ops.exists() or not any(ops.iterdir()), f"a ZeRO job JIT-built {sorted(p.name for p in ops.iterdir())}"
    return {name: (root / name, summary) for name, summary in zip(GROUP, summaries)}


@pytest.mark.slow
def test_zero_stages_0_to_3_give_matching_loss_curves(group_runs):
    """ZeRO changes memory, not math: the same seeded job under stages 0-3 follows the same loss curve, and each
    skips the NaN step the same way (ZeRO-0 through our guard, 1-3 through DeepSpeed's own overflow check)."""
    runs = group_runs
    curves = {}
    for stage in range(4):
        run_dir, summary = runs[f"zero{stage}"]
        assert summary["world_size"] == 2 and summary["grad_accum_steps"] == 2 and summary["skipped_steps"] == 1
        assert json.loads((run_dir / "plan.json").read_text())["deepspeed_config"]["zero_optimization"]["stage"] == stage
        curves[stage] = _curve(run_dir)
    assert curves[0][12] < curves[0][1] - 0.5, "the curve moves, so agreement is not trivial"
    for stage in (1, 2, 3):
        rel = _max_rel_diff(curves[0], curves[stage])
        assert rel < 2e-3, f"ZeRO-{stage} vs ZeRO-0: {rel:.2e}"


@pytest.mark.slow
def test_zero2_offload_optimizer_matches_no_offload_and_skips_nan_step(group_runs):
    """ZeRO-2 with the optimizer offloaded vs the same job without, both with a NaN loss at step 3: both skip that
    step (no update, no LR tick: ZeRO-Offload's host-side overflow check) and follow the same curve."""
    (ref_dir, _), (off_dir, summary) = group_runs["zero2"], group_runs["zero2_offload"]
    assert _zero_offload(off_dir)["offload_optimizer"]["device"] == "cpu" and "offload_optimizer" not in _zero_offload(ref_dir)
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["skipped_steps"] == 1
    recs = {r["step"]: r for r in _records(off_dir) if "loss" in r}
    assert [r["step"] for r in _records(off_dir) if r.get("event") == "skipped_step"] == [NAN_AT]
    assert recs[3]["lr"] == recs[2]["lr"] and recs[4]["lr"] < recs[3]["lr"], "the skipped step did not tick the LR"
    ref, off = _curve(ref_dir), _curve(off_dir)
    assert off[12] < off[1] - 0.5, "the curve moves, so agreement is not trivial"
    rel = _max_rel_diff(ref, off)
    print(f"\n[zero2 offload] loss {off[1]:.4f} -> {off[12]:.4f}; max rel diff vs no offload {rel:.2e}")
    assert rel < REL_TOL


@pytest.mark.slow
def test_zero3_offload_killed_and_resumed_matches_no_offload(group_runs, tmp_path, monkeypatch):
    """ZeRO-3 with parameters and optimizer offloaded; rank 1 SIGKILLs itself after step 8, the group restarts from
    the step-6 checkpoint and finishes. The resumed steps still follow the no-offload curve, which they do only if
    the checkpoint carried the CPU optimizer's moments and step counts."""
    ref_dir, off_dir = group_runs["zero3"][0], tmp_path / "zero3_offload"
    monkeypatch.setenv("BERT_ORCH_FAULT", f"nan_loss_at={NAN_AT};kill_rank=1@step=8")
    summary = train(compose([*RUN, "engine=zero3", "engine.offload_param=true", "engine.offload_optimizer=true"]),
                    run_dir=str(off_dir), interactive=False)
    zero = _zero_offload(off_dir)
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    assert json.loads((off_dir / ".faults" / "kill_rank=1@step=8").read_text())["step"] == 8, "the kill fired"
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert summary["resumed_from"].endswith("step_00000006") and summary["steps_this_start"] == 6
    resume = [r for r in _records(off_dir) if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 6 and resume[0]["saved_world_size"] == 2
    ref, off = _curve(ref_dir), _curve(off_dir)
    assert off[12] < off[1] - 0.5
    rel = _max_rel_diff(ref, off)
    print(f"\n[zero3 offload] loss {off[1]:.4f} -> {off[12]:.4f}; resumed at step {resume[0]['step']};"
          f" max rel diff vs no offload {rel:.2e}")
    assert rel < REL_TOL
