"""Worker stage: the Trainer — task data -> model -> engine -> steps -> eval -> checkpoint -> metrics -> export.

`Trainer.run` is the loop; each step it calls is a method below. The trainer is task-agnostic: a task
(pretrain_task.PretrainTask, finetune_task.FinetuneTask, retrieval_task.RetrievalTask) supplies the tokenizer,
the model, the batches of each step, the training stats, the evaluation and the export.

Host syncs: losses and stats accumulate on the engine's device; one all-reduce and one host read per
optimizer step decide skip / stop (before the last micro batch's backward, so a bad step can still be
poisoned and skipped by the engine); the metric window is reduced and read only at log steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from orchestrator.plan.job_plan import JobPlan
from orchestrator.plan.identity import job_identity
from orchestrator.worker import checkpoint as ckpt
from orchestrator.worker.dist import Dist
from orchestrator.io import write_json_atomic, write_text_atomic
from orchestrator.worker.metrics import MetricsJsonl, Progress, TensorBoardSink, WandbSink
from orchestrator.worker.profiling import StepProfiler
from orchestrator.worker.state import TrainerState

log = logging.getLogger("orchestrator.worker")


class Reporter(Protocol):
    """How a launcher hears of checkpoints (Ray: ray.train.report). Called on every rank, same count."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None: ...


class Task(Protocol):
    """What the trainer needs of a task (pretraining, fine-tuning, and the tasks to come)."""

    stat_keys: tuple[str, ...]
    main_metric: Optional[str]

    def train_source(self): ...
    def build_model(self) -> torch.nn.Module: ...
    def init_weights(self, model: torch.nn.Module, init_from: str) -> None: ...
    def enable_activation_checkpointing(self, model: torch.nn.Module) -> None: ...
    def model_inputs(self, batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]: ...
    def train_record(self, sums: dict[str, float]) -> dict[str, float]: ...
    def evaluate(self, engine) -> dict[str, Any]: ...
    def export(self, module: torch.nn.Module, out_dir: Path) -> None: ...
    def write_predictions(self, path: Path) -> None: ...  # tasks with a main_metric (fine-tuning)


class DivergenceError(RuntimeError):
    pass


class PhaseClock:
    """This rank's wall time per phase of its steps, summed over a metric window (Megatron's timers, min/max over
    ranks, in a form that costs nothing): the wait for the batch, forward, the step's one sync (the all-reduce
    that also shows how long this rank waited for the slowest), backward (with ZeRO's gradient reduction) and the
    optimizer step. Kept on a CPU only: there ops run synchronously, so a phase's wall time is its work's; on a GPU
    the host runs ahead of the device and the split would be launch times (use train.profile_steps there)."""

    PHASES = ("data", "forward", "sync", "backward", "step")

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.seconds = np.zeros(len(self.PHASES))
        self.steps = 0
        self.t = 0.0

    def start(self) -> None:
        if self.enabled:
            self.t = time.perf_counter()

    def lap(self, phase: int) -> None:
        if self.enabled:
            now = time.perf_counter()
            self.seconds[phase] += now - self.t
            self.t = now

    def reset(self) -> None:
        self.seconds[:] = 0.0
        self.steps = 0

    def record(self, per_rank: np.ndarray) -> dict[str, Any]:
        """Metrics of the window from every rank's seconds (world x phases): each phase's mean over ranks in ms
        per step and, with several ranks, the slowest rank to reach the sync (its batch + forward), how much longer
        it took than the fastest, and the longest sync wait of a rank."""
        if not self.enabled or self.steps == 0:
            return {}
        ms = per_rank * 1000.0 / self.steps
        out: dict[str, Any] = {f"time_{p}_ms": round(float(v), 3) for p, v in zip(self.PHASES, ms.mean(axis=0))}
        if len(ms) > 1:
            to_sync = ms[:, 0] + ms[:, 1]
            out["slowest_rank"] = int(to_sync.argmax())
            out["time_to_sync_spread_ms"] = round(float(to_sync.max() - to_sync.min()), 3)
            out["time_sync_max_ms"] = round(float(ms[:, 2].max()), 3)
        return out


