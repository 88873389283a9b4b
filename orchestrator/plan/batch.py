"""Plan stage: batch arithmetic, global = micro x accum x world_size, given any two derive the third."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size_per_gpu: int
    grad_accum_steps: int
    global_batch_size: int
    world_size: int


def resolve_batch(
    micro_batch_size_per_gpu: int | None,
    grad_accum_steps: int | None,
    global_batch_size: int | None,
    world_size: int,
) -> BatchPlan:
    """Fill in the one missing value of (micro, accum, global); refuse values that do not divide."""
    if world_size < 1:
        raise ConfigError("compute.workers_per_node", f"world size must be >= 1, got {world_size}")
    for key, val in (
        ("train.micro_batch_size_per_gpu", micro_batch_size_per_gpu),
        ("train.grad_accum_steps", grad_accum_steps),
        ("train.global_batch_size", global_batch_size),
    ):
        if val is not None and val < 1:
            raise ConfigError(key, f"must be a positive integer, got {val}")
    given = sum(v is not None for v in (micro_batch_size_per_gpu, grad_accum_steps, global_batch_size))
    if given < 2:
        raise ConfigError(
            "train.global_batch_size",
            "give at least two of micro_batch_size_per_gpu, grad_accum_steps, global_batch_size",
        )
    micro, accum, glob = micro_batch_size_per_gpu, grad_accum_steps, global_batch_size
    if glob is None:
        glob = micro * accum * world_size  # type: ignore[operator]
    elif accum is None:
        if glob % (micro * world_size):  # type: ignore[operator]
            raise ConfigError(
                "train.global_batch_size",
                f"{glob} is not divisible by micro_batch_size_per_gpu x world_size = {micro} x {world_size}"
                + _divisible_hint(glob, micro, world_size),  # type: ignore[arg-type]
            )
        accum = glob // (micro * world_size)  # type: ignore[operator]
    elif micro is None:
        if glob % (accum * world_size):
            raise ConfigError(
                "train.global_batch_size",
                f"{glob} is not divisible by grad_accum_steps x world_size = {accum} x {world_size}",
            )
        micro = glob // (accum * world_size)
    elif micro * accum * world_size != glob:
        raise ConfigError(
            "train.global_batch_size",
            f"{glob} != micro_batch_size_per_gpu x grad_accum_steps x world_size = {micro} x {accum} x {world_size}",
        )
    return BatchPlan(micro, accum, glob, world_size)  # type: ignore[arg-type]


def _divisible_hint(global_batch_size: int, micro: int, world_size: int) -> str:
    """What to change so that micro x world_size divides the global batch: a smaller micro batch, or a larger global."""
    options = []
    if global_batch_size % world_size == 0:
        per_worker = global_batch_size // world_size
        fitting = max(d for d in range(1, min(micro, per_worker) + 1) if per_worker % d == 0)
        options.append(f"train.micro_batch_size_per_gpu={fitting}")
    step = micro * world_size
    options.append(f"train.global_batch_size={-(-global_batch_size // step) * step}")
    return ": set " + " or ".join(options)


def check_elastic_range(global_batch_size: int, micro_batch_size_per_gpu: int, min_workers: int, max_workers: int) -> dict[int, int]:
    """{world size: grad accum} for every size in [min, max]; refuses a range holding sizes that break the batch."""
    bad = [w for w in range(min_workers, max_workers + 1) if global_batch_size % (micro_batch_size_per_gpu * w)]
    if bad:
        raise ConfigError(
            "train.global_batch_size",
            f"{global_batch_size} cannot be kept at world size(s) {bad} of compute.min_workers..max_workers ="
            f" {min_workers}..{max_workers} with micro_batch_size_per_gpu {micro_batch_size_per_gpu}"
            " (global must be divisible by micro x world for every size in the range)",
        )
    return {w: global_batch_size // (micro_batch_size_per_gpu * w) for w in range(min_workers, max_workers + 1)}
