"""Plan stage: validate a JobConfig and resolve it into a frozen, JSON round-trippable JobPlan (no torch/ray)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator.config.schema import JobConfig, to_job_config
from orchestrator.errors import ConfigError
from orchestrator.plan.batch import BatchPlan, check_elastic_range, resolve_batch
from orchestrator.plan.deepspeed_config import render_deepspeed_config

MASKING_UNITS = ("token", "whole_word", "span")
TASKS = ("pretrain", "classify", "ner", "qa")
FINETUNE_TASKS = ("classify", "ner", "qa")
SYNTHETIC_TASKS = {"consistency": "classify", "sentiment": "classify", "pair": "classify", "ner": "ner", "squad": "qa", "squad_v2": "qa"}
LAUNCHERS = ("local", "ray")
LOGGERS = ("none", "wandb")
OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("linear", "cosine", "constant")
ENGINES = ("deepspeed", "torch")
ATTENTION_KERNELS = ("auto", "default", "flash", "efficient", "math", "cudnn")
PLACEMENTS = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


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
            f" x accum {self.grad_accum_steps} x dp {self.world_size}",
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
        return f"task               pretrain (masking={t['masking']}, nsp={t['nsp']}, packing={t['packing']})"
    src = f"synthetic {t['synthetic']}" if t["synthetic"] else f"{t['train_file']} -> {t['eval_file']}"
    labels = f", {len(dataset['labels'])} labels" if dataset and dataset.get("labels") else ""
    return f"task               {t['name']} ({src}{labels})"


def validate_config(cfg: JobConfig) -> None:
    """Semantic checks that types alone cannot express. Every error names its key."""
    m, t, e, c, tr = cfg.model, cfg.task, cfg.engine, cfg.compute, cfg.train

    def choice(key: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(key, f"'{value}' is not one of {', '.join(options)}")

    choice("task.name", t.name, TASKS)
    choice("task.masking", t.masking, MASKING_UNITS)
    choice("launcher.name", cfg.launcher.name, LAUNCHERS)
    choice("logger.name", cfg.logger.name, LOGGERS)
    choice("optim.name", cfg.optim.name, OPTIMIZERS)
    choice("schedule.name", cfg.schedule.name, SCHEDULES)
    choice("engine.backend", e.backend, ENGINES)
    choice("compute.placement_strategy", c.placement_strategy, PLACEMENTS)
    choice("data.source", cfg.data.source, ("synthetic", "text", "prepared"))
    choice("tokenizer.source", cfg.tokenizer.source, ("train", "dir"))

    for key, val in (
        ("model.hidden_size", m.hidden_size),
        ("model.num_hidden_layers", m.num_hidden_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.intermediate_size", m.intermediate_size),
        ("model.max_position_embeddings", m.max_position_embeddings),
        ("task.max_seq_length", t.max_seq_length),
    ):
        if val < 1:
            raise ConfigError(key, f"must be a positive integer, got {val}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            "model.num_attention_heads", f"{m.num_attention_heads} does not divide hidden_size {m.hidden_size}"
        )
    if t.max_seq_length > m.max_position_embeddings:
        raise ConfigError(
            "task.max_seq_length",
            f"{t.max_seq_length} exceeds model.max_position_embeddings {m.max_position_embeddings}",
        )
    if t.max_seq_length < 8:
        raise ConfigError("task.max_seq_length", f"{t.max_seq_length} is too short for [CLS] A [SEP] B [SEP] samples")
    if not 0.0 < t.mlm_probability < 1.0:
        raise ConfigError("task.mlm_probability", f"must lie in (0, 1), got {t.mlm_probability}")
    for key, val in (("task.mask_replace_prob", t.mask_replace_prob), ("task.random_replace_prob", t.random_replace_prob)):
        if not 0.0 <= val <= 1.0:
            raise ConfigError(key, f"must lie in [0, 1], got {val}")
    if t.mask_replace_prob + t.random_replace_prob > 1.0 + 1e-9:
        raise ConfigError("task.random_replace_prob", "mask_replace_prob + random_replace_prob exceeds 1")
    if not 0.0 < t.span_geometric_p <= 1.0:
        raise ConfigError("task.span_geometric_p", f"must lie in (0, 1], got {t.span_geometric_p}")
    if t.span_max_length < 1:
        raise ConfigError("task.span_max_length", f"must be >= 1, got {t.span_max_length}")
    if not 0.0 <= t.short_seq_prob < 1.0:
        raise ConfigError("task.short_seq_prob", f"must lie in [0, 1), got {t.short_seq_prob}")
    for key, val in (
        ("model.hidden_dropout_prob", m.hidden_dropout_prob),
        ("model.attention_probs_dropout_prob", m.attention_probs_dropout_prob),
    ):
        if not 0.0 <= val < 1.0:
            raise ConfigError(key, f"must lie in [0, 1), got {val}")

    if e.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("engine.zero_stage", f"ZeRO stage must be 0, 1, 2 or 3, got {e.zero_stage}")
    if e.attention not in ATTENTION_KERNELS:
        raise ConfigError("engine.attention", f"must be one of {', '.join(ATTENTION_KERNELS)}, got {e.attention!r}")
    if e.attention in ("efficient", "cudnn") and not c.use_gpu:
        raise ConfigError("engine.attention", f"the {e.attention} SDPA kernel exists only on GPUs; use auto, flash or math on CPU")
    if e.bf16 and e.fp16:
        raise ConfigError("engine.fp16", "bf16 and fp16 are both on; choose one")
    if e.fp16 and not c.use_gpu:
        raise ConfigError("engine.fp16", "fp16 needs GPUs (CPU kernels lack fp16); use engine.bf16=true on CPU")
    if e.gradient_clipping < 0:
        raise ConfigError("engine.gradient_clipping", f"must be >= 0, got {e.gradient_clipping}")
    if e.offload_param and e.zero_stage != 3:
        raise ConfigError("engine.offload_param", "parameter offload needs ZeRO stage 3")
    if e.offload_optimizer and e.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer", "optimizer offload needs ZeRO stage 1-3")
    if cfg.optim.name == "lamb" and e.backend == "deepspeed" and (e.offload_optimizer or e.offload_param):
        # ZeRO-Offload steps on the host with DeepSpeedCPUAdam (DeepSpeed refuses other client optimizers there)
        raise ConfigError("engine.offload_optimizer" if e.offload_optimizer else "engine.offload_param",
                          "ZeRO-Offload steps with DeepSpeedCPUAdam, which has no LAMB: use optim=adamw")
    if cfg.optim.name == "lamb" and e.backend == "deepspeed" and e.zero_stage > 0:
        # ZeRO flattens and partitions parameters, so a per-tensor trust ratio would be computed on slices.
        raise ConfigError("optim.name", "LAMB's per-layer trust ratio needs whole tensors: use engine=zero0 with lamb")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr", f"must be > 0, got {cfg.optim.lr}")

    if c.num_nodes < 1:
        raise ConfigError("compute.num_nodes", f"must be >= 1, got {c.num_nodes}")
    if c.cpus_per_worker < 1:
        raise ConfigError("compute.cpus_per_worker", f"must be >= 1, got {c.cpus_per_worker}")
    if c.use_gpu and c.gpus_per_node < 1:
        raise ConfigError("compute.gpus_per_node", "use_gpu=true needs gpus_per_node >= 1")
    wpn = workers_per_node(cfg)
    if wpn < 1:
        raise ConfigError("compute.workers_per_node", f"the job would have zero workers (workers_per_node={wpn})")
    if c.use_gpu and wpn > c.gpus_per_node:
        raise ConfigError(
            "compute.workers_per_node", f"{wpn} workers per node but only {c.gpus_per_node} GPUs: one worker per GPU"
        )
    if c.use_gpu and c.gpus_per_node > c.max_gpus_per_node:
        raise ConfigError(
            "compute.gpus_per_node",
            f"{c.gpus_per_node} GPUs per node, but the largest node type has {c.max_gpus_per_node} (compute.max_gpus_per_node)",
        )
    from orchestrator.cluster.network import NETWORK_PROFILES

    choice("compute.network", c.network, NETWORK_PROFILES)
    if not 0.0 < c.mfu <= 1.0:
        raise ConfigError("compute.mfu", f"must lie in (0, 1], got {c.mfu}")
    if c.placement_strategy == "STRICT_PACK" and c.num_nodes > 1:
        raise ConfigError("compute.placement_strategy", "STRICT_PACK puts every worker on one node; num_nodes > 1")
    world = c.num_nodes * wpn
    if cfg.launcher.name == "local" and world != 1:
        raise ConfigError(
            "launcher.name", f"launcher=local runs one process; compute asks for {world} workers (use compute=cpu1)"
        )
    if e.backend == "torch" and world != 1:
        raise ConfigError("engine.backend", f"engine=torch is single-process; world size is {world} (use DeepSpeed)")
    if (c.min_workers is None) != (c.max_workers is None):
        raise ConfigError("compute.max_workers", "set both compute.min_workers and compute.max_workers (or neither)")
    if c.min_workers is not None and c.max_workers is not None:
        if c.min_workers < 1:
            raise ConfigError("compute.min_workers", f"must be >= 1, got {c.min_workers}")
        if c.max_workers < c.min_workers:
            raise ConfigError("compute.max_workers", f"{c.max_workers} is below compute.min_workers {c.min_workers}")
        if cfg.launcher.name != "ray":
            raise ConfigError("compute.min_workers", "an elastic worker range needs launcher=ray")
        if e.backend != "deepspeed":
            raise ConfigError("engine.backend", "an elastic worker range needs the DeepSpeed engine")
        if cfg.launcher.max_failures == 0:
            raise ConfigError(
                "launcher.max_failures",
                "elastic training restarts the worker group on every resize (a shrink counts as a failure):"
                " set launcher.max_failures > 0 or -1",
            )
        if tr.grad_accum_steps is not None:
            raise ConfigError("train.grad_accum_steps", "elastic: accumulation follows the world size; set it to null")
        if tr.micro_batch_size_per_gpu is None or tr.global_batch_size is None:
            raise ConfigError("train.micro_batch_size_per_gpu", "elastic: give micro_batch_size_per_gpu and global_batch_size")
    if c.elastic_resize_interval_s <= 0:
        raise ConfigError("compute.elastic_resize_interval_s", f"must be > 0, got {c.elastic_resize_interval_s}")
    for key in ("spike_window", "max_bad_steps_in_row"):
        if getattr(tr, key) < 1:
            raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(tr, key)}")
    if tr.max_rollbacks < 0:
        raise ConfigError("train.max_rollbacks", f"must be >= 0, got {tr.max_rollbacks}")
    if tr.spike_factor is not None and tr.spike_factor <= 1.0:
        raise ConfigError("train.spike_factor", f"must be > 1 (or null), got {tr.spike_factor}")

    budgets = [k for k in ("max_steps", "epochs", "token_budget") if getattr(tr, k) is not None]
    if len(budgets) != 1:
        raise ConfigError("train.max_steps", f"set exactly one of max_steps, epochs, token_budget (got {budgets or 'none'})")
    for key in ("max_steps", "epochs", "token_budget"):
        val = getattr(tr, key)
        if val is not None and val <= 0:
            raise ConfigError(f"train.{key}", f"must be > 0, got {val}")
    if tr.eval_every_steps is not None and tr.eval_every_steps < 1:
        raise ConfigError("train.eval_every_steps", f"must be >= 1 or null (every epoch), got {tr.eval_every_steps}")
    if t.name in FINETUNE_TASKS:
        if t.synthetic is not None:
            if t.synthetic not in SYNTHETIC_TASKS:
                raise ConfigError("task.synthetic", f"'{t.synthetic}' is not one of {', '.join(SYNTHETIC_TASKS)}")
            if SYNTHETIC_TASKS[t.synthetic] != t.name:
                raise ConfigError("task.synthetic", f"'{t.synthetic}' data is for task={SYNTHETIC_TASKS[t.synthetic]}, not {t.name}")
        else:
            for key in ("train_file", "eval_file"):
                if not getattr(t, key):
                    raise ConfigError(f"task.{key}", f"task={t.name} needs a {key.replace('_', ' ')} (or task.synthetic)")
        if t.name == "qa" and not 0 <= t.doc_stride < t.max_seq_length - t.max_query_length - 3:
            raise ConfigError("task.doc_stride", f"must lie in [0, max_seq_length - max_query_length - 3), got {t.doc_stride}")
        if t.name == "qa" and t.max_answer_length < 1:
            raise ConfigError("task.max_answer_length", f"must be >= 1, got {t.max_answer_length}")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_last"):
        if getattr(tr, key) < 1:
            raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(tr, key)}")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError("data.eval_fraction", f"must lie in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.data.source == "text" and not cfg.data.paths and t.name == "pretrain":
        raise ConfigError("data.paths", "data.source=text needs at least one file, glob or directory")
    if cfg.data.source == "synthetic" and cfg.data.synthetic_documents < 10:
        raise ConfigError("data.synthetic_documents", f"need at least 10 documents, got {cfg.data.synthetic_documents}")
    if cfg.tokenizer.source == "train" and cfg.tokenizer.vocab_size < 64:
        raise ConfigError("tokenizer.vocab_size", f"must be >= 64, got {cfg.tokenizer.vocab_size}")
    if cfg.tokenizer.source == "dir" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path", "tokenizer.source=dir needs a directory")
    if cfg.schedule.warmup_steps is not None and cfg.schedule.warmup_steps < 0:
        raise ConfigError("schedule.warmup_steps", f"must be >= 0, got {cfg.schedule.warmup_steps}")
    if not 0.0 <= cfg.schedule.warmup_ratio < 1.0:
        raise ConfigError("schedule.warmup_ratio", f"must lie in [0, 1), got {cfg.schedule.warmup_ratio}")


def workers_per_node(cfg: JobConfig) -> int:
    c = cfg.compute
    if c.workers_per_node is not None:
        return c.workers_per_node
    return c.gpus_per_node if c.use_gpu else 1


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
    world = cfg.compute.num_nodes * workers_per_node(cfg)
    elastic_accum = None
    if cfg.compute.max_workers is not None and cfg.compute.min_workers is not None:
        # elastic: the plan is made for the largest group; workers re-derive accum for the size they run at
        world = cfg.compute.max_workers
        elastic_accum = check_elastic_range(
            cfg.train.global_batch_size, cfg.train.micro_batch_size_per_gpu, cfg.compute.min_workers, world
        )
    batch = resolve_batch(
        cfg.train.micro_batch_size_per_gpu, cfg.train.grad_accum_steps, cfg.train.global_batch_size, world
    )
    return batch, elastic_accum


def build_plan(cfg: JobConfig, dataset: Optional[DatasetStats] = None) -> JobPlan:
    """Resolve world size, batch arithmetic, total steps and the DeepSpeed config."""
    validate_config(cfg)
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
    if cfg.schedule.warmup_steps is not None:
        warmup = min(cfg.schedule.warmup_steps, total)
    else:
        warmup = int(round(cfg.schedule.warmup_ratio * total))
    ds_config = render_deepspeed_config(cfg.engine, batch, cfg.compute.use_gpu, cfg.model.hidden_size)
    vocab = dataset.vocab_size if dataset else (cfg.tokenizer.vocab_size or 30522)
    memory, cost = _estimates(cfg, batch, vocab, total * tokens_per_step)
    if cfg.compute.use_gpu and memory["total_bytes"] > cfg.compute.gpu_memory_gib * 2**30:
        raise ConfigError(
            "train.micro_batch_size_per_gpu",
            f"estimated {memory['total_gib']:.1f} GiB per GPU exceeds compute.gpu_memory_gib="
            f"{cfg.compute.gpu_memory_gib:g}: lower the micro batch, raise engine.zero_stage or enable"
            " engine.activation_checkpointing",
        )
    return JobPlan(
        config=dataclasses.asdict(cfg),
        run_dir=str(cfg.run_dir),
        world_size=batch.data_parallel_size,
        num_nodes=cfg.compute.num_nodes,
        workers_per_node=workers_per_node(cfg),
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


def _estimates(cfg: JobConfig, batch: BatchPlan, vocab_size: int, tokens: int) -> tuple[dict, dict]:
    """Per-GPU memory (ZeRO stage, offload, activations) and the time/cost of the job's token budget."""
    from orchestrator.plan.memory import estimate_memory, estimate_time_cost, flops_per_token

    m, e, t = cfg.model, cfg.engine, cfg.task
    precision = "bf16" if e.bf16 or (e.bf16 is None and cfg.compute.use_gpu) else "fp16" if e.fp16 else "fp32"
    mem = estimate_memory(
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        intermediate_size=m.intermediate_size,
        num_attention_heads=m.num_attention_heads,
        vocab_size=vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=m.type_vocab_size,
        zero_stage=e.zero_stage,
        dp_size=batch.data_parallel_size,
        precision=precision,
        offload_optimizer=e.offload_optimizer,
        offload_param=e.offload_param,
        optimizer=cfg.optim.name,
        micro_batch_size=batch.micro_batch_size_per_gpu,
        seq_length=t.max_seq_length,
        activation_checkpointing=e.activation_checkpointing,
        flash_attention=True,  # SDPA: no s^2 score matrices kept
        masked_fraction=t.mlm_probability,
        sparse_mlm=True,
    ).to_dict()
    fpt = flops_per_token(
        m.hidden_size, m.num_hidden_layers, m.intermediate_size, t.max_seq_length, vocab_size,
        masked_fraction=t.mlm_probability, sparse_mlm=True, training=True, with_nsp=t.nsp,
    )
    cost = estimate_time_cost(
        tokens, fpt, cfg.compute.gpu_type, batch.data_parallel_size, mfu=cfg.compute.mfu,
        price_per_gpu_hour=cfg.compute.price_per_gpu_hour, precision="bf16" if precision == "fp32" else precision,
    )
    cost["flops_per_token"] = fpt
    cost["tokens"] = tokens
    return mem, cost