class StepBatches(torch.utils.data.Dataset):
    """Micro batch j of this rank, counted from the resume step: what a DataLoader prefetches."""

    def __init__(self, source, order, plan: JobPlan, d: Dist, start_step: int, accum: int):
        self.source, self.order, self.plan, self.d = source, order, plan, d
        self.start_step, self.accum = start_step, accum

    def __len__(self) -> int:
        return (self.plan.total_steps - self.start_step) * self.accum

    def __getitem__(self, j: int):
        step = self.start_step + j // self.accum
        m = j % self.accum
        idx = self.order.rank_micro_rows(step, self.d.rank, self.d.world_size, self.plan.micro_batch_size_per_gpu, self.accum)[m]
        batch = self.source.batch(idx, self.order.epoch_of(step))
        batch["row_ids"] = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return batch


def make_task(plan: JobPlan, d: Dist) -> Task:
    if plan.job.task.name == "pretrain":
        from orchestrator.worker.pretrain_task import PretrainTask

        return PretrainTask(plan, d)
    if plan.job.task.name in ("embed", "rerank"):
        from orchestrator.worker.retrieval_task import RetrievalTask

        return RetrievalTask(plan, d)
    from orchestrator.worker.finetune_task import FinetuneTask

    return FinetuneTask(plan, d)


# --------------------------------------------------------------------------------------- RNG, signals
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(latest, d: Dist, seed: int) -> str:
    """Rank-for-rank RNG streams when the world size is unchanged; else a deterministic reseed.

    After a resize rank r of the new group has no stream of its own to continue, so dropout streams restart
    from (seed, step, rank): reproducible, but not bit-identical to an uninterrupted run.
    """
    rng_file = latest.path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file() and latest.state.get("world_size") == d.world_size:
        st = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(st["torch"])
        if d.device.type == "cuda" and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"])
        return "restored"
    torch.manual_seed((seed * 1_000_003 + latest.step * 1009 + d.rank) % (2**63))
    return "reseeded"


STOP = threading.Event()


def install_sigterm():
    """SIGTERM (preemption) sets a flag the trainer reads at every step decision; only possible in the main
    thread (launcher=local). Under Ray the train function runs in a thread and Ray handles the signal itself."""
    if threading.current_thread() is not threading.main_thread():
        return None
    STOP.clear()
    return signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())


