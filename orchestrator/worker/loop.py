"""Worker stage: the pretraining loop — data -> model -> engine -> steps -> eval -> checkpoint -> metrics -> export."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.data.pretraining import EVAL_EPOCH, open_split
from orchestrator.plan.job_plan import JobPlan
from orchestrator.worker import checkpoint as ckpt
from orchestrator.worker.metrics import MetricsJsonl, Progress, WandbSink, write_json_atomic

log = logging.getLogger("orchestrator.worker")


class Reporter(Protocol):
    """How a launcher hears of checkpoints (Ray: ray.train.report). Called on every rank, same count."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None: ...


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @staticmethod
    def current() -> "Dist":
        if dist.is_available() and dist.is_initialized():
            return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return Dist(0, 1, 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


def collate(rows: list[dict[str, np.ndarray]], pad_id: int, nsp: bool) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest row (multiple of 8); block-diagonal attention when rows are packed."""
    longest = max(len(r["input_ids"]) for r in rows)
    T = (longest + 7) // 8 * 8
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    sequence_ids = torch.zeros((B, T), dtype=torch.long)
    mlm_labels = torch.full((B, T), -100, dtype=torch.long)
    cls_index: list[int] = []
    nsp_labels: list[int] = []
    packed = False
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.from_numpy(r["input_ids"])
        token_type_ids[b, :n] = torch.from_numpy(r["token_type_ids"])
        position_ids[b, :n] = torch.from_numpy(r["position_ids"])
        sequence_ids[b, :n] = torch.from_numpy(r["sequence_ids"])
        mlm_labels[b, :n] = torch.from_numpy(r["mlm_labels"])
        cls_index.extend(int(b * T + c) for c in r["cls_positions"])
        packed = packed or len(r["cls_positions"]) > 1
        if nsp:
            nsp_labels.extend(int(x) for x in r["nsp_labels"])
    if packed:
        same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
        real = (sequence_ids > 0)[:, :, None]
        eye = torch.eye(T, dtype=torch.bool)[None]  # padding queries attend to themselves: no empty rows
        attention_mask = ((same & real) | eye)[:, None]
    else:
        attention_mask = (sequence_ids > 0).long()
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "mlm_labels": mlm_labels,
        "n_tokens": torch.tensor(int((sequence_ids > 0).sum())),
    }
    if nsp:
        batch["cls_index"] = torch.tensor(cls_index, dtype=torch.long)
        batch["nsp_labels"] = torch.tensor(nsp_labels, dtype=torch.long)
    return batch


class StepBatches(torch.utils.data.Dataset):
    """Micro batch j of this rank, counted from the resume step: what a DataLoader prefetches."""

    def __init__(self, rows, order, plan: JobPlan, d: Dist, start_step: int, pad_id: int, nsp: bool):
        self.rows, self.order, self.plan, self.d = rows, order, plan, d
        self.start_step, self.pad_id, self.nsp = start_step, pad_id, nsp
        self.accum = plan.grad_accum_steps

    def __len__(self) -> int:
        return (self.plan.total_steps - self.start_step) * self.accum

    def __getitem__(self, j: int):
        step = self.start_step + j // self.accum
        m = j % self.accum
        idx = self.order.rank_micro_rows(step, self.d.rank, self.d.world, self.plan.micro_batch_size_per_gpu, self.accum)[m]
        epoch = self.order.epoch_of(step)
        batch = collate([self.rows.row(int(i), epoch) for i in idx], self.pad_id, self.nsp)
        batch["row_ids"] = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return batch


MODEL_KEYS = ("input_ids", "token_type_ids", "position_ids", "attention_mask", "mlm_labels", "cls_index", "nsp_labels")


def _to_model(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS if k in batch}


def evaluate(engine, rows, plan: JobPlan, d: Dist, pad_id: int, nsp: bool, mft_id: int) -> dict[str, float]:
    """Held-out MLM (and NSP) with fixed masks; every rank runs the same number of forwards (ZeRO-3 gathers)."""
    job = plan.job
    n = min(len(rows), job.data.eval_max_samples)
    micro = plan.micro_batch_size_per_gpu
    per_round = micro * d.world
    rounds = max(1, -(-n // per_round))
    sums = np.zeros(7)  # loss*count, correct, count, nsp_correct, nsp_count, mft hits, rows
    engine.module.eval()
    with torch.no_grad():
        for r in range(rounds):
            lo = r * per_round + d.rank * micro
            idx = list(range(lo, min(lo + micro, n)))
            weight = 1.0 if idx else 0.0
            batch = collate([rows.row(i, EVAL_EPOCH) for i in (idx or [0])], pad_id, nsp)
            out = engine.forward(**_to_model(batch, engine.device))
            cnt = float(out["mlm_count"])
            labels = batch["mlm_labels"]
            sums += weight * np.array(
                [
                    float(out["mlm_loss"]) * cnt,
                    float(out["mlm_correct"]),
                    cnt,
                    float(out.get("nsp_correct", 0)),
                    float(out.get("nsp_count", 0)),
                    float(((labels != -100) & (labels == mft_id)).sum()),
                    len(idx),
                ]
            )
    engine.module.train()
    s = d.sum(sums.tolist())
    res = {
        "eval_mlm_loss": s[0] / max(s[2], 1),
        "eval_mlm_acc": s[1] / max(s[2], 1),
        "eval_mlm_ppl": float(np.exp(min(s[0] / max(s[2], 1), 50.0))),
        "eval_baseline_most_frequent_acc": s[5] / max(s[2], 1),
        "eval_rows": int(s[6]),
    }
    if nsp:
        res["eval_nsp_acc"] = s[3] / max(s[4], 1)
    return res


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _load_init_weights(model, init_from: str) -> None:
    """Phase 2 from phase 1 (or any BERT dir): weights only, the optimizer starts fresh."""
    from transformers import BertForPreTraining

    from orchestrator.errors import ConfigError

    p = Path(init_from)
    src = p / "export" if (p / "export" / "config.json").is_file() else p
    if not (src / "config.json").is_file():
        raise ConfigError("train.init_from", f"'{init_from}' holds no exported model (config.json)")
    loaded = BertForPreTraining.from_pretrained(str(src), local_files_only=True)
    if loaded.config.vocab_size != model.hf.config.vocab_size or loaded.config.hidden_size != model.hf.config.hidden_size:
        raise ConfigError(
            "train.init_from",
            f"'{init_from}' has vocab {loaded.config.vocab_size} / hidden {loaded.config.hidden_size}, the job"
            f" {model.hf.config.vocab_size} / {model.hf.config.hidden_size}",
        )
    model.hf.load_state_dict(loaded.state_dict(), strict=False)


def run(plan_dict: dict[str, Any], reporter: Optional[Reporter] = None, interactive: bool = False) -> dict[str, Any]:
    """Train from the plan; resume from the newest good checkpoint in the run dir. Returns the summary (rank 0)."""
    from transformers import BertTokenizer

    from orchestrator.model.build import build_pretraining_model
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

    ds = plan.dataset
    assert ds is not None, "the driver prepares the data before building the plan"
    tokenizer = BertTokenizer.from_pretrained(ds["tokenizer_dir"], local_files_only=True)
    pad_id = tokenizer.pad_token_id
    nsp = job.task.nsp
    train_rows = open_split(ds["data_dir"], "train", job, tokenizer)
    eval_rows = open_split(ds["data_dir"], "eval", job, tokenizer)
    order = train_rows.step_order(plan.global_batch_size, job.train.seed)

    model = build_pretraining_model(job.model, ds["vocab_size"], pad_id, nsp, job.train.seed)
    if job.train.init_from:
        _load_init_weights(model, job.train.init_from)
    if job.engine.activation_checkpointing:
        model.hf.gradient_checkpointing_enable()
    if job.engine.compile:
        model.hf.bert = torch.compile(model.hf.bert)
    engine = build_engine(model, plan, device)
    torch.manual_seed(job.train.seed * 1000 + d.rank)  # dropout streams differ per rank, fixed per run

    latest = ckpt.find_latest(run_dir, warn=lambda m: log.warning(m) if d.rank == 0 else None)
    start_step = 0
    resumed_from = None
    if latest is not None:
        engine.load(latest.path)
        start_step = latest.step
        resumed_from = str(latest.path)
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
        StepBatches(train_rows, order, plan, d, start_step, pad_id, nsp),
        batch_size=None,
        shuffle=False,
        num_workers=job.data.loader_workers,
        pin_memory=use_cuda,
        prefetch_factor=4 if job.data.loader_workers > 0 else None,
        persistent_workers=False,
    )
    batches = iter(loader)
    accum = plan.grad_accum_steps
    window = np.zeros(7)  # loss sum, micro count, mlm correct, mlm count, nsp correct, nsp count, tokens
    window_t0 = time.perf_counter()
    run_tokens = 0.0
    run_time = 0.0
    last_eval: dict[str, float] = {}
    last_record: dict[str, Any] = {}
    step = start_step
    first_step_s: Optional[float] = None
    for step in range(start_step, plan.total_steps):
        step_rows: list[int] = []
        for _ in range(accum):
            batch = next(batches)
            step_rows.extend(batch["row_ids"].tolist())
            out = engine.forward(**_to_model(batch, engine.device))
            engine.backward(out["loss"])
            engine.step()
            window += [
                float(out["loss"].detach()),
                1,
                float(out["mlm_correct"]),
                float(out["mlm_count"]),
                float(out.get("nsp_correct", 0)),
                float(out.get("nsp_count", 0)),
                float(batch["n_tokens"]),
            ]
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_start
        done = step + 1
        if ledger is not None:
            ledger.write({"step": done, "rows": step_rows})
        last = done == plan.total_steps
        if done % job.train.log_every_steps == 0 or last:
            s = d.sum(window.tolist())
            elapsed = time.perf_counter() - window_t0
            run_tokens += s[6]
            run_time += elapsed
            record = {
                "step": done,
                "epoch": order.epoch_of(step),
                "consumed_samples": done * plan.global_batch_size,
                "loss": s[0] / max(s[1], 1),
                "mlm_acc": s[2] / max(s[3], 1),
                "lr": engine.lr(),
                "grad_norm": engine.grad_norm(),
                "tokens_per_s": s[6] / elapsed if elapsed > 0 else 0.0,
                "time": time.time(),
            }
            if nsp:
                record["nsp_acc"] = s[4] / max(s[5], 1)
            last_record = record
            for sink in sinks:
                sink.write(record)
            progress.update(0, {"loss": f"{record['loss']:.3f}", "acc": f"{record['mlm_acc']:.3f}"})
            window[:] = 0
            window_t0 = time.perf_counter()
        if done % job.train.eval_every_steps == 0 or last:
            last_eval = evaluate(engine, eval_rows, plan, d, pad_id, nsp, ds["most_frequent_token_id"])
            rec = {"step": done, **last_eval}
            for sink in sinks:
                sink.write(rec)
            window_t0 = time.perf_counter()  # evaluation time is not training throughput
        if done % job.train.checkpoint_every_steps == 0 or last:
            state = {
                "step": done,
                "consumed_samples": done * plan.global_batch_size,
                "epoch": order.epoch_of(step),
                "world_size": d.world,
                "global_batch_size": plan.global_batch_size,
                "seed": job.train.seed,
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
        last_eval = evaluate(engine, eval_rows, plan, d, pad_id, nsp, ds["most_frequent_token_id"])

    # export: full weights (ZeRO-3 gathers them on every rank), written by rank 0 only
    export_dir = run_dir / "export"
    with engine.full_weights():
        if d.rank == 0:
            from orchestrator.data.tokenizer import atomic_save_dir

            def save_export(tmp: Path) -> None:
                hf = engine.module.hf
                hf.save_pretrained(str(tmp), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))

            atomic_save_dir(save_export, export_dir)
    d.barrier()

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
            "final_eval": last_eval,
            "checkpoint": str(latest_ckpt.path) if latest_ckpt else None,
            "export": str(export_dir),
            "run_dir": str(run_dir),
        }
        if wandb_sink is not None:
            summary["wandb_run_id"] = wandb_sink.run_id
            wandb_sink.summary({**last_eval, "steps": plan.total_steps})
        write_json_atomic(run_dir / "summary.json", summary)
        for sink in sinks:
            sink.close()
    if ledger is not None:
        ledger.close()
    return summary
