"""The Trainer's decisions with a fake engine, task and Dist (no Ray, no DeepSpeed, jobs of a few steps):
collectives only on the engine's device, one host sync per optimizer step, skip, rollback, preemption,
and the state a checkpoint saves and a resume loads."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from conftest import compose, read_jsonl
from orchestrator.worker import trainer as trainer_mod
from orchestrator.worker.dist import Dist
from orchestrator.worker.state import TrainerState
from orchestrator.worker.trainer import DivergenceError, Trainer


# ----------------------------------------------------------------------------------------------- fakes
class FakeSource:
    def __init__(self, n_rows: int):
        self.n_rows = n_rows

    def __len__(self) -> int:
        return self.n_rows

    def step_order(self, global_batch_size: int, seed: int):
        from orchestrator.data.order import StepOrder

        return StepOrder(self.n_rows, global_batch_size, seed)

    def batch(self, idx, epoch: int) -> dict[str, torch.Tensor]:
        return {"x": torch.as_tensor(list(idx), dtype=torch.float32), "n_tokens": torch.tensor(4 * len(idx))}


class FakeTask:
    stat_keys = ("correct", "count")
    main_metric = None

    def __init__(self, d: Optional[Dist] = None, n_rows: int = 64):
        self.d, self.source = d, FakeSource(n_rows)

    def train_source(self):
        return self.source

    def build_model(self):
        return torch.nn.Linear(2, 2)

    def init_weights(self, model, init_from):
        raise AssertionError("not used")

    def enable_activation_checkpointing(self, model):
        raise AssertionError("not used")

    def model_inputs(self, batch, device):
        return {"x": batch["x"].to(device)}

    def train_record(self, s: dict[str, float]) -> dict[str, float]:
        return {"acc": s["correct"] / max(s["count"], 1.0)}

    def evaluate(self, engine) -> dict[str, Any]:
        total = self.d.sum([1.0, 2.0]) if self.d is not None else [1.0, 2.0]  # an eval-style reduce
        return {"eval_loss": total[0] / max(total[1], 1.0)}

    def export(self, module, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")

    def write_predictions(self, path: Path) -> None:
        pass


class FakeEngine:
    """Losses from `loss_at(forward call)`; state = the number of forward calls (saved and loaded)."""

    def __init__(self, model, device: torch.device, loss_at: Callable[[int], float] = lambda i: 10.0 / (1 + i),
                 on_forward: Callable[[int], None] = lambda i: None):
        self.module, self.device, self.loss_at, self.on_forward = model, torch.device(device), loss_at, on_forward
        self.calls = 0
        self.loads: list[str] = []

    def forward(self, **inputs):
        self.calls += 1
        self.on_forward(self.calls)
        dev = self.device
        return {"loss": torch.tensor(self.loss_at(self.calls), device=dev),
                "correct": torch.tensor(1.0, device=dev), "count": torch.tensor(2.0, device=dev)}

    def backward(self, loss):
        pass

    def step(self):
        pass

    def step_applied(self) -> bool:
        return False

    def lr(self) -> float:
        return 0.1

    def grad_norm(self):
        return None

    def save(self, directory: Path) -> None:
        (directory / "engine.json").write_text(json.dumps({"calls": self.calls}))

    def load(self, directory: Path, universal: bool = False) -> None:
        self.calls = json.loads((directory / "engine.json").read_text())["calls"]
        self.loads.append(directory.name)

    @contextlib.contextmanager
    def full_weights(self):
        yield


class RecordingDist(Dist):
    """A Dist that records every collective's tensor device and answers as one rank would (no group)."""

    calls: list = []

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        RecordingDist.calls.append((tuple(t.shape), t.device))
        if t.device.type == "meta":  # no values on the meta device: answer zeros, as a group of one would
            return torch.zeros(t.shape, dtype=t.dtype)
        return super().all_reduce(t)


def _plan(tmp_path: Path, *extra: str):
    from orchestrator.driver import make_plan

    cfg = compose(["experiment=quickstart_pretrain", "launcher=local", "compute=cpu1", "engine=torch",
                   "train.max_steps=8", "train.global_batch_size=8", "train.micro_batch_size_per_gpu=4",
                   "train.log_every_steps=4", "train.eval_every_steps=8", "train.checkpoint_every_steps=4", *extra])
    return make_plan(cfg, str(tmp_path / "run"), prepare=False)[0]


def _trainer(plan, device="cpu", dist_cls=Dist, **engine_kw) -> Trainer:
    d = dist_cls(0, 1, 0).on(torch.device(device))
    return Trainer(plan, dist=d, task=FakeTask(d),
                   engine_factory=lambda model, p, dev, cfg: FakeEngine(model, dev, **engine_kw))


