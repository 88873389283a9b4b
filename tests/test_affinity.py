"""Ray CPU workers pin themselves to cores of their own only when their job holds every Ray CPU of the node, and
GPU workers bind to their GPU's NUMA cores (orchestrator/worker/affinity.py); the run's metrics.jsonl records each
rank's decision."""

from __future__ import annotations

import os

import pytest

from conftest import compose, read_jsonl
from orchestrator.worker.affinity import choose_cores


def test_a_job_holding_the_whole_node_gives_each_local_rank_its_own_cores():
    assert choose_cores([0, 1], 0, 2, 1, 2.0)[0] == [0]
    assert choose_cores([0, 1], 1, 2, 1, 2.0)[0] == [1]
    # the cores the process may use, in order, split in blocks of cpus_per_worker
    assert [choose_cores([9, 3, 5, 7], r, 2, 2, 4.0)[0] for r in (0, 1)] == [[3, 5], [7, 9]]


def test_a_node_shared_with_other_work_or_short_of_cores_is_not_pinned():
    cores, why = choose_cores([0, 1, 2, 3], 0, 2, 1, 4.0)
    assert cores is None and "reserve 2 of the node's 4 Ray CPUs" in why
    cores, why = choose_cores([0], 1, 2, 1, 2.0)
    assert cores is None and "may run on 1 cores, fewer than the 2" in why
    assert choose_cores([0, 1], 0, 2, 1, None) == (None, "the node's Ray CPU count is unknown")


JOB = ["experiment=quickstart_pretrain", "launcher=ray", "data.synthetic_documents=200", "task.max_seq_length=32",
       "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size_per_gpu=4", "train.log_every_steps=1",
       "train.eval_every_steps=2", "train.checkpoint_every_steps=2"]


def _affinity(run_dir) -> list[dict]:
    events = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "cpu_affinity"]
    assert len(events) == 1, events
    return events[0]["ranks"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="per-thread CPU affinity is Linux's")
def test_ray_workers_pin_only_when_their_job_holds_the_node(ray_cluster, tmp_path):
    """On the shared 2-CPU Ray: 2 workers x 1 CPU hold the node, so ranks 0 and 1 run on two different cores (as
    the kernel reports each worker's affinity); 1 worker holds half of it and is left to the kernel."""
    from orchestrator.driver import train

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("this machine lets the tests use fewer than 2 cores")
    train(compose([*JOB, "compute=cpu2"]), run_dir=str(tmp_path / "whole"), interactive=False)
    ranks = _affinity(tmp_path / "whole")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["cores"] for r in ranks] == [[allowed[0]], [allowed[1]]], ranks
    assert len({r["pid"] for r in ranks}) == 2

    train(compose([*JOB, "compute=cpu1"]), run_dir=str(tmp_path / "half"), interactive=False)
    (rank,) = _affinity(tmp_path / "half")
    assert rank["cores"] is None and "reserve 1 of the node's 2 Ray CPUs" in rank["why"], rank


# --------------------------------------------------------------------------- GPU workers: their GPU's NUMA cores