# ---------------------------------------------------------------------------------------------- sinks
class Sinks:
    """Rank 0's metric sinks (metrics.jsonl, W&B) and every rank's ledger; one place closes them all."""

    def __init__(self, trainer: "Trainer", start_step: int):
        self.t = trainer
        self.metrics: Optional[MetricsJsonl] = None
        self.wandb: Optional[WandbSink] = None
        self.tensorboard: Optional[TensorBoardSink] = None
        if trainer.d.rank == 0:
            self.metrics = MetricsJsonl(trainer.run_dir / "metrics.jsonl", start_step)
            if trainer.job.logger.name == "wandb":
                self.wandb = WandbSink(trainer.run_dir, trainer.job.logger, trainer.plan.to_dict(), trainer.job.run_name)
            if trainer.job.logger.tensorboard:
                self.tensorboard = TensorBoardSink(trainer.run_dir, start_step)
        self.ledger: Optional[MetricsJsonl] = self._open_ledger(start_step)

    def _open_ledger(self, step: int) -> Optional[MetricsJsonl]:
        t = self.t
        if not t.job.train.write_ledger:
            return None
        if t.d.rank == 0:  # rank 0 truncates every rank's file (also of ranks a resize removed) first
            (t.run_dir / "ledger").mkdir(exist_ok=True)
            ckpt.truncate_ledgers(t.run_dir, step)
        t.d.barrier()
        return MetricsJsonl(t.run_dir / "ledger" / f"rank{t.d.rank}.jsonl", step)

    def write(self, record: dict[str, Any]) -> None:
        for sink in (self.metrics, self.wandb, self.tensorboard):
            if sink is not None:
                sink.write(record)

    def event(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write({**record, "time": time.time()})

    def rewind(self, step: int) -> None:
        """After a rollback: metrics and ledger continue from `step` (later lines are dropped)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = MetricsJsonl(self.t.run_dir / "metrics.jsonl", step)
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = TensorBoardSink(self.t.run_dir, step)
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = self._open_ledger(step)

    def close(self, failed: bool = False) -> None:
        for sink in (self.metrics, self.ledger, self.tensorboard):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.close(exit_code=1 if failed else 0)
        self.metrics = self.wandb = self.ledger = self.tensorboard = None


# -------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Train from the plan; resume from the newest good checkpoint in the run dir."""

    def __init__(self, plan: JobPlan, reporter: Optional[Reporter] = None, interactive: bool = False, *,
                 dist: Optional[Dist] = None, task: Optional[Task] = None,
                 engine_factory: Optional[Callable[..., Any]] = None, parent_pid: Optional[int] = None,
                 affinity: Optional[dict[str, Any]] = None):
        self.t_start = time.perf_counter()
        self.parent_pid = parent_pid
        self.plan, self.job, self.reporter = plan, plan.job, reporter
        self.run_dir = Path(plan.run_dir)
        self.d = dist or self._init_dist()
        self.affinity = affinity  # this rank's CPU pinning decision (Ray CPU workers), logged at the start
        self.accum = plan.grad_accum_at(self.d.world_size)
        self.task = task or make_task(plan, self.d)
        self.source = self.task.train_source()
        self.order = self.source.step_order(plan.global_batch_size, self.job.train.seed)
        self.model = self._build_model()
        from orchestrator.worker.faults import Faults

        self.faults = Faults.from_env(self.run_dir, self.d.rank)
        self.skipped_ckpts: list[str] = []
        self.latest = self._choose_checkpoint()
        self.conversion_s: Optional[float] = None
        if self.latest is not None and self._needs_universal(self.latest):
            _, self.conversion_s = ckpt.ensure_universal(self.latest.path, self.d.rank, self.d.barrier)
        factory = engine_factory or _build_engine
        self.engine = factory(self.model, plan, self.d.device, plan.deepspeed_config_at(self.d.world_size))
        torch.manual_seed(self.job.train.seed * 1000 + self.d.rank)  # dropout streams differ per rank
        self.state = TrainerState()
        self.interactive = interactive
        self.sinks: Optional[Sinks] = None
        self.progress: Optional[Progress] = None  # opened by resume(), once the start step is known
        self.batches: Any = None  # the data iterator, positioned at the step resume() or rollback() loaded
        self.start_step, self.resumed_from, self.rng_how = 0, None, None
        self.loss_hist: deque = deque(maxlen=self.job.train.spike_window)  # good steps' mean losses (spike check)
        self.bad_in_row, self.bad_reasons, self.bad_reason = 0, [], ""
        self.stop_requested = False
        self.window = torch.zeros(3 + len(self.task.stat_keys), dtype=torch.float64, device=self.d.device)
        self.clock = PhaseClock(torch.device(self.d.device).type == "cpu")
        self.window_t0 = time.perf_counter()
        self.run_tokens, self.run_time, self.first_step_s = 0.0, 0.0, None
        self.eval_every = self.job.train.eval_every_steps or (plan.steps_per_epoch or plan.total_steps)
        self.stat_keys = tuple(self.task.stat_keys)
        self.profiler = StepProfiler(self.job.train.profile_steps, self.run_dir / "profile", self.d.rank,
                                     torch.device(self.d.device).type == "cuda")

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        failed = True
        try:
            self.resume()
            self.model.train()
            while self.state.step < self.plan.total_steps:
                self.profiler.before_step(self.state.step + 1)
                good = self.train_step()
                self.profiler.after_step(self.state.step)
                if not good and self.on_bad_step():
                    continue  # rolled back: the loop goes on from the checkpoint's step
                self.exit_if_orphaned()
                last = self.state.step == self.plan.total_steps
                self.maybe_log(last)
                self.maybe_evaluate(last)
                saved = self.maybe_checkpoint(last)
                self.progress.update(1)
                if self.stop_requested and not last:
                    failed = False
                    return self.preempt(saved)
                self.faults.after_step(self.state.step)
            failed = False
            return self.finish()
        finally:
            self.profiler.close()
            if self.progress is not None:
                self.progress.close()
            if self.sinks is not None:
                self.sinks.close(failed)

    def exit_if_orphaned(self) -> None:
        """A Ray worker whose raylet is gone (its driver and local Ray killed -9) would otherwise train on, log
        and checkpoint into the run dir for seconds; it stops here, before logging or checkpointing this step (the
        step's ledger row, written inside the step, is dropped by the next start, which resumes before it)."""
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            print(f"rank {self.d.rank}: the Ray node that started this worker (pid {self.parent_pid}) is gone;"
                  f" exiting at step {self.state.step} without logging or checkpointing it", file=sys.stderr, flush=True)
            os._exit(1)

    # -- set-up -----------------------------------------------------------------------------------------
    def _init_dist(self) -> Dist:
        if self.job.compute.use_gpu and not torch.cuda.is_available():  # never a silent CPU run of a GPU plan
            raise RuntimeError(
                f"compute.use_gpu=true but this worker's torch {torch.__version__} sees no CUDA device (CUDA build:"
                f" {torch.version.cuda}): install a CUDA build of torch on the GPU nodes, or run with compute=cpu1|cpu2")
        if self.job.engine.backend == "deepspeed":
            from orchestrator.worker.engine import init_single_process_group

            init_single_process_group()  # no-op under Ray, which made the group already
        d = Dist.current()
        torch.set_num_threads(max(1, self.job.compute.cpus_per_worker))
        if self.job.compute.use_gpu:
            # one GPU per worker; Ray sorts a node's ranks by GPU id, so local rank = index in CUDA_VISIBLE_DEVICES
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
            return d.on(device)
        return d

    def _build_model(self) -> torch.nn.Module:
        model = self.task.build_model()
        if self.job.train.init_from:
            self.task.init_weights(model, self.job.train.init_from)
        if self.job.engine.activation_checkpointing:
            self.task.enable_activation_checkpointing(model)
        if self.job.engine.compile:
            model = torch.compile(model)
        return model

    def _warn_ckpt(self, msg: str) -> None:
        if self.d.rank == 0:
            log.warning(msg)
            self.skipped_ckpts.append(msg)

    def _choose_checkpoint(self) -> Optional[ckpt.CheckpointInfo]:
        """Rank 0 picks the newest checkpoint whose every byte matches its manifest (a damaged one is skipped
        with a warning, recorded in the summary); every rank loads that one, whatever its own view of the dir."""
        path = None
        if self.d.rank == 0:
            info = ckpt.find_latest(self.run_dir, warn=self._warn_ckpt, checksums=True)
            path = str(info.path) if info is not None else None
        path = self.d.broadcast(path)
        if path is None:
            return None
        info, problem = ckpt.read_checkpoint(Path(path))
        if info is None:
            raise RuntimeError(f"rank {self.d.rank} cannot read checkpoint {path}, chosen by rank 0: {problem}")
        return info

    def _needs_universal(self, info) -> bool:
        """A ZeRO (stage >= 1) checkpoint saved at another world size loads through the universal format."""
        use_zero = self.job.engine.backend == "deepspeed" and self.job.engine.zero_stage >= 1
        return use_zero and info.state.get("world_size", self.d.world_size) != self.d.world_size

    def _make_batches(self, step: int):
        return iter(torch.utils.data.DataLoader(
            StepBatches(self.source, self.order, self.plan, self.d, step, self.accum),
            batch_size=None, shuffle=False, num_workers=self.job.data.loader_workers,
            pin_memory=self.d.device.type == "cuda",
            prefetch_factor=4 if self.job.data.loader_workers > 0 else None,
        ))

    # -- resume / rollback --------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the newest good checkpoint (if any), then open the sinks and the data at its step."""
        if self.latest is not None:
            self.load(self.latest)
            self.resumed_from = str(self.latest.path)
        else:
            self.batches = self._make_batches(0)
        self.start_step = self.state.step
        self.progress = Progress(self.plan.total_steps, self.start_step, enabled=self.d.rank == 0, bar=self.interactive,
                                 label=f"[{self.run_dir.name}] ")
        self.sinks = Sinks(self, self.start_step)
        for msg in self.skipped_ckpts:
            self.sinks.event({"event": "checkpoint_skipped", "step": self.start_step, "reason": msg})
        if self.affinity is not None:  # every rank's pinning decision, in rank order
            self.sinks.event({"event": "cpu_affinity", "step": self.start_step, "ranks": self.d.gather(self.affinity)})
        for ev in getattr(self.model, "events", ()):  # the model's own start-up facts (a sharded teacher)
            self.sinks.event({**ev, "step": self.start_step})
        if self.latest is not None:
            info = self.latest
            self.sinks.event({
                "event": "resume", "step": self.start_step, "from": str(info.path), "world_size": self.d.world_size,
                "saved_world_size": info.state.get("world_size"), "grad_accum_steps": self.accum,
                "rng": self.rng_how, "universal_conversion_s": self.conversion_s,
            })
            if self.d.rank == 0:
                log.info("resumed from %s at step %d (saved at world size %s, now %d, accum %d; RNG %s%s)",
                         info.path, self.start_step, info.state.get("world_size"), self.d.world_size, self.accum,
                         self.rng_how, f"; universal conversion {self.conversion_s:.1f}s" if self.conversion_s else "")
        self._reset_window()

    def load(self, info) -> None:
        """Engine, RNG and trainer state from one checkpoint; the data restarts at its step."""
        if self._needs_universal(info):
            ckpt.ensure_universal(info.path, self.d.rank, self.d.barrier)
        self.engine.load(info.path, universal=self._needs_universal(info))
        self.rng_how = restore_rng(info, self.d, self.job.train.seed)
        self.state = TrainerState.from_checkpoint(info.state)
        self.loss_hist = deque(self.state.loss_history, maxlen=self.job.train.spike_window)
        self.batches = self._make_batches(self.state.step)

    def on_bad_step(self) -> bool:
        """A skipped step: count it; after train.max_bad_steps_in_row in a row, roll back to a checkpoint
        (returns True then). A skipped step that does not roll back is logged, evaluated and saved as due."""
        tr, st = self.job.train, self.state
        st.skipped_steps += 1
        self.bad_in_row += 1
        self.bad_reasons.append(f"step {st.step}: {self.bad_reason}")
        self.sinks.event({"event": "skipped_step", "step": st.step, "reason": self.bad_reason})
        if self.d.rank == 0:
            log.warning("skipped step %d: %s (%d in a row)", st.step, self.bad_reason, self.bad_in_row)
        if self.bad_in_row < tr.max_bad_steps_in_row:
            return False
        self.rollback()
        return True

    def rollback(self) -> None:
        tr, done, bad = self.job.train, self.state.step, self.bad_in_row
        rollbacks = self.state.rollbacks + 1
        target = self._choose_checkpoint()
        if rollbacks > tr.max_rollbacks or target is None:
            why = (f"{rollbacks - 1} rollbacks allowed (train.max_rollbacks)" if target is not None
                   else "no checkpoint to roll back to")
            raise DivergenceError(
                f"training diverged: {bad} bad steps in a row ({'; '.join(self.bad_reasons[-bad:])})"
                f" and {why}; lower optim.lr, inspect the data of these steps or raise train.spike_factor")
        t0 = time.perf_counter()
        best = self.state.best_metric
        self.load(target)
        self.state.rollbacks, self.state.best_metric = rollbacks, best
        self.state.skipped_steps += bad
        self.sinks.rewind(self.state.step)
        if self.d.rank == 0:
            log.warning("rolled back from step %d to %s after %d bad steps", done, target.path, bad)
        self.sinks.event({"event": "rollback", "step": self.state.step, "from_step": done, "to": str(target.path),
                          "bad_steps": self.bad_reasons[-bad:], "rollbacks": rollbacks,
                          "seconds": time.perf_counter() - t0})
        self.progress.update(self.state.step - done)
        self.bad_in_row, self.bad_reasons, self.bad_reason = 0, [], ""
        self._reset_window()

    def _reset_window(self) -> None:
        """The metric window (loss sum, micro count, tokens, task stats) stays on the device; read at log steps."""
        self.window.zero_()
        self.clock.reset()
        self.window_t0 = time.perf_counter()

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> bool:
        """accum micro batches and one optimizer step; False when the step was skipped (bad loss)."""
        step = self.state.step
        dev = self.d.device
        step_window = torch.zeros_like(self.window)
        rows: list[torch.Tensor] = []
        bad = False
        clock = self.clock
        clock.start()
        for m in range(self.accum):
            batch = next(self.batches)
            clock.lap(0)
            rows.append(batch["row_ids"])
            out = self.engine.forward(**self.task.model_inputs(batch, dev))
            loss = out["loss"]
            self.faults.in_forward()
            factor = self.faults.loss_factor(step + 1, m)
            if factor != 1.0:
                loss = loss * factor
            stats = [out[k].detach().reshape(()).to(dev, torch.float64) for k in self.stat_keys]
            step_window += torch.stack([loss.detach().to(torch.float64), torch.ones((), dtype=torch.float64, device=dev),
                                        batch["n_tokens"].to(dev, torch.float64), *stats])
            clock.lap(1)
            if m == self.accum - 1:  # the step's one host sync, before the backward that applies the step
                bad = self.decide(step_window)
                clock.lap(2)
            # a skipped step still runs backward and step (DeepSpeed's micro-step counters stay aligned) with
            # non-finite gradients: ZeRO-1/2/3 (non-finite grad norm), our stage-0 guard and TorchEngine then
            # skip the optimizer and LR-schedule update and clear the gradients
            self.engine.backward(loss * float("nan") if bad else loss)
            clock.lap(3)
            self.engine.step()
            clock.lap(4)
        clock.steps += 1
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.t_start
        self.state.step = step + 1
        if bad and self.engine.step_applied():
            log.error("step %d was to be skipped but the engine applied it", self.state.step)
        if self.sinks.ledger is not None:
            self.sinks.ledger.write({"step": self.state.step, "rows": torch.cat(rows).tolist(), "world_size": self.d.world_size,
                                     "grad_accum_steps": self.accum, "skipped": bad, "time": time.time()})
        if not bad:
            self.bad_in_row = 0
            self.window += step_window
        return not bad

    def decide(self, step_window: torch.Tensor) -> bool:
        """Every rank takes the same skip / stop decision: one small all-reduce, one host read."""
        tr = self.job.train
        loss_sum = step_window[0]
        flags = torch.stack([(~torch.isfinite(loss_sum)).to(torch.float64),
                             torch.where(torch.isfinite(loss_sum), loss_sum, torch.zeros_like(loss_sum)),
                             torch.tensor(float(STOP.is_set()), dtype=torch.float64, device=self.d.device)])
        nonfinite, total, stop = self.d.all_reduce(flags).tolist()
        self.stop_requested = stop > 0
        mean = total / (self.d.world_size * self.accum)
        if tr.skip_nonfinite and nonfinite > 0:
            self.bad_reason = "non-finite loss"
            return True
        if tr.spike_factor and len(self.loss_hist) >= min(5, tr.spike_window):
            ref = sum(self.loss_hist) / len(self.loss_hist)
            if mean > tr.spike_factor * ref:
                self.bad_reason = f"loss spike {mean:.3f} > {tr.spike_factor} x {ref:.3f}"
                return True
        self.loss_hist.append(mean)
        return False

    # -- when due: log, evaluate, checkpoint ------------------------------------------------------------
    def maybe_log(self, last: bool) -> None:
        done = self.state.step
        if done % self.job.train.log_every_steps != 0 and not last:
            return
        payload = self.window.clone()
        n, world = payload.numel(), self.d.world_size
        if self.clock.enabled:  # every rank's phase seconds in its own slot: the same one all-reduce carries them
            mine = np.zeros((world, len(PhaseClock.PHASES)))
            mine[self.d.rank] = self.clock.seconds
            payload = torch.cat([payload, torch.from_numpy(mine.ravel()).to(payload)])
        reduced = self.d.all_reduce(payload).tolist()
        s, per_rank = reduced[:n], np.asarray(reduced[n:]).reshape(world, -1)
        elapsed = time.perf_counter() - self.window_t0
        self.run_tokens += s[2]
        self.run_time += elapsed
        record = {
            "step": done,
            "epoch": self.order.epoch_of(done - 1),
            "consumed_samples": done * self.plan.global_batch_size,
            "loss": s[0] / s[1] if s[1] else None,
            **self.task.train_record(dict(zip(self.stat_keys, s[3:]))),
            "lr": self.engine.lr(),
            "grad_norm": self.engine.grad_norm(),
            "tokens_per_s": s[2] / elapsed if elapsed > 0 else 0.0,
            "world_size": self.d.world_size,
            "grad_accum_steps": self.accum,
            "skipped_steps": self.state.skipped_steps,
            **self.clock.record(per_rank),
            "time": time.time(),
        }
        self.state.last_metrics = record
        self.sinks.write(record)
        self.progress.log(record)
        self._reset_window()

    def maybe_evaluate(self, last: bool) -> None:
        done = self.state.step
        if done % self.eval_every != 0 and not last:
            return
        self.state.last_eval = self.evaluate()
        self.sinks.write({"step": done, **_scalars(self.state.last_eval)})
        main = self.task.main_metric
        if main is not None and main in self.state.last_eval:
            value = float(self.state.last_eval[main])
            if self.state.best_metric is None or value > self.state.best_metric:
                self.state.best_metric = value
                self.save_best({"step": done, **self.state.last_eval})
        self.window_t0 = time.perf_counter()  # evaluation time is not training throughput

    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        with torch.no_grad():
            result = self.task.evaluate(self.engine)
        self.model.train()
        return result

    def save_best(self, metrics: dict[str, Any]) -> None:
        """The best model by the task's main metric, with its eval metrics and predictions (fine-tuning)."""
        from orchestrator.io import atomic_save_dir

        def write(tmp: Path) -> None:
            self.task.export(self.engine.module, tmp)
            write_json_atomic(tmp / "eval_metrics.json", metrics)

        with self.engine.full_weights():
            if self.d.rank == 0:
                atomic_save_dir(write, self.run_dir / "best")
                self.task.write_predictions(self.run_dir / "predictions_eval.jsonl")
        self.d.barrier()

    def maybe_checkpoint(self, last: bool) -> bool:
        if self.state.step % self.job.train.checkpoint_every_steps != 0 and not last:
            return False
        self.save_checkpoint()
        self.window_t0 = time.perf_counter()
        return True

    def save_checkpoint(self) -> Path:
        st = self.state
        st.loss_history = list(self.loss_hist)
        saved = st.to_checkpoint(epoch=self.order.epoch_of(st.step - 1), world_size=self.d.world_size,
                                 grad_accum_steps=self.accum, micro_batch_size_per_gpu=self.plan.micro_batch_size_per_gpu,
                                 global_batch_size=self.plan.global_batch_size, seed=self.job.train.seed)
        saved["identity"] = job_identity(self.plan.config)  # what a later start must match to resume it

        def write_shards(tmp: Path) -> None:
            self.engine.save(tmp)
            torch.save(rng_state(), tmp / f"rng_rank{self.d.rank}.pt")

        path = ckpt.save(self.run_dir, st.step, self.d.rank, self.d.barrier, write_shards, saved, self.job.train.keep_last)
        if self.reporter is not None:
            self.reporter.report({"step": st.step, **{k: v for k, v in st.last_metrics.items() if k != "time"}}, path)
        return path

    # -- the end ----------------------------------------------------------------------------------------
    def preempt(self, saved: bool) -> dict[str, Any]:
        """SIGTERM: every rank saw the same all-reduced flag, so all save here and leave together."""
        done = self.state.step
        if not saved:
            self.save_checkpoint()
        if self.d.rank == 0:
            log.warning("SIGTERM: checkpoint saved at step %d; exiting (rerun the command to resume)", done)
        self.sinks.event({"event": "preempted", "step": done})
        if self.d.rank != 0:
            return {}
        out = {"status": "preempted", "steps": done, "planned_steps": self.plan.total_steps,
               "resumed_from": self.resumed_from, "world_size": self.d.world_size,
               "checkpoint": str(ckpt.find_latest(self.run_dir).path), "run_dir": str(self.run_dir)}
        write_json_atomic(self.run_dir / "summary.json", out)
        return out

    def finish(self) -> dict[str, Any]:
        """Export (the best model when the task keeps one, else the final weights) and the summary."""
        if self.state.step == self.start_step or not self.state.last_eval:
            # resumed at the final step (a finished run started again): nothing ran, so evaluate the weights
            # as they are now rather than report the checkpoint's numbers
            self.state.last_eval = self.evaluate()
        best_eval = self.export()
        if self.d.rank != 0:
            return {}
        summary = self.summary(best_eval)
        from orchestrator.worker.model_card import model_card

        write_text_atomic(self.run_dir / "export" / "README.md", model_card(self.plan.to_dict(), summary))
        if self.sinks.wandb is not None:
            summary["wandb_run_id"] = self.sinks.wandb.run_id
            self.sinks.wandb.summary({**summary["final_eval"], "steps": self.state.step})
            self.sinks.wandb.log_model(self.run_dir / "export", self.job.task.name)
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def export(self) -> dict[str, Any]:
        from orchestrator.io import atomic_save_dir

        export_dir, best_dir = self.run_dir / "export", self.run_dir / "best"
        keeps_best = self.task.main_metric is not None and (best_dir / "config.json").is_file()
        if keeps_best:
            if self.d.rank == 0:
                atomic_save_dir(lambda tmp: shutil.copytree(best_dir, tmp, dirs_exist_ok=True), export_dir)
        else:
            with self.engine.full_weights():
                if self.d.rank == 0:
                    atomic_save_dir(lambda tmp: self.task.export(self.engine.module, tmp), export_dir)
        self.d.barrier()
        if self.task.main_metric is not None and (best_dir / "eval_metrics.json").is_file():
            saved = json.loads((best_dir / "eval_metrics.json").read_text())
            return {k: v for k, v in saved.items() if k != "step"}
        return self.state.last_eval

    def summary(self, best_eval: dict[str, Any]) -> dict[str, Any]:
        st, plan = self.state, self.plan
        latest = ckpt.find_latest(self.run_dir)
        out: dict[str, Any] = {
            "status": "completed", "task": self.job.task.name, "steps": st.step,
            "steps_this_start": st.step - self.start_step, "resumed_from": self.resumed_from,
            "world_size": self.d.world_size, "global_batch_size": plan.global_batch_size,
            "micro_batch_size_per_gpu": plan.micro_batch_size_per_gpu, "grad_accum_steps": self.accum,
            "skipped_steps": st.skipped_steps, "rollbacks": st.rollbacks, "skipped_checkpoints": self.skipped_ckpts,
            "universal_conversion_s": self.conversion_s,
            "tokens_per_s": (self.run_tokens / self.run_time) if self.run_time > 0 else None,
            "time_to_first_step_s": self.first_step_s, "wall_time_s": time.perf_counter() - self.t_start,
            "final_train": st.last_metrics, "final_eval": _scalars(best_eval),
            "checkpoint": str(latest.path) if latest else None,
            "export": str(self.run_dir / "export"), "run_dir": str(self.run_dir),
        }
        if self.task.main_metric is not None:
            out["main_metric"] = self.task.main_metric
            out["best_metric"] = st.best_metric
            out["final_eval_details"] = {k: v for k, v in best_eval.items() if isinstance(v, dict)}
        return out


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def _build_engine(model, plan, device, ds_config):
    from orchestrator.worker.engine import build_engine

    return build_engine(model, plan, device, ds_config)


def run(plan_dict: dict[str, Any], reporter: Optional[Reporter] = None, interactive: bool = False,
        parent_pid: Optional[int] = None, ray_worker: bool = False) -> dict[str, Any]:
    """Train from the plan dict (the launchers' entry). Returns the summary on rank 0. The worker holds the run dir
    (shared) while it trains; with parent_pid it stops at its next step once that parent is gone. A Ray Train CPU
    worker (ray_worker) first pins itself to cores of its own where that is safe, a GPU worker to its GPU's NUMA
    cores (worker/affinity.py).

    SIGTERM (launcher=local) saves a checkpoint at the end of the current step and returns status "preempted".
    """
    from orchestrator.logs import pin_cpu_accelerator, quiet_libraries
    from orchestrator.run_lock import worker_hold

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    plan = JobPlan.from_dict(plan_dict)
    if not plan.job.compute.use_gpu:
        pin_cpu_accelerator()
    quiet_libraries(plan.job.verbose)
    affinity, compute = None, plan.job.compute
    if ray_worker and not compute.use_gpu and compute.pin_cpu_workers:
        from orchestrator.worker.affinity import pin_ray_cpu_worker

        affinity = pin_ray_cpu_worker(compute.cpus_per_worker)
    elif compute.use_gpu and compute.gpu_numa_binding != "none":
        from orchestrator.worker.affinity import pin_gpu_worker

        affinity = pin_gpu_worker(compute.gpu_numa_binding, ray_worker)
    previous = install_sigterm()
    try:
        with worker_hold(plan.run_dir):
            return Trainer(plan, reporter, interactive, parent_pid=parent_pid, affinity=affinity).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
