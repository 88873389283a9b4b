"""Ray CPU workers pin themselves to cores of their own only when their job holds every Ray CPU of the node
(orchestrator/worker/affinity.py); the run's metrics.jsonl records each rank's decision."""

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
