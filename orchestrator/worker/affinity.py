"""Worker stage: Ray CPU workers pinned to cores of their own when the job holds the whole node.

Why: Ray gives a worker a CPU *count*, not cores, so the kernel moves each rank's thread between the node's
cores, and two ranks sometimes share one core while another idles. Each rank of a data-parallel step
waits for the slowest at every collective, so any such stall holds back every rank. On the bench's 2-core node
(bench/README.md, 2 workers x 1 thread, ZeRO-2, mini shape), pinning each rank to its own core made (c) 2%
faster: the median over 9 pairs of interleaved 40-step blocks, pinned and not, in one run. A small gain; the
slow stretches of that node are its cores slowing, and pinning does not remove them.

When: pinning is safe only if no other job's workers can be given the same cores. So a worker pins itself
only when this job's workers on its node reserve every CPU Ray counts on that node (all live Ray
nodes at the worker's IP, as Ray Train counts local ranks per IP). Then Ray schedules no
other CPU task or actor there while they run. The process must also be allowed on at least that many cores.
Local rank r then takes cores [r*c, (r+1)*c) of the cores it may use, where c = compute.cpus_per_worker. In
every other case (a node shared with other jobs' workers, or fewer usable cores) nothing is pinned, and the
reason is recorded. GPU workers are not pinned here: their cores should follow their GPU's NUMA node, which
this machine cannot test (no GPU).

The first record in metrics.jsonl, the `cpu_affinity` event, shows what every rank decided.
"""

from __future__ import annotations

import os
from typing import Any, Optional


def choose_cores(allowed: list[int], local_rank: int, local_world_size: int, cpus_per_worker: int,
                 node_cpus: Optional[float]) -> tuple[Optional[list[int]], str]:
    """The cores local rank `local_rank` pins to, or None, with the reason either way."""
    need = local_world_size * cpus_per_worker
    if node_cpus is None:
        return None, "the node's Ray CPU count is unknown"
    if int(node_cpus) != need:
        return None, (f"this job's {local_world_size} workers x {cpus_per_worker} CPUs reserve {need} of the node's"
                      f" {node_cpus:g} Ray CPUs: other work may run on its cores")
    if len(allowed) < need:
        return None, f"the worker may run on {len(allowed)} cores, fewer than the {need} its node's workers reserve"
    cores = sorted(allowed)[local_rank * cpus_per_worker:(local_rank + 1) * cpus_per_worker]
    return cores, f"the job's {local_world_size} workers reserve all {need} Ray CPUs of the node"


def pin_process(cores: list[int]) -> list[int]:
    """Every thread of this process (Ray's, gloo's, torch's) on `cores`; threads started later inherit it from
    their creator. Returns the calling thread's affinity as the kernel reports it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (OSError, ValueError):  # a thread that exited meanwhile
            pass
    return sorted(os.sched_getaffinity(0))


def pin_ray_cpu_worker(cpus_per_worker: int) -> dict[str, Any]:
    """Called once by each Ray Train CPU worker before training starts (trainer.run). Returns what it decided, as a
    record."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    local_rank, local_world = ctx.get_local_rank(), ctx.get_local_world_size()
    rec: dict[str, Any] = {"rank": ctx.get_world_rank(), "local_rank": local_rank, "pid": os.getpid()}
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return {**rec, "cores": None, "why": "this OS has no per-thread CPU affinity (Linux only)"}
    # Ray Train numbers local ranks per IP, so "the node" is every live Ray node at this worker's IP (a test
    # cluster can start several on one host); their CPUs together are what the local ranks could share
    node_id = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    ip = next((n.get("NodeManagerAddress") for n in nodes if n.get("NodeID") == node_id), None)
    node_cpus = (sum(n.get("Resources", {}).get("CPU", 0.0) for n in nodes if n.get("NodeManagerAddress") == ip)
                 if ip is not None else None)
    cores, why = choose_cores(sorted(os.sched_getaffinity(0)), local_rank, local_world, cpus_per_worker, node_cpus)
    return {**rec, "cores": pin_process(cores) if cores is not None else None, "why": why}
