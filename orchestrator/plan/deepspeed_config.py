"""Plan stage: render the DeepSpeed config dict from the resolved plan (no "auto", no hand-written JSON)."""

from __future__ import annotations

from typing import Any

from orchestrator.config.schema import EngineConfig
from orchestrator.plan.batch import BatchPlan


def render_deepspeed_config(engine: EngineConfig, batch: BatchPlan, use_gpu: bool, hidden_size: int) -> dict[str, Any]:
    """The optimizer and LR scheduler are client objects built in the worker, so they are not in here."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.zero_stage >= 1:
        # Bucket sizes as HF's integration derives them from the hidden size; overlap only pays on GPUs.
        zero.update(
            contiguous_gradients=True,
            overlap_comm=use_gpu,
            reduce_bucket_size=max(hidden_size * hidden_size, 500_000),
        )
    if engine.zero_stage >= 2:
        zero.update(allgather_bucket_size=max(hidden_size * hidden_size, 500_000))
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