@pytest.fixture(autouse=True)
def _no_faults(monkeypatch):
    monkeypatch.delenv("BERT_ORCH_FAULT", raising=False)
    trainer_mod.STOP.clear()
    yield
    trainer_mod.STOP.clear()


# ------------------------------------------------------------------------------------ device discipline
def test_every_collective_runs_on_the_engines_device(tmp_path):
    """An engine on a device that is not the CPU ('meta' here): every tensor the trainer (and the task's
    evaluation) hands to a collective sits on that device, which is what an NCCL-only group requires."""
    RecordingDist.calls = []
    plan = _plan(tmp_path)
    summary = _trainer(plan, device="meta", dist_cls=RecordingDist).run()
    assert summary["status"] == "completed" and summary["steps"] == 8
    devices = {dev for _, dev in RecordingDist.calls}
    assert devices == {torch.device("meta")}, RecordingDist.calls
    shapes = [shape for shape, _ in RecordingDist.calls]
    assert shapes.count((3,)) == 8, "one skip/stop decision per optimizer step"
    assert shapes.count((5,)) == 2, "the metric window at the 2 log steps"
    assert (2,) in shapes, "the task's evaluation reduces on the device too"


def test_dist_refuses_a_tensor_off_its_device():
    d = Dist(0, 1, 0).on(torch.device("meta"))
    with pytest.raises(ValueError, match="process group serves meta"):
        d.all_reduce(torch.zeros(3))


def test_a_cuda_only_group_refuses_cpu_tensors_as_nccl_does():
    """Why the device matters: a group bound to `cuda` (as NCCL is) refuses a CPU tensor collective, the
    error the old loop's CPU float64 reduces would have hit on the first multi-GPU step."""
    import subprocess
    import sys

    code = (
        "import torch, torch.distributed as dist\n"
        "dist.init_process_group(backend='cuda:gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "try:\n"
        "    dist.all_reduce(torch.zeros(3, dtype=torch.float64))\n"
        "    print('REDUCED')\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', str(e).splitlines()[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED No backend type associated with device type cpu" in out.stdout, out.stdout + out.stderr[-2000:]


# ------------------------------------------------------------------------------------------- host syncs
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_reads(counter: list):
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, fn):
        def counted(self, *a, **k):
            counter.append(name)
            return fn(self, *a, **k)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("accum", [1, 4])
def test_one_host_sync_per_optimizer_step_off_the_log_steps(tmp_path, accum):
    plan = _plan(tmp_path, "train.max_steps=12", f"train.global_batch_size={4 * accum}",
                 "train.log_every_steps=100", "train.eval_every_steps=100", "train.checkpoint_every_steps=100")
    t = _trainer(plan)
    t.resume()
    for _ in range(3):  # warm: the DataLoader's first fetch
        t.train_step()
    per_step = []
    for _ in range(5):
        reads: list = []
        with count_host_reads(reads):
            assert t.train_step()
        per_step.append(reads)
    t.sinks.close()
    assert all(len(r) <= 1 for r in per_step), per_step
    assert per_step[0] == ["tolist"], "the one read is the all-reduced decision"


# ------------------------------------------------------------------------------ skip, rollback, preempt
def test_a_nonfinite_step_is_skipped_and_the_run_goes_on(tmp_path):
    plan = _plan(tmp_path, "train.global_batch_size=4")  # accum 1: forward call i is step i
    summary = _trainer(plan, loss_at=lambda i: float("nan") if i == 3 else 1.0).run()
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["skipped_steps"] == 1
    events = [r for r in read_jsonl(Path(plan.run_dir) / "metrics.jsonl") if r.get("event") == "skipped_step"]
    assert [(e["step"], e["reason"]) for e in events] == [(3, "non-finite loss")]
    losses = [r["loss"] for r in read_jsonl(Path(plan.run_dir) / "metrics.jsonl") if "loss" in r]
    assert all(loss == loss for loss in losses), "the skipped step's loss is not in the window"


