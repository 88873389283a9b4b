"""Worker stage: Ray CPU workers pinned to cores of their own when the job holds the whole node; GPU workers
bound to their GPU's NUMA node.

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
reason is recorded.

GPU workers (`compute.gpu_numa_binding`, default `node`) bind to the cores of their GPU's NUMA node, so the
host side of each step (the data loader, the optimizer's CPU work, the kernel launches) and the pinned host memory
it copies from sit next to that GPU rather than across the socket interconnect. The cores come from torch's own
NUMA binding (`torch.numa.binding`, what `torchrun --numa-binding` uses; it reads the GPU's PCI address and sysfs):
- `node`: every allowed core of the GPU's NUMA node. Safe on a shared node: other jobs' workers on that NUMA node
  may use the same cores, as the kernel would let them anyway.
- `socket`: every allowed core of the NUMA nodes of the GPU's socket.
- `exclusive`: the NUMA node's physical cores split evenly among the GPUs on it, so no two local ranks share a
  core; `core-complex`: one L3 complex (cores sharing a last-level cache) of the NUMA node per GPU, taken in turn.
  Both only when the job's workers hold every Ray GPU of the node (as for CPU pinning above); otherwise another
  job's workers could compute the same split, and the worker binds as `node`.
- `none`: placement left to the kernel.
Nothing here can stop a job: when the GPU's NUMA node cannot be read (no CUDA, no sysfs, a torch without
`torch.numa`), the worker records why and runs unpinned. The GPU decision itself cannot run on this project's
CPU machines; tests/test_affinity.py drives torch's real splitting code over a simulated two-socket, eight-GPU
node and binds a real process.

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


def _node_resource(name: str) -> Optional[float]:
    """How much of Ray resource `name` (CPU, GPU) the calling worker's node has. Ray Train numbers local ranks per
    IP, so "the node" is every live Ray node at this worker's IP (a test cluster can start several on one host);
    their resources together are what the local ranks could share. None when the node is not found."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    ip = next((n.get("NodeManagerAddress") for n in nodes if n.get("NodeID") == node_id), None)
    if ip is None:
        return None
    return sum(n.get("Resources", {}).get(name, 0.0) for n in nodes if n.get("NodeManagerAddress") == ip)


def _no_thread_affinity() -> Optional[str]:
    """Why this process cannot pin its threads, or None where it can (Linux)."""
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return "this OS has no per-thread CPU affinity (Linux only)"
    return None


def _ray_ranks() -> tuple[int, int, int]:
    """This Ray Train worker's (world rank, local rank, local world size)."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_local_world_size()


def pin_ray_cpu_worker(cpus_per_worker: int) -> dict[str, Any]:
    """Called once by each Ray Train CPU worker before training starts (trainer.run). Returns what it decided, as a
    record."""
    rank, local_rank, local_world = _ray_ranks()
    rec: dict[str, Any] = {"rank": rank, "local_rank": local_rank, "pid": os.getpid()}
    if (why := _no_thread_affinity()) is not None:
        return {**rec, "cores": None, "why": why}
    cores, why = choose_cores(sorted(os.sched_getaffinity(0)), local_rank, local_world, cpus_per_worker,
                              _node_resource("CPU"))
    return {**rec, "cores": pin_process(cores) if cores is not None else None, "why": why}


_SPLITTING_MODES = ("exclusive", "core-complex")


def choose_gpu_cores(gpu_index: int, mode: str, local_world_size: int,
                     node_gpus: Optional[float]) -> tuple[Optional[list[int]], str, str]:
    """The cores the worker driving torch device cuda:`gpu_index` binds to under `mode` (compute.gpu_numa_binding),
    or None, with the mode actually used and the reason. A splitting mode needs the job to hold every GPU of the
    node (`node_gpus`, Ray's count); otherwise it binds as `node`."""
    if mode == "none":
        return None, mode, "compute.gpu_numa_binding=none"
    used, why = mode, ""
    if mode in _SPLITTING_MODES and (node_gpus is None or int(node_gpus) != local_world_size):
        held = "an unknown number" if node_gpus is None else f"{node_gpus:g}"
        used, why = "node", (f"{mode} needs the job to hold every GPU of the node; its {local_world_size} workers"
                             f" hold {local_world_size} of {held}, so bound as node; ")
    try:
        from torch.numa import binding

        cores = binding._get_logical_cpus_to_bind_to(
            gpu_index=gpu_index, numa_options=binding.NumaOptions(affinity_mode=binding.AffinityMode(used)))
    except Exception as e:  # no CUDA, no sysfs entry, fewer cores than GPUs, a torch without torch.numa
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, used, f"{why}torch.numa could not place cuda:{gpu_index} ({type(e).__name__}: {first})"
    if not cores:
        return None, used, f"{why}none of cuda:{gpu_index}'s NUMA cores are allowed to this process"
    return sorted(cores), used, f"{why}cuda:{gpu_index}'s NUMA {used} cores"


def pin_gpu_worker(mode: str, ray_worker: bool) -> dict[str, Any]:
    """Called once by each GPU worker before training starts (trainer.run): bind every thread of the process to its
    GPU's NUMA cores (cuda:<local rank>, see tests/test_gpu_placement.py). Returns what it decided, as a record."""
    rank, local_rank, local_world = _ray_ranks() if ray_worker else (0, 0, 1)  # launcher=local: one process, cuda:0
    rec: dict[str, Any] = {"rank": rank, "local_rank": local_rank, "pid": os.getpid(), "gpu": local_rank}
    if (why := _no_thread_affinity()) is not None:
        return {**rec, "mode": mode, "cores": None, "why": why}
    if ray_worker:
        node_gpus = _node_resource("GPU")
    else:  # the node's GPUs are those the process can see
        import torch

        node_gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else None
    cores, used, why = choose_gpu_cores(local_rank, mode, local_world, node_gpus)
    return {**rec, "mode": used, "cores": pin_process(cores) if cores is not None else None, "why": why}
