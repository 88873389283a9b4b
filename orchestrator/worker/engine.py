"""Worker stage: the training engine — DeepSpeed ZeRO (initialised from the plan) or plain PyTorch, one interface."""

from __future__ import annotations

import abc
import contextlib
import os
import types
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from orchestrator.worker.hardware import attention_context, attention_kernel, resolve_bf16, use_attention


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights, as in BERT."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def steps_on_host(engine_cfg, device: torch.device) -> bool:
    """Whether the ZeRO optimizer steps on fp32 master weights in host memory.

    Optimizer offload puts them there. Parameter offload alone (ZeRO-3) keeps them on the worker's device: on the
    host only for a CPU worker.
    """
    return bool(engine_cfg.offload_optimizer or (engine_cfg.offload_param and device.type == "cpu"))


def build_optimizer(model: nn.Module, optim_cfg, on_host: bool = False,
                    device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    """AdamW on the host (a CPU worker, or on_host: ZeRO-Offload) is torch's fused AdamW, one vectorised ATen kernel
    over each group. On a GPU it stays foreach: fused CUDA AdamW wants each state's step on the GPU, and DeepSpeed
    0.19's universal-checkpoint load (runtime/base_optimizer.py) sets it from a CPU tensor; with no GPU here that
    path cannot be tested. With offload it is what DeepSpeedCPUAdam is, without a C++ op to JIT-build with g++ at a
    job's start (80-240 s on 2 cores): on 110M fp32 parameters, 2 threads, a step took 0.088 s against
    DeepSpeedCPUAdam's 0.108 s (AVX-512 Xeon, bench/host_adam.py). The DeepSpeed config says
    `zero_force_ds_cpu_optimizer: false` so that DeepSpeed takes it. LAMB is refused with offload at plan time (its
    per-layer trust ratio has no whole tensors in ZeRO's flat partitions)."""
    groups = param_groups(model, optim_cfg.weight_decay)
    betas = (optim_cfg.beta1, optim_cfg.beta2)
    if on_host and optim_cfg.name != "adamw":
        raise ValueError(f"ZeRO-Offload steps with AdamW; optim={optim_cfg.name} cannot run")
    if optim_cfg.name == "lamb":
        from orchestrator.worker.lamb import Lamb

        return Lamb(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps)
    # on the mini shape's 6.5M parameters, 2 threads, a fused step took 3.0-3.2 ms against foreach's 11-19 ms;
    # it is also Trainer's default optim (adamw_torch_fused)
    fused = on_host or device.type == "cpu"
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps, fused=fused, foreach=not fused)


def _nonfinite_grads(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return False
    return not bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()))