def test_bad_steps_in_a_row_roll_back_to_the_newest_checkpoint(tmp_path):
    plan = _plan(tmp_path, "train.global_batch_size=4", "train.max_bad_steps_in_row=2", "train.max_steps=12")
    forwards = []  # every forward ever made (the engine's own counter is rolled back with it)

    def loss_at(i: int) -> float:
        forwards.append(i)
        return float("nan") if len(forwards) in (5, 6) else 1.0  # steps 5 and 6 are bad the first time only

    t = _trainer(plan, loss_at=loss_at)
    summary = t.run()
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["rollbacks"] == 1
    assert t.engine.loads == ["step_00000004"]
    rows = read_jsonl(Path(plan.run_dir) / "metrics.jsonl")
    rb = [r for r in rows if r.get("event") == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 4 and rb[0]["from_step"] == 6
    assert summary["skipped_steps"] == 2


def test_divergence_without_rollbacks_left_fails_naming_the_knobs(tmp_path):
    plan = _plan(tmp_path, "train.global_batch_size=4", "train.max_bad_steps_in_row=2", "train.max_rollbacks=0")
    t = _trainer(plan, loss_at=lambda i: float("nan") if i >= 5 else 1.0)
    with pytest.raises(DivergenceError, match="train.max_rollbacks"):
        t.run()
    assert t.sinks is not None and t.sinks.metrics is None, "the sinks are closed on the divergence exit too"


def test_sigterm_saves_at_the_current_step_and_stops(tmp_path):
    plan = _plan(tmp_path, "train.global_batch_size=4", "train.checkpoint_every_steps=100")
    t = _trainer(plan, on_forward=lambda i: trainer_mod.STOP.set() if i == 3 else None)
    out = t.run()
    assert out["status"] == "preempted" and out["steps"] == 3
    assert out["checkpoint"].endswith("step_00000003")
    saved = json.loads((Path(out["checkpoint"]) / "trainer_state.json").read_text())
    assert saved["step"] == 3 and saved["consumed_samples"] == 12


def test_a_resume_continues_at_the_saved_step_with_the_saved_state(tmp_path):
    plan = _plan(tmp_path, "train.global_batch_size=4")
    t = _trainer(plan, on_forward=lambda i: trainer_mod.STOP.set() if i == 5 else None)
    assert t.run()["steps"] == 5
    trainer_mod.STOP.clear()
    again = _trainer(plan)
    summary = again.run()
    assert summary["resumed_from"].endswith("step_00000005") and summary["steps"] == 8
    assert summary["steps_this_start"] == 3 and again.engine.calls == 8, "data and engine continue where they were"


def test_trainer_state_round_trips_through_a_checkpoint():
    st = TrainerState(step=7, best_metric=0.5, skipped_steps=1, rollbacks=1, loss_history=[1.0, 2.0],
                      last_metrics={"loss": 1.0}, last_eval={"eval_loss": 2.0})
    saved = st.to_checkpoint(epoch=0, world_size=2, grad_accum_steps=3, micro_batch_size_per_gpu=4,
                             global_batch_size=24, seed=1)
    assert saved["consumed_samples"] == 7 * 24 and saved["world_size"] == 2
    assert TrainerState.from_checkpoint(json.loads(json.dumps(saved))) == st


def test_elastic_accumulation_comes_from_the_plan(tmp_path):
    plan = _plan(tmp_path, "launcher=ray", "compute=cpu2", "engine=zero2", "compute.min_workers=1",
                 "compute.max_workers=2", "train.global_batch_size=8")
    assert plan.grad_accum_at(1) == 2 and plan.grad_accum_at(2) == 1
    assert plan.deepspeed_config_at(1)["gradient_accumulation_steps"] == 2
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="no batch for world size 3"):
        plan.grad_accum_at(3)


def test_a_gpu_plan_on_a_worker_without_cuda_is_refused_not_run_on_the_cpu(tmp_path):
    from orchestrator.driver import make_plan

    plan = make_plan(compose(["experiment=quickstart_pretrain", "compute=gpu_1x8", "compute.gpus_per_node=1",
                              "launcher=local"]),
                     str(tmp_path / "run"), prepare=False)[0]
    with pytest.raises(RuntimeError, match="compute.use_gpu=true but this worker's torch .* sees no CUDA device"):
        Trainer(plan)


def test_a_finished_run_started_again_re_exports_and_re_evaluates(tmp_path):
    plan = _plan(tmp_path)
    assert _trainer(plan).run()["steps"] == 8
    again = _trainer(plan)
    calls = []
    original = again.task.evaluate
    again.task.evaluate = lambda engine: calls.append(1) or original(engine)
    summary = again.run()
    assert summary["steps"] == 8 and summary["steps_this_start"] == 0 and calls == [1]
    assert summary["final_eval"]["eval_loss"] == 0.5 and (Path(plan.run_dir) / "export" / "config.json").is_file()


