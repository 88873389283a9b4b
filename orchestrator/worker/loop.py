"""Worker stage: the training loop — task data -> model -> engine -> steps -> eval -> checkpoint -> metrics -> export.

The loop is task-agnostic: a task (pretrain_task.PretrainTask, finetune_task.FinetuneTask) supplies the
tokenizer, the model, the batches of each step, the training stats, the evaluation and the export.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from orchestrator.plan.job_plan import JobPlan
from orchestrator.worker import checkpoint as ckpt
from orchestrator.worker.dist import Dist
from orchestrator.worker.metrics import MetricsJsonl, Progress, WandbSink, write_json_atomic

log = logging.getLogger("orchestrator.worker")


class Reporter(Protocol):
    """How a launcher hears of checkpoints (Ray: ray.train.report). Called on every rank, same count."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None: ...


class StepBatches(torch.utils.data.Dataset):
    """Micro batch j of this rank, counted from the resume step: what a DataLoader prefetches."""

    def __init__(self, source, order, plan: JobPlan, d: Dist, start_step: int, accum: Optional[int] = None):
        self.source, self.order, self.plan, self.d = source, order, plan, d
        self.start_step = start_step
        self.accum = accum or plan.grad_accum_steps  # elastic: from the world size this group runs at

    def __len__(self) -> int:
        return (self.plan.total_steps - self.start_step) * self.accum

    def __getitem__(self, j: int):
        step = self.start_step + j // self.accum
        m = j % self.accum
        idx = self.order.rank_micro_rows(step, self.d.rank, self.d.world, self.plan.micro_batch_size_per_gpu, self.accum)[m]
        batch = self.source.batch(idx, self.order.epoch_of(step))
        batch["row_ids"] = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return batch


def make_task(plan: JobPlan, d: Dist):
    if plan.job.task.name == "pretrain":
        from orchestrator.worker.pretrain_task import PretrainTask

        return PretrainTask(plan, d)
    from orchestrator.worker.finetune_task import FinetuneTask

    return FinetuneTask(plan, d)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(latest, d: Dist, seed: int, use_cuda: bool) -> str:
    """Rank-for-rank RNG streams when the world size is unchanged; else a deterministic reseed.

    After a resize rank r of the new group has no stream of its own to continue, so dropout streams restart
    from (seed, step, rank): reproducible, but not bit-identical to an uninterrupted run.
    """
    rng_file = latest.path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file() and latest.state.get("world_size") == d.world:
        st = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(st["torch"])
        if use_cuda and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"])
        return "restored"
    torch.manual_seed((seed * 1_000_003 + latest.step * 1009 + d.rank) % (2**63))
    return "reseeded"


class DivergenceError(RuntimeError):
    pass


_STOP = threading.Event()


