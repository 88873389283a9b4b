"""Plan stage: render the DeepSpeed config dict from the resolved plan (no "auto", no hand-written JSON)."""

from __future__ import annotations

import math
from typing import Any

from orchestrator.config.schema import EngineConfig
from orchestrator.plan.batch import BatchPlan


# DeepSpeed's own default bucket size (elements): the most a CPU worker's single bucket holds
DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def bucket_elements(use_gpu: bool, hidden_size: int, num_params: int, zero_stage: int) -> int:
    """Elements per ZeRO gradient-reduction bucket (and ZeRO-2's parameter all-gather bucket).

    On a GPU, DeepSpeed reduces each full bucket on a side stream while backward goes on (overlap_comm), so the
    buckets are small: HF's integration's rule, hidden size squared, at least 500k. A CPU has no streams. There,
    each bucket's reduction is a blocking gloo collective in the middle of backward: every rank stops until the
    slowest one reaches the same bucket. So a CPU worker at ZeRO-1/2 reduces all its gradients in one bucket, at
    the end of backward: one rendezvous a step instead of one per bucket (14 on the bench's mini shape). The price
    is a bucket buffer the size of the gradients, counted in the plan's memory estimate. Measured on 2 CPU workers
    x 1 thread, mini shape, fp32, 150 steps: (c)/(b) 0.929 against 0.802 (bench/README.md). ZeRO-3 keeps the small
    buckets: it is picked for memory, and its own reduction path was not measured."""
    if use_gpu or zero_stage >= 3:
        return max(hidden_size * hidden_size, 500_000)
    # 5% over the plan's parameter count, so that a head it does not count still lands in the same bucket; a
    # multiple of 1024 (DeepSpeed asserts the all-gather bucket is a multiple of its alignment factor)
    return min(max(math.ceil(num_params * 1.05 / 1024) * 1024, 500_000), DEEPSPEED_DEFAULT_BUCKET)


def render_deepspeed_config(engine: EngineConfig, batch: BatchPlan, use_gpu: bool, hidden_size: int,
                            num_params: int) -> dict[str, Any]:
    """The optimizer and LR scheduler are client objects built in the worker, so they are not in here."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    bucket = bucket_elements(use_gpu, hidden_size, num_params, engine.zero_stage)
    if engine.zero_stage >= 1:
        # overlap only pays on GPUs (see bucket_elements)
        zero.update(contiguous_gradients=True, overlap_comm=use_gpu, reduce_bucket_size=bucket)
    if engine.zero_stage >= 2:
        zero.update(allgather_bucket_size=bucket)
    if engine.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
            stage3_param_persistence_threshold=10 * hidden_size,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    force = {}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        # the host optimizer is torch's fused AdamW (worker/engine.py: build_optimizer); DeepSpeed refuses any
        # client optimizer but its own DeepSpeedCPUAdam under offload unless this is off
        force["zero_force_ds_cpu_optimizer"] = False
    if engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size_per_gpu,
        "gradient_accumulation_steps": batch.grad_accum_steps,
        "gradient_clipping": float(engine.gradient_clipping),
        "zero_optimization": zero,
        **force,
        # bf16=null (auto) is resolved on the worker's own hardware (worker/hardware.py)
        "bf16": {"enabled": bool(engine.bf16)},
        "fp16": {"enabled": bool(engine.fp16), "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