def guard_nonfinite_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make optimizer.step() a no-op (and set .overflow) when a gradient is NaN/inf.

    For DeepSpeed ZeRO stage 0 in fp32, where the client optimizer is used unwrapped: DeepSpeed's engine reads
    `optimizer.overflow` after the step and then also skips the LR scheduler and counts a skipped step, just as
    its ZeRO-1/2/3 optimizers do on a non-finite gradient norm.
    """
    inner = optimizer.step
    optimizer.overflow = False  # type: ignore[attr-defined]

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.overflow = _nonfinite_grads(params)
        if self.overflow:
            return None
        return inner(closure) if closure is not None else inner()

    # a bound method: torch's LR scheduler re-wraps optimizer.step through __func__ / __get__
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
    return optimizer


def lr_lambda_factory(schedule_name: str, warmup_steps: int, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    def make(optimizer):
        if schedule_name == "cosine":
            return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        if schedule_name == "constant":
            return get_constant_schedule_with_warmup(optimizer, warmup_steps)
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    return make


class Engine(abc.ABC):
    """What the loop needs: forward, backward, step at accumulation boundaries, save and load."""

    module: nn.Module
    device: torch.device

    @abc.abstractmethod
    def forward(self, **batch) -> dict[str, torch.Tensor]:
        ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        ...

    @abc.abstractmethod
    def step(self) -> None:
        """Called after every micro batch; the optimizer steps at the accumulation boundary.

        A boundary whose gradients are non-finite is skipped (no optimizer or LR-schedule update, gradients
        cleared): the divergence guard poisons the gradients of a step it wants skipped.
        """
        ...

    @abc.abstractmethod
    def step_applied(self) -> bool:
        """Whether the last accumulation boundary updated the weights."""
        ...

    @abc.abstractmethod
    def lr(self) -> float:
        ...

    @abc.abstractmethod
    def grad_norm(self) -> Optional[float]:
        ...

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        ...

    @abc.abstractmethod
    def load(self, directory: Path, universal: bool = False) -> None:
        ...

    @contextlib.contextmanager
    def full_weights(self):
        """Inside: self.module holds the complete weights (ZeRO-3 gathers them)."""
        yield


class TorchEngine(Engine):
    """Plain PyTorch, one process: the path to step through in a debugger."""

    def __init__(self, model: nn.Module, plan, device: torch.device):
        job = plan.job
        self.module = model.to(device)
        self.device = device
        self.accum = plan.grad_accum_steps
        self.clip = job.engine.gradient_clipping
        self.bf16 = resolve_bf16(job.engine.bf16, device)
        self.attention = attention_kernel(job.engine.attention, device, self.bf16)
        use_attention(self.module, self.attention)
        self.optimizer = build_optimizer(model, job.optim, device=device)
        self.scheduler = lr_lambda_factory(job.schedule.name, plan.warmup_steps, plan.total_steps)(self.optimizer)
        self.micro = 0
        self._grad_norm: Optional[float] = None
        self._applied = True

    def forward(self, **batch):
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx, attention_context(self.attention):
            return self.module(**batch)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum:
            return
        if _nonfinite_grads(self.module.parameters()):  # skipped step: as DeepSpeed's overflow handling
            self._applied = False
            self._grad_norm = float("inf")
            self.optimizer.zero_grad(set_to_none=True)
            return
        self._applied = True
        if self.clip > 0:
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip))
        else:
            self._grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.module.parameters() if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_applied(self):
        return self._applied

    def lr(self):
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self):
        return self._grad_norm

    def save(self, directory: Path):
        torch.save(
            {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            },
            directory / "engine_state.pt",
        )

    def load(self, directory: Path, universal: bool = False):
        state = torch.load(directory / "engine_state.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer.zero_grad(set_to_none=True)
        self.micro = 0


class DeepSpeedEngine(Engine):
    """deepspeed.initialize with the plan's rendered config; client optimizer and LR scheduler."""

    TAG = "ds"

    def __init__(self, model: nn.Module, plan, device: torch.device, ds_config: Optional[dict[str, Any]] = None):
        import deepspeed

        if device.type == "cpu":
            skip_inference_shm_op()
        defer_deepspeed_compile()
        job = plan.job
        ds_config = dict(ds_config or plan.deepspeed_config)
        if job.engine.bf16 is None:  # auto: decided by this worker's hardware
            ds_config["bf16"] = {"enabled": resolve_bf16(None, device)}
        optimizer = build_optimizer(model, job.optim, on_host=steps_on_host(job.engine, device), device=device)
        if job.engine.zero_stage == 0 and not ds_config["bf16"]["enabled"] and not ds_config["fp16"]["enabled"]:
            # ZeRO-1/2/3 (and fp16) skip non-finite steps themselves, with offload too (its host-side overflow
            # tracker); offload needs ZeRO >= 1, so the host optimizer is never wrapped here
            guard_nonfinite_step(optimizer)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_lambda_factory(job.schedule.name, plan.warmup_steps, plan.total_steps),
            config=ds_config,
        )
        self.engine = engine
        self.module = engine.module
        self.device = engine.device
        self.scheduler = scheduler
        self.zero_stage = job.engine.zero_stage
        if self.zero_stage == 3 and hasattr(self.module, "shard_teacher"):  # distillation: the frozen teacher too
            self.module.shard_teacher(ds_config)
        self.bf16 = bool(ds_config["bf16"]["enabled"])
        self.attention = attention_kernel(job.engine.attention, self.device, self.bf16)
        use_attention(self.module, self.attention)

    def forward(self, **batch):
        with attention_context(self.attention):
            return self.engine(**batch)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()

    def step_applied(self):
        return bool(self.engine.was_step_applied())

    def lr(self):
        return float(self.engine.get_lr()[0])

    def grad_norm(self):
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path):
        # every rank writes its ZeRO partition; rank 0 also the module states and `latest`
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=True)

    def load(self, directory: Path, universal: bool = False):
        """universal: load directory/ds_universal (checkpoint.ensure_universal), written at another world size.

        DeepSpeed reads `checkpoint.load_universal` only when loading, so it is set per load here: a later
        rollback to a checkpoint of the current world size loads the plain way again.
        """
        from orchestrator.worker.checkpoint import UNIVERSAL_TAG, weights_only_loads

        self.engine._config.load_universal_checkpoint = universal
        with weights_only_loads():  # DeepSpeed 0.19.8 unpickles its shards with weights_only=False
            path, _ = self.engine.load_checkpoint(
                str(directory), tag=UNIVERSAL_TAG if universal else self.TAG,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")

    @contextlib.contextmanager
    def full_weights(self):
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield


def skip_inference_shm_op() -> None:
    """No JIT build at a CPU job's start. DeepSpeed's CPU accelerator compiles its shared-memory all-reduce op
    (`deepspeed_shm_comm`, ~60 s of g++ on a fresh machine, then a ninja check at every start) when its comm
    backend starts. That op serves only `inference_all_reduce` (DeepSpeed-Inference's tensor parallelism);
    training's collectives go through torch.distributed (gloo), and without the op `inference_all_reduce` falls
    back to the process group's all_reduce. So CPU workers do not build it. (GPU accelerators have no such op.)"""
    import importlib

    # the module itself: `import deepspeed.comm.torch as m` binds torch, which deepspeed.comm re-exports as .torch
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def defer_deepspeed_compile() -> None:
    """No TorchInductor import in a worker that compiles nothing. DeepSpeed decorates its Muon kernels with
    `torch.compile` at import (`deepspeed.runtime.compiler.compile()`), and ZeRO's partitioning code imports that
    module in every ZeRO-1/2/3 job, Muon or not; building the decorator imports TorchInductor: 1.7 CPU-s per
    worker process on a 2-core CPU, before its first step. Here the decorator compiles on the first call
    instead, so the same kernels are compiled when Muon runs and nothing is imported when it does not."""
    import functools

    from deepspeed.runtime import compiler

    if getattr(compiler.compile, "deferred", False):
        return
    eager_compile = compiler.compile

    def compile():
        decorate = eager_compile()

        def deferred(fn):
            compiled = []

            @functools.wraps(fn)
            def call(*args, **kwargs):
                if not compiled:
                    compiled.append(decorate(fn))
                return compiled[0](*args, **kwargs)

            return call

        return deferred

    compile.deferred = True
    compiler.compile = compile


def build_engine(model: nn.Module, plan, device: torch.device, ds_config: Optional[dict[str, Any]] = None) -> Engine:
    if plan.job.engine.backend == "torch":
        return TorchEngine(model, plan, device)
    return DeepSpeedEngine(model, plan, device, ds_config)


def init_single_process_group() -> None:
    """DeepSpeed needs a process group even at world size 1 (Ray creates one; the local launcher does here).

    The store is an in-process HashStore, not a TCPStore on MASTER_PORT: a port picked here and bound
    later can be taken in between (and a MASTER_PORT left in os.environ is inherited by every child
    process, which then fails with EADDRINUSE while this process still holds it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