# ------------------------------------------------------------------------------------ damaged checkpoints
def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte in the engine shard", "bad trainer_state.json of the same size"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, damage):
    plan = _plan(tmp_path, "train.global_batch_size=4", "train.checkpoint_every_steps=2", "train.keep_last=3")
    t = _trainer(plan, on_forward=lambda i: trainer_mod.STOP.set() if i == 6 else None)
    assert t.run()["steps"] == 6
    trainer_mod.STOP.clear()
    newest = Path(plan.run_dir) / "checkpoints" / "step_00000006"
    if damage.startswith("flipped"):
        _flip_a_byte(newest / "engine.json")  # same size: only the checksum can tell
    else:
        state = newest / "trainer_state.json"
        size = state.stat().st_size
        state.write_text("{" + " " * (size - 1))
        assert state.stat().st_size == size
    again = _trainer(plan)
    summary = again.run()
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["resumed_from"].endswith("step_00000004"), summary["resumed_from"]
    assert again.engine.loads == ["step_00000004"]
    assert len(summary["skipped_checkpoints"]) == 1 and "step_00000006" in summary["skipped_checkpoints"][0]
    events = [r for r in read_jsonl(Path(plan.run_dir) / "metrics.jsonl") if r.get("event") == "checkpoint_skipped"]
    assert events and ("SHA-256" in events[0]["reason"] or "trainer_state.json" in events[0]["reason"]), events


def test_the_manifest_records_a_checksum_per_file(tmp_path):
    plan = _plan(tmp_path, "train.global_batch_size=4", "train.max_steps=4")
    _trainer(plan).run()
    import hashlib

    ck = Path(plan.run_dir) / "checkpoints" / "step_00000004"
    files = json.loads((ck / "manifest.json").read_text())["files"]
    assert set(files) >= {"engine.json", "trainer_state.json"}
    for name, rec in files.items():
        assert rec["sha256"] == hashlib.sha256((ck / name).read_bytes()).hexdigest(), name


# ------------------------------------------------------------------------------------------ safe loading
class _Payload:
    """What an attacker with write access to a run dir would plant: unpickling it runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_nothing_read_back_from_a_run_dir_unpickles_code(tmp_path):
    from types import SimpleNamespace

    from orchestrator.data.finetune_prep import FEATURES_FILE, load_features
    from orchestrator.errors import DataError
    from orchestrator.worker.trainer import restore_rng

    marker = tmp_path / "pwned"
    ck = tmp_path / "step_00000004"
    ck.mkdir()
    torch.save({"torch": _Payload(marker)}, ck / "rng_rank0.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        restore_rng(SimpleNamespace(path=ck, state={"world_size": 1}, step=4), Dist(0, 1, 0), seed=1)
    assert not marker.exists()
    assert FEATURES_FILE.endswith(".json")
    (tmp_path / FEATURES_FILE).write_text('{"train": [{"__type__": "Popen", "args": ["touch", "x"]}]}')
    with pytest.raises(DataError, match="unknown record type 'Popen'"):
        load_features(str(tmp_path))


def test_deepspeed_loads_run_weights_only(tmp_path):
    """DeepSpeed 0.19.8 passes weights_only=False; inside weights_only_loads() a planted payload is refused and
    DeepSpeed's own data classes still load."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from orchestrator.worker.checkpoint import weights_only_loads

    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Payload(marker)}, tmp_path / "evil_optim_states.pt")
    torch.save({"zero_stage": ZeroStageEnum.gradients, "t": torch.ones(2)}, tmp_path / "good_optim_states.pt")
    with weights_only_loads():
        with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
            torch.load(tmp_path / "evil_optim_states.pt", weights_only=False)
        good = torch.load(tmp_path / "good_optim_states.pt", weights_only=False)
    assert not marker.exists() and good["zero_stage"] == ZeroStageEnum.gradients
    assert torch.load is torch.serialization.load, "restored on exit"


