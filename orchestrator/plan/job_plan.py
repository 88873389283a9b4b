"""Plan stage: validate a JobConfig and resolve it into a frozen, JSON round-trippable JobPlan (no torch/ray)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator.config.schema import JobConfig, check_job, to_job_config
from orchestrator.errors import ConfigError
from orchestrator.plan.batch import BatchPlan, check_elastic_range, resolve_batch
from orchestrator.plan.deepspeed_config import render_deepspeed_config

@dataclass(frozen=True)
class DatasetStats:
    """What the driver learnt while preparing the data: sizes the step arithmetic needs."""

    train_rows: int
    eval_rows: int
    train_tokens: int
    vocab_size: int
    data_dir: str
    tokenizer_dir: str
    most_frequent_token_id: int = -1
    labels: Optional[list] = None
    model_config_dir: Optional[str] = None

    @staticmethod
    def of(prepared: Any) -> "DatasetStats":
        """From what a data preparation returned (pretraining or fine-tuning): the fields both share."""
        names = [f.name for f in dataclasses.fields(DatasetStats)]
        return DatasetStats(**{n: getattr(prepared, n) for n in names if hasattr(prepared, n)})


@dataclass(frozen=True)
class JobPlan:
    config: dict[str, Any]
    run_dir: str
    world_size: int
    num_nodes: int
    workers_per_node: int
    micro_batch_size_per_gpu: int
    grad_accum_steps: int
    global_batch_size: int
    max_seq_length: int
    tokens_per_step: int
    total_steps: int
    warmup_steps: int
    steps_per_epoch: Optional[int]
    deepspeed_config: dict[str, Any]
    dataset: Optional[dict[str, Any]] = None
    memory: Optional[dict[str, Any]] = None
    cost: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)
    grad_accum_by_world: Optional[dict[str, int]] = None
    """Elastic ranges: gradient accumulation at each world size of the range (JSON keys are strings)."""

    @property
    def job(self) -> JobConfig:
        return to_job_config(self.config)

    def grad_accum_at(self, world_size: int) -> int:
        """The accumulation a worker group of `world_size` runs with: the plan's, or its elastic table's."""
        if self.grad_accum_by_world is not None and str(world_size) in self.grad_accum_by_world:
            return int(self.grad_accum_by_world[str(world_size)])
        if world_size != self.world_size:
            raise ConfigError("compute.max_workers", f"the plan has no batch for world size {world_size}"
                              f" (planned: {self.world_size}{', elastic ' + ', '.join(self.grad_accum_by_world) if self.grad_accum_by_world else ''})")
        return self.grad_accum_steps

    def deepspeed_config_at(self, world_size: int) -> dict[str, Any]:
        """The rendered DeepSpeed config with the batch fields of `world_size` (micro and global stay)."""
        return {**self.deepspeed_config, "train_batch_size": self.global_batch_size,
                "train_micro_batch_size_per_gpu": self.micro_batch_size_per_gpu,
                "gradient_accumulation_steps": self.grad_accum_at(world_size)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "JobPlan":
        return JobPlan(**d)

    @staticmethod
    def from_json(text: str) -> "JobPlan":
        return JobPlan.from_dict(json.loads(text))

    def write(self, run_dir: str | os.PathLike) -> Path:
        """Atomic write of plan.json into the run dir."""
        from orchestrator.io import write_text_atomic

        return write_text_atomic(Path(run_dir) / "plan.json", self.to_json())

    def summary_lines(self) -> list[str]:
        j = self.config
        lines = [
            f"run dir            {self.run_dir}",
            f"model              {j['model']['name']}: {j['model']['num_hidden_layers']} layers x {j['model']['hidden_size']}"
            f" hidden x {j['model']['num_attention_heads']} heads",
            _task_line(j["task"], self.dataset),
            f"launcher           {j['launcher']['name']}, engine {j['engine']['backend']}"
            + (f" ZeRO-{j['engine']['zero_stage']}" if j['engine']['backend'] == 'deepspeed' else ""),
            f"world              {self.num_nodes} node(s) x {self.workers_per_node} worker(s) = {self.world_size}"
            f" ({'GPU' if j['compute']['use_gpu'] else 'CPU'})",
            f"batch              global {self.global_batch_size} = micro {self.micro_batch_size_per_gpu}"
            f" x accum {self.grad_accum_steps} x world {self.world_size}",
            f"tokens/step        <= {self.tokens_per_step:,} (global batch x seq {self.max_seq_length})",
            f"steps              {self.total_steps:,} (warmup {self.warmup_steps:,})"
            + (f", {self.steps_per_epoch:,} per epoch" if self.steps_per_epoch else ""),
            f"token budget       <= {self.tokens_per_step * self.total_steps:,} tokens",
        ]
        if self.dataset:
            d = self.dataset
            lines.append(
                f"data               {d['train_rows']:,} train rows ({d['train_tokens']:,} tokens),"
                f" {d['eval_rows']:,} eval rows, vocab {d['vocab_size']:,}"
            )
        on_gpu = j["compute"]["use_gpu"]
        if self.memory:
            m = self.memory
            parts = (f"(params {m['params_bytes'] / 2**30:.2f}, grads {m['gradients_bytes'] / 2**30:.2f},"
                     f" optimizer {m['optimizer_bytes'] / 2**30:.2f}, activations {m['activations_bytes'] / 2**30:.2f})")
            if on_gpu:
                lines.append(f"memory/GPU         {m['total_gib']:.2f} GiB est. {parts} of"
                             f" {j['compute']['gpu_memory_gib']:g} GiB {j['compute']['gpu_type']}")
            else:  # no GPU in this job: the same estimate is host memory per worker, with no device to fill
                lines.append(f"memory/worker      {m['total_gib']:.2f} GiB est. of host memory {parts}")
        if self.cost:
            c = self.cost
            price = f", cost {c['cost']:,.0f}" if c.get("cost") is not None else ""
            # the estimate is for GPUs: say so, and for a CPU job that it is not this job's hardware
            where = "on" if on_gpu else "if run on"
            lines.append(
                f"time estimate      {c['hours']:,.2f} h, {c['gpu_hours']:,.1f} GPU-hours {where} {c['num_gpus']} x"
                f" {c['gpu_type']} at {c['mfu']:.0%} MFU ({c['flops_per_token']:.3e} FLOPs/token){price}"
            )
        lines.extend(f"note               {n}" for n in self.notes)
        return lines


def _task_line(t: dict[str, Any], dataset: Optional[dict[str, Any]]) -> str:
    if t["name"] == "pretrain":
        pair = ", sop=True" if t.get("sop") else ""
        return f"task               pretrain (masking={t['masking']}, nsp={t['nsp']}{pair}, packing={t['packing']})"
    src = f"synthetic {t['synthetic']}" if t["synthetic"] else f"{t['train_file']} -> {t['eval_file']}"
    labels = f", {len(dataset['labels'])} labels" if dataset and dataset.get("labels") else ""
    return f"task               {t['name']} ({src}{labels})"


def check_run_dir(run_dir: str) -> None:
    """Refuse a run dir we cannot create or write, before any worker starts."""
    p = Path(run_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("run_dir", f"cannot write to '{run_dir}': {exc.strerror or exc}") from None


def plan_batch(cfg: JobConfig) -> tuple[BatchPlan, Optional[dict[int, int]]]:
    """World size and batch arithmetic (and the elastic range's accumulation per size): needs no data, so the
    CLI checks it before any tokenising."""
    world_size = cfg.compute.world_size()  # elastic: the plan is made for the largest group
    elastic_accum = None
    if cfg.compute.max_workers is not None and cfg.compute.min_workers is not None:
        elastic_accum = check_elastic_range(
            cfg.train.global_batch_size, cfg.train.micro_batch_size_per_gpu, cfg.compute.min_workers, world_size
        )
    batch = resolve_batch(
        cfg.train.micro_batch_size_per_gpu, cfg.train.grad_accum_steps, cfg.train.global_batch_size, world_size
    )
    t = cfg.task
    if t.name == "embed" and t.hard_negatives == 0:
        # (elastic: the smallest group decides)
        sharing = (cfg.compute.min_workers or world_size) if t.gather_negatives else 1
        if batch.micro_batch_size_per_gpu * sharing < 2:
            raise ConfigError("train.micro_batch_size_per_gpu",
                              f"task=embed ranks each query's passage against the other passages of its batch: a batch"
                              f" of {batch.micro_batch_size_per_gpu * sharing} has none; raise the micro batch (or give"
                              f" task.hard_negatives)")
    return batch, elastic_accum


def _host_memory_gib(cfg: JobConfig) -> Optional[float]:
    """Memory of a node running CPU workers: compute.host_memory_gib, else this machine's when the job runs here
    (launcher=local, or a Ray this command starts); None when it runs on a cluster we cannot see from here."""
    if cfg.compute.host_memory_gib is not None:
        return cfg.compute.host_memory_gib
    here = cfg.launcher.name == "local" or (cfg.launcher.address is None and not os.environ.get("RAY_ADDRESS"))
    if not here:
        return None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _check_host_memory(cfg: JobConfig, memory: dict[str, Any]) -> None:
    """CPU workers: a node's workers together must fit its memory (a 100,000-layer model is refused here)."""
    host = None if cfg.compute.use_gpu else _host_memory_gib(cfg)
    per_node = memory["total_bytes"] * cfg.compute.resolved_workers_per_node() / 2**30
    if host is not None and per_node > host:
        raise ConfigError(
            "compute.host_memory_gib",
            f"estimated {per_node:.1f} GiB for the {cfg.compute.resolved_workers_per_node()} CPU worker(s) of a node"
            f" exceeds its {host:.1f} GiB (compute.host_memory_gib; null = this machine's when the job runs here):"
            " lower the micro batch or the model size, or enable engine.activation_checkpointing",
        )


def warmup_steps(schedule_cfg, total_steps: int) -> int:
    """The lr warmup in optimizer steps: schedule.warmup_steps (at most the run), else warmup_ratio of the run."""
    if schedule_cfg.warmup_steps is not None:
        return min(schedule_cfg.warmup_steps, total_steps)
    return int(round(schedule_cfg.warmup_ratio * total_steps))


def build_plan(cfg: JobConfig, dataset: Optional[DatasetStats] = None) -> JobPlan:
    """Resolve world size, batch arithmetic, total steps and the DeepSpeed config."""
    check_job(cfg)
    if not cfg.run_dir:
        raise ConfigError("run_dir", "no run dir set")
    batch, elastic_accum = plan_batch(cfg)
    seq = cfg.task.max_seq_length
    tokens_per_step = batch.global_batch_size * seq
    notes: list[str] = []
    if dataset is not None and dataset.eval_rows == 0 and cfg.task.name == "pretrain":
        notes.append("no document fell into the held-out split (data.eval_fraction): no evaluation metrics")
    if elastic_accum is not None:
        notes.append(
            "elastic: world size "
            + ", ".join(f"{w} -> accum {a}" for w, a in elastic_accum.items())
            + f" (global batch {batch.global_batch_size} kept; every resize restarts from the newest checkpoint)"
        )
    steps_per_epoch = None
    if dataset is not None:
        if dataset.train_rows < batch.global_batch_size:
            raise ConfigError(
                "train.global_batch_size",
                f"{batch.global_batch_size} exceeds the {dataset.train_rows} training rows of the corpus",
            )
        steps_per_epoch = dataset.train_rows // batch.global_batch_size
    tr = cfg.train
    if tr.max_steps is not None:
        total = tr.max_steps
    elif tr.epochs is not None:
        if steps_per_epoch is None:
            raise ConfigError("train.epochs", "an epoch count needs the prepared dataset (internal: no dataset stats)")
        total = max(1, math.ceil(tr.epochs * steps_per_epoch))
    else:
        assert tr.token_budget is not None
        # Packed rows are nearly full; use the measured mean when the data is prepared.
        mean_row = dataset.train_tokens / dataset.train_rows if dataset else float(seq)
        total = max(1, math.ceil(tr.token_budget / (batch.global_batch_size * mean_row)))
        notes.append(f"token_budget {tr.token_budget:,} at {mean_row:.1f} tokens/row -> {total:,} steps")
    warmup = warmup_steps(cfg.schedule, total)
    vocab = dataset.vocab_size if dataset else (cfg.tokenizer.vocab_size or 30522)
    memory, cost = _estimates(cfg, batch, vocab, total * tokens_per_step)
    ds_config = render_deepspeed_config(cfg.engine, batch, cfg.compute.use_gpu, cfg.model.hidden_size,
                                        memory["num_params"])
    if cfg.compute.use_gpu and memory["total_bytes"] > cfg.compute.gpu_memory_gib * 2**30:
        raise ConfigError(
            "train.micro_batch_size_per_gpu",
            f"estimated {memory['total_gib']:.1f} GiB per GPU exceeds compute.gpu_memory_gib="
            f"{cfg.compute.gpu_memory_gib:g}: lower the micro batch, raise engine.zero_stage or enable"
            " engine.activation_checkpointing",
        )
    _check_host_memory(cfg, memory)
    return JobPlan(
        config=dataclasses.asdict(cfg),
        run_dir=str(cfg.run_dir),
        world_size=batch.world_size,
        num_nodes=cfg.compute.num_nodes,
        workers_per_node=cfg.compute.resolved_workers_per_node(),
        micro_batch_size_per_gpu=batch.micro_batch_size_per_gpu,
        grad_accum_steps=batch.grad_accum_steps,
        global_batch_size=batch.global_batch_size,
        max_seq_length=seq,
        tokens_per_step=tokens_per_step,
        total_steps=total,
        warmup_steps=warmup,
        steps_per_epoch=steps_per_epoch,
        deepspeed_config=ds_config,
        grad_accum_by_world={str(w): a for w, a in elastic_accum.items()} if elastic_accum else None,
        dataset=dataclasses.asdict(dataset) if dataset else None,
        memory=memory,
        cost=cost,
        notes=notes,
    )


def _scores_kept(cfg: JobConfig) -> bool:
    """Whether attention keeps its s^2 score matrices for backward: eager attention (DeBERTa; `manual`, what auto
    picks on a CPU under bf16; the worker detects bf16 support, so auto on a CPU counts them unless bf16 is off) and
    SDPA's math kernel do; the fused SDPA kernels do not."""
    from orchestrator.model.families import family_of

    kernel = cfg.engine.attention
    if not family_of(cfg.model.family).sdpa or kernel in ("manual", "math"):
        return True
    return kernel == "auto" and not cfg.compute.use_gpu and cfg.engine.bf16 is not False


def _estimates(cfg: JobConfig, batch: BatchPlan, vocab_size: int, tokens: int) -> tuple[dict, dict]:
    """Per-GPU memory (ZeRO stage, offload, activations) and the time/cost of the job's token budget."""
    from orchestrator.plan.memory import estimate_memory, estimate_time_cost, flops_per_token

    m, e, t = cfg.model, cfg.engine, cfg.task
    precision = "bf16" if e.bf16 or (e.bf16 is None and cfg.compute.use_gpu) else "fp16" if e.fp16 else "fp32"
    counted = None
    if m.family != "bert" or t.objective == "rtd" or t.sbo:  # BERT's closed form does not describe these models
        from orchestrator.model.families import counted_parameters

        counted = counted_parameters(m, t, vocab_size)
    mem = estimate_memory(
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        intermediate_size=m.intermediate_size,
        num_attention_heads=m.num_attention_heads,
        vocab_size=vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=m.type_vocab_size,
        zero_stage=e.zero_stage,
        world_size=batch.world_size,
        precision=precision,
        offload_optimizer=e.offload_optimizer,
        offload_param=e.offload_param,
        optimizer=cfg.optim.name,
        micro_batch_size=batch.micro_batch_size_per_gpu,
        seq_length=t.max_seq_length,
        activation_checkpointing=e.activation_checkpointing,
        flash_attention=not _scores_kept(cfg),
        masked_fraction=t.mlm_probability,
        sparse_mlm=True,
        counted=counted,
        on_gpu=cfg.compute.use_gpu,
    ).to_dict()
    from orchestrator.model.families import LAST_LAYER_AT

    fpt = flops_per_token(
        m.hidden_size, m.num_hidden_layers, m.intermediate_size, t.max_seq_length, vocab_size,
        masked_fraction=t.mlm_probability, sparse_mlm=True, training=True, with_nsp=t.nsp or t.sop,
        # what PretrainingModel runs: the last layer only where the loss reads it (RTD and distillation read all)
        last_layer_at_loss=m.family in LAST_LAYER_AT and t.objective == "mlm" and not t.distill_from,
    )
    cost = estimate_time_cost(
        tokens, fpt, cfg.compute.gpu_type, batch.world_size, mfu=cfg.compute.mfu,
        price_per_gpu_hour=cfg.compute.price_per_gpu_hour, precision="bf16" if precision == "fp32" else precision,
    )
    cost["flops_per_token"] = fpt
    cost["tokens"] = tokens
    return mem, cost