def _install_sigterm():
    """SIGTERM (preemption) sets a flag the loop checks every step; only possible in the main thread
    (launcher=local). Under Ray the train function runs in a thread and Ray handles the signal itself."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _STOP.clear()
    return signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.set())


def _better(task, new: dict[str, Any], best: Optional[float]) -> bool:
    if task.main_metric is None or task.main_metric not in new:
        return False
    return best is None or new[task.main_metric] > best


def run(plan_dict: dict[str, Any], reporter: Optional[Reporter] = None, interactive: bool = False) -> dict[str, Any]:
    """Train from the plan; resume from the newest good checkpoint in the run dir. Returns the summary (rank 0).

    SIGTERM (launcher=local) saves a checkpoint at the end of the current step and returns status "preempted".
    """
    previous = _install_sigterm()
    try:
        return _run(plan_dict, reporter, interactive)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(plan_dict: dict[str, Any], reporter: Optional[Reporter], interactive: bool) -> dict[str, Any]:
    from orchestrator.data.tokenizer import atomic_save_dir
    from orchestrator.worker.engine import build_engine, init_single_process_group

    t_start = time.perf_counter()
    plan = JobPlan.from_dict(plan_dict)
    job = plan.job
    run_dir = Path(plan.run_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if job.engine.backend == "deepspeed":
        init_single_process_group()  # no-op under Ray, which made the group already
    d = Dist.current()
    torch.set_num_threads(max(1, job.compute.cpus_per_worker))
    use_cuda = job.compute.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    task = make_task(plan, d)
    source = task.train_source()
    order = source.step_order(plan.global_batch_size, job.train.seed)
    model = task.build_model()
    if job.train.init_from:
        task.init_weights(model, job.train.init_from)
    if job.engine.activation_checkpointing:
        task.enable_activation_checkpointing(model)
    if job.engine.compile:
        model = torch.compile(model)
    from orchestrator.plan.batch import batch_for_world
    from orchestrator.plan.deepspeed_config import with_batch
    from orchestrator.worker.faults import Faults

    tr = job.train
    # elastic: micro and global batch are fixed, accumulation follows the world size this group got
    batch_plan = batch_for_world(plan.global_batch_size, plan.micro_batch_size_per_gpu, d.world)
    accum = batch_plan.grad_accum_steps
    faults = Faults.from_env(run_dir, d.rank)
    skipped_ckpts: list[str] = []

    def warn_ckpt(msg: str) -> None:
        if d.rank == 0:
            log.warning(msg)
            skipped_ckpts.append(msg)

    # the newest good checkpoint is known before the engine exists: one written at another world size under
    # ZeRO >= 1 is converted to DeepSpeed's universal format first (DeepSpeed refuses re-sharding ZeRO state)
    latest = ckpt.find_latest(run_dir, warn=warn_ckpt)
    use_zero = job.engine.backend == "deepspeed" and job.engine.zero_stage >= 1
    conversion_s: Optional[float] = None

    def needs_universal(info) -> bool:
        return use_zero and info.state.get("world_size", d.world) != d.world

    if latest is not None and needs_universal(latest):
        _, conversion_s = ckpt.ensure_universal(latest.path, d.rank, d.barrier)
    engine = build_engine(model, plan, device, with_batch(plan.deepspeed_config, batch_plan))
    torch.manual_seed(job.train.seed * 1000 + d.rank)  # dropout streams differ per rank, fixed per run

    start_step = 0
    resumed_from = None
    best_metric: Optional[float] = None
    rng_how = None
    prior: dict[str, Any] = {}
    if latest is not None:
        engine.load(latest.path, universal=needs_universal(latest))
        start_step = latest.step
        resumed_from = str(latest.path)
        best_metric = latest.state.get("best_metric")
        prior = latest.state
        rng_how = _restore_rng(latest, d, job.train.seed, use_cuda)
        if d.rank == 0:
            log.info(
                "resumed from %s at step %d (saved at world size %s, now %d, accum %d; RNG %s%s)",
                latest.path, start_step, latest.state.get("world_size"), d.world, accum, rng_how,
                f"; universal conversion {conversion_s:.1f}s" if conversion_s else "",
            )

    sinks: list[Any] = []
    wandb_sink = None
    metrics_sink = None
    if d.rank == 0:
        metrics_sink = MetricsJsonl(run_dir / "metrics.jsonl", start_step)
        sinks.append(metrics_sink)
        if job.logger.name == "wandb":
            wandb_sink = WandbSink(run_dir, job.logger, plan_dict, job.run_name)
            sinks.append(wandb_sink)

    def event(record: dict[str, Any]) -> None:
        if metrics_sink is not None:
            metrics_sink.write({**record, "time": time.time()})

    for msg in skipped_ckpts:
        event({"event": "checkpoint_skipped", "step": start_step, "reason": msg})
    if latest is not None:
        event({
            "event": "resume", "step": start_step, "from": str(latest.path), "world_size": d.world,
            "saved_world_size": latest.state.get("world_size"), "grad_accum_steps": accum, "rng": rng_how,
            "universal_conversion_s": conversion_s,
        })

    ledger = None

    def open_ledger(step: int):
        if not tr.write_ledger:
            return None
        # rank 0 truncates every rank's file (also of ranks a resize removed) before anyone writes
        if d.rank == 0:
            (run_dir / "ledger").mkdir(exist_ok=True)
            ckpt.truncate_ledgers(run_dir, step)
        d.barrier()
        return MetricsJsonl(run_dir / "ledger" / f"rank{d.rank}.jsonl", step)

    ledger = open_ledger(start_step)
    progress = Progress(plan.total_steps, start_step, enabled=interactive and d.rank == 0)

    def make_batches(step: int):
        return iter(torch.utils.data.DataLoader(
            StepBatches(source, order, plan, d, step, accum),
            batch_size=None,
            shuffle=False,
            num_workers=job.data.loader_workers,
            pin_memory=use_cuda,
            prefetch_factor=4 if job.data.loader_workers > 0 else None,
        ))

    batches = make_batches(start_step)
    stat_keys = task.stat_keys
    window = np.zeros(3 + len(stat_keys))  # loss sum, micro count, tokens, task stats
    window_t0 = time.perf_counter()
    run_tokens = 0.0
    run_time = 0.0
    last_eval: dict[str, Any] = {}
    last_record: dict[str, Any] = {}
    first_step_s: Optional[float] = None
    eval_every = job.train.eval_every_steps or (plan.steps_per_epoch or plan.total_steps)
    skipped_steps = int(prior.get("skipped_steps", 0))
    rollbacks = int(prior.get("rollbacks", 0))
    loss_hist: deque = deque(prior.get("loss_history", []), maxlen=tr.spike_window)
    bad_in_row = 0
    bad_reasons: list[str] = []
    preempted = False

    def save_best(metrics: dict[str, Any]) -> None:
        """The best model by the task's main metric, with its eval metrics and predictions (fine-tuning)."""

        def write(tmp: Path) -> None:
            task.export(engine.module, tmp)
            write_json_atomic(tmp / "eval_metrics.json", metrics)

        with engine.full_weights():
            if d.rank == 0:
                atomic_save_dir(write, run_dir / "best")
                task.write_predictions(run_dir / "predictions_eval.jsonl")
        d.barrier()

    def save_checkpoint(done: int, step: int) -> Path:
        state = {
            "step": done,
            "consumed_samples": done * plan.global_batch_size,
            "epoch": order.epoch_of(step),
            "world_size": d.world,
            "grad_accum_steps": accum,
            "micro_batch_size_per_gpu": plan.micro_batch_size_per_gpu,
            "global_batch_size": plan.global_batch_size,
            "seed": job.train.seed,
            "best_metric": best_metric,
            "last_metrics": last_record,
            "last_eval": last_eval,
            "skipped_steps": skipped_steps,
            "rollbacks": rollbacks,
            "loss_history": list(loss_hist),
            "time": time.time(),
        }

        def write_shards(tmp: Path) -> None:
            engine.save(tmp)
            torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")

        path = ckpt.save(run_dir, done, d.rank, d.barrier, write_shards, state, job.train.keep_last)
        if reporter is not None:
            reporter.report({"step": done, **{k: v for k, v in last_record.items() if k != "time"}}, path)
        return path

    model.train()
    step = start_step
    while step < plan.total_steps:
        step_rows: list[int] = []
        step_bad = False
        reason = ""
        stop = False
        step_window = np.zeros_like(window)
        step_loss = 0.0  # mean over ranks, summed over micro batches
        for m in range(accum):
            batch = next(batches)
            step_rows.extend(batch["row_ids"].tolist())
            out = engine.forward(**task.model_inputs(batch, engine.device))
            loss = out["loss"]
            factor = faults.loss_factor(step + 1, m)
            if factor != 1.0:
                loss = loss * factor
            lv = float(loss.detach())
            finite = math.isfinite(lv)
            # one small all-reduce per micro batch: every rank takes the same skip / stop decision
            f_nonfinite, f_loss, f_stop = d.sum([0.0 if finite else 1.0, lv if finite else 0.0, float(_STOP.is_set())])
            stop = f_stop > 0
            step_loss += f_loss / d.world
            if not step_bad and tr.skip_nonfinite and f_nonfinite > 0:
                step_bad, reason = True, "non-finite loss"
            elif not step_bad and tr.spike_factor and len(loss_hist) >= min(5, tr.spike_window):
                ref = sum(loss_hist) / len(loss_hist)
                if f_loss / d.world > tr.spike_factor * ref:
                    step_bad, reason = True, f"loss spike {f_loss / d.world:.3f} > {tr.spike_factor} x {ref:.3f}"
            # a skipped step still runs backward and step (DeepSpeed's micro-step counters stay aligned) with
            # non-finite gradients: ZeRO-1/2/3 (non-finite grad norm), our stage-0 guard and TorchEngine then
            # skip the optimizer and LR-schedule update and clear the gradients
            engine.backward(loss * float("nan") if step_bad else loss)
            engine.step()
            if not step_bad:
                step_window += [lv, 1, float(batch["n_tokens"])] + [float(out[k]) for k in stat_keys]
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_start
        done = step + 1
        if step_bad and engine.step_applied():
            log.error("step %d was to be skipped but the engine applied it", done)
        if ledger is not None:
            ledger.write({"step": done, "rows": step_rows, "world_size": d.world, "grad_accum_steps": accum,
                          "skipped": step_bad, "time": time.time()})
        if step_bad:
            skipped_steps += 1
            bad_in_row += 1
            bad_reasons.append(f"step {done}: {reason}")
            event({"event": "skipped_step", "step": done, "reason": reason})
            if d.rank == 0:
                log.warning("skipped step %d: %s (%d in a row)", done, reason, bad_in_row)
            if bad_in_row >= tr.max_bad_steps_in_row:
                rollbacks += 1
                target = ckpt.find_latest(run_dir, warn=warn_ckpt)
                if rollbacks > tr.max_rollbacks or target is None:
                    why = (f"{rollbacks - 1} rollbacks allowed (train.max_rollbacks)" if target is not None
                           else "no checkpoint to roll back to")
                    raise DivergenceError(
                        f"training diverged: {bad_in_row} bad steps in a row ({'; '.join(bad_reasons[-bad_in_row:])})"
                        f" and {why}; lower optim.lr, inspect the data of these steps or raise train.spike_factor"
                    )
                t_rb = time.perf_counter()
                if needs_universal(target):
                    ckpt.ensure_universal(target.path, d.rank, d.barrier)
                engine.load(target.path, universal=needs_universal(target))
                _restore_rng(target, d, job.train.seed, use_cuda)
                step = target.step
                last_record = dict(target.state.get("last_metrics", {}))
                loss_hist = deque(target.state.get("loss_history", []), maxlen=tr.spike_window)
                skipped_steps = int(target.state.get("skipped_steps", 0)) + bad_in_row
                if d.rank == 0:
                    metrics_sink.close()
                    metrics_sink = MetricsJsonl(run_dir / "metrics.jsonl", step)
                    sinks[0] = metrics_sink
                    log.warning("rolled back from step %d to %s after %d bad steps", done, target.path, bad_in_row)
                event({"event": "rollback", "step": step, "from_step": done, "to": str(target.path),
                       "bad_steps": bad_reasons[-bad_in_row:], "rollbacks": rollbacks,
                       "seconds": time.perf_counter() - t_rb})
                if ledger is not None:
                    ledger.close()
                    ledger = open_ledger(step)
                bad_in_row = 0
                batches = make_batches(step)
                window[:] = 0
                window_t0 = time.perf_counter()
                progress.update(step - done)
                continue
        else:
            bad_in_row = 0
            window += step_window
            loss_hist.append(step_loss / accum)
        last = done == plan.total_steps
        if done % job.train.log_every_steps == 0 or last:
            s = d.sum(window.tolist())
            elapsed = time.perf_counter() - window_t0
            run_tokens += s[2]
            run_time += elapsed
            record = {
                "step": done,
                "epoch": order.epoch_of(step),
                "consumed_samples": done * plan.global_batch_size,
                "loss": s[0] / s[1] if s[1] else None,
                **task.train_record(dict(zip(stat_keys, s[3:]))),
                "lr": engine.lr(),
                "grad_norm": engine.grad_norm(),
                "tokens_per_s": s[2] / elapsed if elapsed > 0 else 0.0,
                "world_size": d.world,
                "grad_accum_steps": accum,
                "skipped_steps": skipped_steps,
                "time": time.time(),
            }
            last_record = record
            for sink in sinks:
                sink.write(record)
            progress.update(0, {"loss": f"{record['loss']:.3f}" if record["loss"] is not None else "-"})
            window[:] = 0
            window_t0 = time.perf_counter()
        if done % eval_every == 0 or last:
            model.eval()
            with torch.no_grad():
                last_eval = task.evaluate(engine)
            model.train()
            for sink in sinks:
                sink.write({"step": done, **{k: v for k, v in last_eval.items() if not isinstance(v, (dict, list))}})
            if _better(task, last_eval, best_metric):
                best_metric = float(last_eval[task.main_metric])
                save_best({"step": done, **last_eval})
            window_t0 = time.perf_counter()  # evaluation time is not training throughput
        saved = False
        if done % job.train.checkpoint_every_steps == 0 or last:
            save_checkpoint(done, step)
            saved = True
            window_t0 = time.perf_counter()
        progress.update(1)
        step = done
        if stop and not last:
            # preemption: every rank saw the same all-reduced flag, so all save here and leave together
            if not saved:
                save_checkpoint(done, step - 1)
            if d.rank == 0:
                log.warning("SIGTERM: checkpoint saved at step %d; exiting (rerun the command to resume)", done)
            event({"event": "preempted", "step": done})
            preempted = True
            break
        faults.after_step(done)
    progress.close()
    if preempted:
        out: dict[str, Any] = {}
        if d.rank == 0:
            out = {
                "status": "preempted",
                "steps": step,
                "planned_steps": plan.total_steps,
                "resumed_from": resumed_from,
                "world_size": d.world,
                "checkpoint": str(ckpt.find_latest(run_dir).path),
                "run_dir": str(run_dir),
            }
            write_json_atomic(run_dir / "summary.json", out)
            for sink in sinks:
                sink.close()
        if ledger is not None:
            ledger.close()
        return out
    if not last_eval:  # resumed at the final step: nothing ran, but the summary still reports eval metrics
        last_record = dict(latest.state.get("last_metrics", {})) if latest else {}
        model.eval()
        with torch.no_grad():
            last_eval = task.evaluate(engine)

    # export: the best model when the task keeps one (fine-tuning), else the final weights
    export_dir = run_dir / "export"
    best_dir = run_dir / "best"
    if task.main_metric is not None and (best_dir / "config.json").is_file():
        if d.rank == 0:
            import shutil

            atomic_save_dir(lambda tmp: shutil.copytree(best_dir, tmp, dirs_exist_ok=True), export_dir)
    else:
        with engine.full_weights():
            if d.rank == 0:
                atomic_save_dir(lambda tmp: task.export(engine.module, tmp), export_dir)
    d.barrier()
    best_eval = last_eval
    if task.main_metric is not None and (best_dir / "eval_metrics.json").is_file():
        best_eval = {k: v for k, v in json.loads((best_dir / "eval_metrics.json").read_text()).items() if k != "step"}

    summary: dict[str, Any] = {}
    if d.rank == 0:
        latest_ckpt = ckpt.find_latest(run_dir)
        summary = {
            "status": "completed",
            "task": job.task.name,
            "steps": step,
            "steps_this_start": step - start_step,
            "resumed_from": resumed_from,
            "world_size": d.world,
            "global_batch_size": plan.global_batch_size,
            "micro_batch_size_per_gpu": plan.micro_batch_size_per_gpu,
            "grad_accum_steps": accum,
            "skipped_steps": skipped_steps,
            "rollbacks": rollbacks,
            "skipped_checkpoints": skipped_ckpts,
            "universal_conversion_s": conversion_s,
            "tokens_per_s": (run_tokens / run_time) if run_time > 0 else None,
            "time_to_first_step_s": first_step_s,
            "wall_time_s": time.perf_counter() - t_start,
            "final_train": last_record,
            "final_eval": {k: v for k, v in best_eval.items() if not isinstance(v, (dict, list))},
            "checkpoint": str(latest_ckpt.path) if latest_ckpt else None,
            "export": str(export_dir),
            "run_dir": str(run_dir),
        }
        if task.main_metric is not None:
            summary["main_metric"] = task.main_metric
            summary["best_metric"] = best_metric
            summary["final_eval_details"] = {k: v for k, v in best_eval.items() if isinstance(v, dict)}
        if wandb_sink is not None:
            summary["wandb_run_id"] = wandb_sink.run_id
            wandb_sink.summary({**summary["final_eval"], "steps": step})
        write_json_atomic(run_dir / "summary.json", summary)
        for sink in sinks:
            sink.close()
    if ledger is not None:
        ledger.close()
    return summary
