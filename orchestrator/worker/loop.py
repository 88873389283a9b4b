"""Worker stage: the training loop — task data -> model -> engine -> steps -> eval -> checkpoint -> metrics -> export.

The loop is task-agnostic: a task (pretrain_task.PretrainTask, finetune_task.FinetuneTask) supplies the
tokenizer, the model, the batches of each step, the training stats, the evaluation and the export.
"""

from __future__ import annotations

import json
import logging
import sys
import time
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

    def __init__(self, source, order, plan: JobPlan, d: Dist, start_step: int):
        self.source, self.order, self.plan, self.d = source, order, plan, d
        self.start_step = start_step
        self.accum = plan.grad_accum_steps

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


def _better(task, new: dict[str, Any], best: Optional[float]) -> bool:
    if task.main_metric is None or task.main_metric not in new:
        return False
    return best is None or new[task.main_metric] > best


def run(plan_dict: dict[str, Any], reporter: Optional[Reporter] = None, interactive: bool = False) -> dict[str, Any]:
    """Train from the plan; resume from the newest good checkpoint in the run dir. Returns the summary (rank 0)."""
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
    engine = build_engine(model, plan, device)
    torch.manual_seed(job.train.seed * 1000 + d.rank)  # dropout streams differ per rank, fixed per run

    latest = ckpt.find_latest(run_dir, warn=lambda m: log.warning(m) if d.rank == 0 else None)
    start_step = 0
    resumed_from = None
    best_metric: Optional[float] = None
    if latest is not None:
        engine.load(latest.path)
        start_step = latest.step
        resumed_from = str(latest.path)
        best_metric = latest.state.get("best_metric")
        rng_file = latest.path / f"rng_rank{d.rank}.pt"
        if rng_file.is_file() and latest.state.get("world_size") == d.world:
            st = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(st["torch"])
            if use_cuda and "cuda" in st:
                torch.cuda.set_rng_state(st["cuda"])
        if d.rank == 0:
            log.info("resumed from %s at step %d", latest.path, start_step)

    sinks: list[Any] = []
    wandb_sink = None
    if d.rank == 0:
        sinks.append(MetricsJsonl(run_dir / "metrics.jsonl", start_step))
        if job.logger.name == "wandb":
            wandb_sink = WandbSink(run_dir, job.logger, plan_dict, job.run_name)
            sinks.append(wandb_sink)
    ledger = None
    if job.train.write_ledger:
        (run_dir / "ledger").mkdir(exist_ok=True)
        ledger = MetricsJsonl(run_dir / "ledger" / f"rank{d.rank}.jsonl", start_step)
    progress = Progress(plan.total_steps, start_step, enabled=interactive and d.rank == 0)

    loader = torch.utils.data.DataLoader(
        StepBatches(source, order, plan, d, start_step),
        batch_size=None,
        shuffle=False,
        num_workers=job.data.loader_workers,
        pin_memory=use_cuda,
        prefetch_factor=4 if job.data.loader_workers > 0 else None,
    )
    batches = iter(loader)
    accum = plan.grad_accum_steps
    stat_keys = task.stat_keys
    window = np.zeros(3 + len(stat_keys))  # loss sum, micro count, tokens, task stats
    window_t0 = time.perf_counter()
    run_tokens = 0.0
    run_time = 0.0
    last_eval: dict[str, Any] = {}
    last_record: dict[str, Any] = {}
    first_step_s: Optional[float] = None
    eval_every = job.train.eval_every_steps or (plan.steps_per_epoch or plan.total_steps)

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

    model.train()
    for step in range(start_step, plan.total_steps):
        step_rows: list[int] = []
        for _ in range(accum):
            batch = next(batches)
            step_rows.extend(batch["row_ids"].tolist())
            out = engine.forward(**task.model_inputs(batch, engine.device))
            engine.backward(out["loss"])
            engine.step()
            window += [float(out["loss"].detach()), 1, float(batch["n_tokens"])] + [float(out[k]) for k in stat_keys]
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_start
        done = step + 1
        if ledger is not None:
            ledger.write({"step": done, "rows": step_rows})
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
                "loss": s[0] / max(s[1], 1),
                **task.train_record(dict(zip(stat_keys, s[3:]))),
                "lr": engine.lr(),
                "grad_norm": engine.grad_norm(),
                "tokens_per_s": s[2] / elapsed if elapsed > 0 else 0.0,
                "time": time.time(),
            }
            last_record = record
            for sink in sinks:
                sink.write(record)
            progress.update(0, {"loss": f"{record['loss']:.3f}"})
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
        if done % job.train.checkpoint_every_steps == 0 or last:
            state = {
                "step": done,
                "consumed_samples": done * plan.global_batch_size,
                "epoch": order.epoch_of(step),
                "world_size": d.world,
                "global_batch_size": plan.global_batch_size,
                "seed": job.train.seed,
                "best_metric": best_metric,
                "last_metrics": last_record,
                "last_eval": last_eval,
            }

            def write_shards(tmp: Path) -> None:
                engine.save(tmp)
                torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")

            path = ckpt.save(run_dir, done, d.rank, d.barrier, write_shards, state, job.train.keep_last)
            if reporter is not None:
                reporter.report({"step": done, **{k: v for k, v in last_record.items() if k != "time"}}, path)
            window_t0 = time.perf_counter()
        progress.update(1)
    progress.close()
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
            "steps": plan.total_steps,
            "resumed_from": resumed_from,
            "world_size": d.world,
            "global_batch_size": plan.global_batch_size,
            "micro_batch_size_per_gpu": plan.micro_batch_size_per_gpu,
            "grad_accum_steps": plan.grad_accum_steps,
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
            wandb_sink.summary({**summary["final_eval"], "steps": plan.total_steps})
        write_json_atomic(run_dir / "summary.json", summary)
        for sink in sinks:
            sink.close()
    if ledger is not None:
        ledger.close()
    return summary