# ------------------------------------------------------------------------------------------- progress
def test_off_a_terminal_rank_0_prints_one_progress_line_per_log_step(tmp_path, capsys):
    import re

    plan = _plan(tmp_path, "train.global_batch_size=4", "train.max_steps=12", "train.log_every_steps=4")
    _trainer(plan, on_forward=lambda i: trainer_mod.STOP.set() if i == 5 else None).run()  # stops at step 5
    trainer_mod.STOP.clear()
    capsys.readouterr()
    _trainer(plan).run()  # resumes at 5: lines at 8 and 12 (the last step)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[run] step ")]
    pattern = r"\[run\] step (\d+)/12 \(\d+%\)  loss [\d.]+  lr [\d.e+-]+  [\d,]+ tok/s  elapsed \d+:\d\d  eta (\d+:\d\d)"
    matches = [re.fullmatch(pattern, ln) for ln in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [8, 12]
    assert matches[-1].group(2) == "0:00", "nothing left at the last step"


def test_progress_line_eta_comes_from_this_starts_pace():
    from orchestrator.worker.metrics import progress_line

    rec = {"step": 60, "loss": 2.5, "mlm_acc": 0.4, "lr": 1e-3, "tokens_per_s": 12345.6}
    line = progress_line(rec, total=100, initial=40, elapsed=40.0)  # 20 steps in 40 s: 40 left take 80 s
    assert line == ("step 60/100 (60%)  loss 2.5000  mlm_acc 0.400  lr 1.00e-03  12,346 tok/s  elapsed 0:40"
                    "  eta 1:20")


# ------------------------------------------------------------------------------------------ TensorBoard
def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard itself reads from the run dir's event files (its own reader, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_every_logged_step_once_across_a_rollback(tmp_path):
    plan = _plan(tmp_path, "logger=tensorboard", "train.global_batch_size=4", "train.max_bad_steps_in_row=2",
                 "train.max_steps=12", "train.log_every_steps=2")
    forwards = []

    def loss_at(i: int) -> float:
        forwards.append(i)
        return float("nan") if len(forwards) in (5, 6) else 10.0 / len(forwards)  # steps 5, 6 bad once: back to 4

    summary = _trainer(plan, loss_at=loss_at).run()
    assert summary["rollbacks"] == 1
    scalars = _scalars(Path(plan.run_dir))
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12], "each step once: the redone 6 replaced"
    jsonl = {r["step"]: r["loss"] for r in read_jsonl(Path(plan.run_dir) / "metrics.jsonl") if "loss" in r}
    assert dict(scalars["train/loss"]) == pytest.approx(jsonl), "the same numbers as metrics.jsonl"
    assert [s for s, _ in scalars["eval/loss"]] == [8, 12] and "train/lr" in scalars


# --------------------------------------------------------------------------------------- step time split
def test_each_log_step_splits_the_step_time_by_phase(tmp_path):
    """On a CPU every log record says where a step's time went: a 30 ms forward and a 15 ms backward (accum 2,
    so 60 + 30 ms per optimizer step) land in their phases, and the phases never add up to more than the
    window's wall time."""
    import time as _time

    class SlowEngine(FakeEngine):
        def forward(self, **inputs):
            _time.sleep(0.03)
            return super().forward(**inputs)

        def backward(self, loss):
            _time.sleep(0.015)

    plan = _plan(tmp_path, "train.global_batch_size=8", "train.micro_batch_size_per_gpu=4", "train.max_steps=8",
                 "train.log_every_steps=4")
    d = Dist(0, 1, 0)
    t = Trainer(plan, dist=d, task=FakeTask(d), engine_factory=lambda model, p, dev, cfg: SlowEngine(model, dev))
    t.run()
    recs = [r for r in read_jsonl(Path(plan.run_dir) / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [4, 8]
    for r in recs:
        assert 60 <= r["time_forward_ms"] < 90 and 30 <= r["time_backward_ms"] < 50, r
        assert r["time_data_ms"] >= 0 and r["time_sync_ms"] >= 0 and r["time_step_ms"] >= 0
        assert "slowest_rank" not in r, "one rank: nobody to wait for"
    second = recs[1]  # a whole window of 4 steps (the first one includes the DataLoader's start)
    phases = sum(second[f"time_{p}_ms"] for p in trainer_mod.PhaseClock.PHASES)
    window_ms = 4 * 8 * 4 / second["tokens_per_s"] * 1000  # 4 steps of 8 rows x 4 tokens (FakeSource)
    assert phases <= window_ms * 1.001, (phases, window_ms)


def test_the_phase_record_names_the_rank_the_others_waited_for():
    clock = trainer_mod.PhaseClock(True)
    clock.steps = 10
    # seconds over 10 steps, per rank: data, forward, sync, backward, step; rank 2 is slow to reach the sync
    per_rank = [[0.01, 0.30, 0.20, 0.50, 0.05], [0.01, 0.31, 0.19, 0.50, 0.05], [0.02, 0.49, 0.00, 0.50, 0.05]]
    import numpy as np

    rec = clock.record(np.asarray(per_rank))
    assert rec["slowest_rank"] == 2
    assert rec["time_to_sync_spread_ms"] == pytest.approx(20.0)  # 51 ms against rank 0's 31 ms per step
    assert rec["time_sync_max_ms"] == pytest.approx(20.0)
    assert rec["time_forward_ms"] == pytest.approx(1000 * (0.30 + 0.31 + 0.49) / 3 / 10, abs=1e-3)  # rounded to µs
    assert trainer_mod.PhaseClock(False).record(np.asarray(per_rank)) == {}, "no split off the CPU"