@pytest.fixture
def two_socket_node(monkeypatch):
    """torch.numa.binding's view of a simulated node: 2 sockets, one NUMA node each, 16 physical cores x 2
    hyperthreads per socket (cpu c and c+32 share a core), two 8-core L3 complexes per socket, GPUs 0-3 on NUMA 0
    and 4-7 on NUMA 1. Only the sysfs/CUDA readers are replaced; torch's own splitting code runs as it would."""
    from torch.numa import binding

    cpus = {0: set(range(0, 16)) | set(range(32, 48)), 1: set(range(16, 32)) | set(range(48, 64))}
    monkeypatch.setattr(binding, "_get_gpu_count", lambda: 8)
    monkeypatch.setattr(binding, "_get_numa_node_index_for_gpu_index", lambda *, gpu_index: gpu_index // 4)
    monkeypatch.setattr(binding, "_get_cpu_indices_for_numa_node_MAYBE_NOT_ALLOWED",
                        lambda *, numa_node_index: set(cpus[numa_node_index]))
    monkeypatch.setattr(binding, "_get_allowed_cpu_indices_for_current_thread", lambda: set(range(64)))
    monkeypatch.setattr(binding, "_get_logical_cpu_indices_sharing_same_physical_core_as",
                        lambda *, logical_cpu_index: {logical_cpu_index % 32, logical_cpu_index % 32 + 32})
    def l3(*, logical_cpu_index):  # the CPUs sharing its last-level cache: 8 physical cores per L3
        return {c for c in range(64) if c % 32 // 8 == logical_cpu_index % 32 // 8}

    monkeypatch.setattr(binding, "_get_logical_cpus_sharing_same_max_level_cache_as", l3)
    monkeypatch.setattr(binding, "_get_socket_index_for_cpu", lambda *, cpu_index: cpu_index % 32 // 16)
    monkeypatch.setattr(binding, "_get_systemwide_numa_node_indices", lambda: {0, 1})
    return cpus


def test_a_gpu_worker_binds_to_its_gpus_numa_node(two_socket_node):
    from orchestrator.worker.affinity import choose_gpu_cores

    for mode in ("node", "socket"):
        cores, used, why = choose_gpu_cores(5, mode, 8, 8.0)
        assert (set(cores), used) == (two_socket_node[1], mode) and why == f"cuda:5's NUMA {mode} cores"
    assert choose_gpu_cores(2, "node", 8, 8.0)[0] == sorted(two_socket_node[0])
    assert choose_gpu_cores(5, "none", 8, 8.0) == (None, "none", "compute.gpu_numa_binding=none")


def test_a_job_holding_every_gpu_of_the_node_splits_each_numa_node_among_its_gpus(two_socket_node):
    from orchestrator.worker.affinity import choose_gpu_cores

    # exclusive: NUMA 1's 16 physical cores among GPUs 4-7, 4 each, both hyperthreads of a core together
    cores, used, _ = choose_gpu_cores(5, "exclusive", 8, 8.0)
    assert used == "exclusive" and cores == [20, 21, 22, 23, 52, 53, 54, 55]
    ranks = [set(choose_gpu_cores(g, "exclusive", 8, 8.0)[0]) for g in range(8)]
    assert sum(len(r) for r in ranks) == 64 and set().union(*ranks) == set(range(64))  # disjoint, none left out
    # core-complex: one L3 complex each, taken in turn (NUMA 1 has two: cores 16-23 and 24-31)
    assert choose_gpu_cores(4, "core-complex", 8, 8.0)[0] == [*range(16, 24), *range(48, 56)]
    assert choose_gpu_cores(5, "core-complex", 8, 8.0)[0] == [*range(24, 32), *range(56, 64)]


def test_a_splitting_mode_on_a_node_shared_with_other_jobs_binds_as_node(two_socket_node):
    """4 workers of this job on a node whose Ray GPUs number 8: another job may hold the other 4 GPUs and compute
    the same split of the same cores, so this job's workers take the whole NUMA node instead."""
    from orchestrator.worker.affinity import choose_gpu_cores

    for node_gpus, held in ((8.0, "8"), (None, "an unknown number")):
        cores, used, why = choose_gpu_cores(1, "exclusive", 4, node_gpus)
        assert (set(cores), used) == (two_socket_node[0], "node")
        assert why.startswith(f"exclusive needs the job to hold every GPU of the node; its 4 workers hold 4 of {held}")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="per-thread CPU affinity is Linux's")
def test_without_a_readable_gpu_the_worker_runs_unpinned_and_says_why():
    """This CPU build of torch has no CUDA: torch.numa cannot read cuda:0's PCI address. A launcher=local GPU
    process counts the GPUs it can see as the node's (none here), so exclusive falls back to node first."""
    from orchestrator.worker.affinity import choose_gpu_cores, pin_gpu_worker

    cores, used, why = choose_gpu_cores(0, "node", 1, 1.0)
    assert cores is None and used == "node" and why.startswith("torch.numa could not place cuda:0 ("), why
    before = os.sched_getaffinity(0)
    rec = pin_gpu_worker("exclusive", ray_worker=False)
    assert {k: rec[k] for k in ("rank", "local_rank", "gpu", "mode", "cores")} == {
        "rank": 0, "local_rank": 0, "gpu": 0, "mode": "node", "cores": None}, rec
    assert "hold 1 of an unknown number" in rec["why"] and "torch.numa could not place cuda:0" in rec["why"]
    assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(not os.path.isfile("/sys/devices/system/node/node0/cpulist")
                    or not hasattr(os, "sched_setaffinity"), reason="no NUMA sysfs or per-thread CPU affinity")
def test_exclusive_binding_really_binds_every_thread_of_the_process(monkeypatch):
    """This machine's real NUMA node 0 and core siblings, two simulated GPUs on it: cuda:1's worker binds every
    thread of the process to the second half of the node's physical cores, as the kernel then reports."""
    import threading

    from torch.numa import binding

    from orchestrator.worker.affinity import choose_gpu_cores, pin_process

    allowed = set(os.sched_getaffinity(0))
    node0 = binding._get_set_of_int_from_ranges_str(open("/sys/devices/system/node/node0/cpulist").read()) & allowed
    physical = sorted({min(binding._get_logical_cpu_indices_sharing_same_physical_core_as(logical_cpu_index=c))
                       for c in node0})
    if len(physical) < 2:
        pytest.skip("NUMA node 0 lets this process use fewer than 2 physical cores")
    monkeypatch.setattr(binding, "_get_gpu_count", lambda: 2)
    monkeypatch.setattr(binding, "_get_numa_node_index_for_gpu_index", lambda *, gpu_index: 0)
    cores, used, _ = choose_gpu_cores(1, "exclusive", 2, 2.0)
    second = {c for c in node0 if min(binding._get_logical_cpu_indices_sharing_same_physical_core_as(
        logical_cpu_index=c)) in physical[len(physical) // 2:]}
    assert used == "exclusive" and set(cores) == second

    before = sorted(allowed)
    seen: list[set[int]] = []
    stop = threading.Event()
    t = threading.Thread(target=lambda: (stop.wait(), seen.append(os.sched_getaffinity(0))))
    t.start()  # a thread that exists before the binding
    try:
        assert pin_process(cores) == sorted(second)
        stop.set()
        t.join()
        assert seen == [second]
    finally:
        stop.set()
        pin_process(before)  # the test process gets its cores back
    assert sorted(os.sched_getaffinity(0)) == before
