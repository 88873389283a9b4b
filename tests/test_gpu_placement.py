"""The GPU-cluster path, proven without a GPU: a 2-node x 4-GPU plan placed on a simulated Ray cluster.

Ray nodes can advertise GPUs they do not have. A `ray.cluster_utils.Cluster` (a CPU-less head plus two nodes
with `num_gpus=4`, each on its own loopback address so Ray Train sees two hosts) receives the worker group that
`launch_ray` would start for `compute=gpu_4x8` shrunk to 2 nodes x 4 GPUs: the ScalingConfig and RunConfig
(worker_runtime_env included) come from `orchestrator.launch.ray_train.trainer_configs(plan)`, the function
`launch_ray` itself uses. Only the train function (a probe that never touches CUDA) and the process-group backend
differ: Ray Train would pick NCCL for GPU workers and this CPU build of torch has no NCCL, so the probe runs with
`TorchConfig(backend="gloo")`.

The driver runs in a subprocess (this file run as a script), so the probe is pickled by value and the session's
own Ray instance (the `ray_cluster` fixture) is never touched; the cluster is started and shut down by the test.
Every worker writes one JSON record into a shared directory (all simulated nodes are this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose

NODES, GPUS_PER_NODE = 2, 4
NODE_IPS = [f"127.0.0.{i + 2}" for i in range(NODES)]  # one loopback address per simulated host
PLAN_OVERRIDES = [
    "experiment=none", "launcher=ray", "compute=gpu_4x8",
    f"compute.num_nodes={NODES}", f"compute.gpus_per_node={GPUS_PER_NODE}", "compute.cpus_per_worker=1",
    "compute.network=infiniband", "train.micro_batch_size_per_gpu=8",
]
# What the infiniband profile must put on every worker (orchestrator/cluster/network.py).
EXPECTED_NETWORK_ENV = {
    "NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5", "NCCL_NET_GDR_LEVEL": "PHB", "NCCL_P2P_LEVEL": "NVL",
    "NCCL_IB_TIMEOUT": "22", "NCCL_IB_RETRY_CNT": "7", "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_SOCKET_IFNAME": "^docker,lo,veth,virbr",
}
ENV_KEYS = sorted({*EXPECTED_NETWORK_ENV, "OMP_NUM_THREADS", "PYTHONPATH", "HF_HUB_OFFLINE", "RANK", "LOCAL_RANK",
                   "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR"})


def probe(config: dict) -> None:
    """Train function of the probe: report where Ray Train put this worker; no CUDA call anywhere."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # one collective over all 8 ranks: the process group really spans both simulated nodes
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    # the GPU worker's NUMA binding as trainer.run calls it; Ray's GPU count of the simulated node decides the mode
    from orchestrator.worker.affinity import pin_gpu_worker

    affinity = pin_gpu_worker("exclusive", ray_worker=True)
    rec = {
        "world_rank": rank,
        "world_size": ctx.get_world_size(),
        "local_rank": ctx.get_local_rank(),
        "local_world_size": ctx.get_local_world_size(),
        "node_rank": ctx.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "env": {k: os.environ.get(k) for k in config["env_keys"]},
        "backend": dist.get_backend(),
        "all_reduce_sum": t.item(),
        "pid": os.getpid(),
        "affinity": affinity,
    }
    out = Path(config["out_dir"]) / f"rank{rank}.json"
    out.write_text(json.dumps(rec))


def drive(address: str, run_dir: str, out_dir: str) -> None:
    """Driver (subprocess): plan -> launch_ray's own configs -> TorchTrainer(probe, gloo) on the cluster."""
    import ray
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.driver import make_plan
    from orchestrator.launch.ray_train import connect, trainer_configs

    plan, _ = make_plan(compose([*PLAN_OVERRIDES, f"launcher.address={address}"]), run_dir=run_dir, prepare=False)
    assert plan.world_size == NODES * GPUS_PER_NODE and plan.job.compute.use_gpu
    connect(plan)  # the launcher's own join: launcher.address
    scaling, run_config = trainer_configs(plan)
    with open(Path(out_dir) / "configs.json", "w") as f:
        json.dump({"scaling": {"num_workers": scaling.num_workers, "use_gpu": scaling.use_gpu,
                               "resources_per_worker": scaling.resources_per_worker,
                               "placement_strategy": scaling.placement_strategy},
                   "worker_env": run_config.worker_runtime_env["env_vars"]}, f)
    t0 = time.time()
    result = TorchTrainer(
        probe,
        train_loop_config={"out_dir": out_dir, "env_keys": ENV_KEYS},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="gloo"),  # the ONLY difference from launch_ray: no NCCL in CPU torch
    ).fit()
    print(f"fit {time.time() - t0:.1f}s", flush=True)
    if result.error is not None:
        raise result.error
    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_four_gpus_one_worker_per_gpu(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    t0 = time.time()
    # placement + 8 worker actors on 2 busy cores can take longer than Ray Train's default 60 s
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    # the head gets a free dashboard port: 8265 may belong to another Ray on a shared machine
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "dashboard_port": _free_port()})
    nodes = [cluster.add_node(num_cpus=GPUS_PER_NODE, num_gpus=GPUS_PER_NODE, node_ip_address=ip) for ip in NODE_IPS]
    out_dir = tmp_path / "probe"
    out_dir.mkdir()
    try:
        cluster.wait_for_nodes()
        t_cluster = time.time()
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
        proc = subprocess.run(
            [sys.executable, __file__, "--address", cluster.address, "--run-dir", str(tmp_path / "run"),
             "--out-dir", str(out_dir)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    finally:
        cluster.shutdown()
    t_end = time.time()
    node_ids = {n.node_id: n.node_ip_address for n in nodes}

    configs = json.loads((out_dir / "configs.json").read_text())
    assert configs["scaling"] == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 1.0},
                                  "placement_strategy": "PACK"}
    recs = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["world_rank"])
    for r in recs:
        print(f"rank {r['world_rank']} local {r['local_rank']} node_rank {r['node_rank']} ip {r['node_ip']} "
              f"node {r['node_id'][:8]} ray_gpu_ids {r['ray_gpu_ids']} CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']}")
    print(f"[gpu placement] cluster up {t_cluster - t0:.1f}s, driver+probe {t_end - t_cluster:.1f}s, total {t_end - t0:.1f}s")

    # 8 workers, one per (simulated) GPU, on the two GPU nodes only (the head has no CPUs or GPUs)
    assert [r["world_rank"] for r in recs] == list(range(8))
    assert all(r["world_size"] == 8 and r["backend"] == "gloo" for r in recs)
    assert all(r["all_reduce_sum"] == sum(range(8)) for r in recs)
    assert {r["node_id"] for r in recs} == set(node_ids)
    assert all(node_ids[r["node_id"]] == r["node_ip"] for r in recs)
    # ranks contiguous per node: 0-3 on one node, 4-7 on the other; local ranks 0..3 and node ranks 0/1
    by_node: dict[str, list[dict]] = {}
    for r in recs:
        by_node.setdefault(r["node_id"], []).append(r)
    assert sorted(sorted(r["world_rank"] for r in rs) for rs in by_node.values()) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for rs in by_node.values():
        assert [r["local_rank"] for r in rs] == [0, 1, 2, 3]
        assert {r["local_world_size"] for r in rs} == {4}
        assert len({r["node_rank"] for r in rs}) == 1
        # each worker holds exactly one of its node's 4 GPUs, none shared
        assert all(len(r["ray_gpu_ids"]) == 1 for r in rs)
        assert sorted(r["ray_gpu_ids"][0] for r in rs) == ["0", "1", "2", "3"]
        # Ray 2.60's TorchTrainer shares CUDA_VISIBLE_DEVICES among a node's workers
        # (_TorchBackend.share_cuda_visible_devices=True -> AcceleratorSetupCallback sets it to the union of
        # the GPU ids of the group's workers on that node). So every worker sees "0,1,2,3", not just its own GPU
        # (NCCL needs the peers' devices visible for P2P/NVLink). ray.train.torch.get_device() picks
        # cuda:<index of its own Ray GPU id in that list>, and ranks are sorted by lowest GPU id within a node, so
        # that index equals the local rank: orchestrator/worker/trainer.py's cuda:<local_rank> is the worker's own GPU.
        for r in rs:
            assert r["cuda_visible_devices"] == "0,1,2,3"
            assert r["cuda_visible_devices"].split(",").index(r["ray_gpu_ids"][0]) == r["local_rank"]
    assert [rs[0]["node_rank"] for rs in sorted(by_node.values(), key=lambda rs: rs[0]["world_rank"])] == [0, 1]
    # the torch.distributed env Ray Train sets, agreeing with the context
    for r in recs:
        e = r["env"]
        assert (e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["NODE_RANK"]) == (
            str(r["world_rank"]), str(r["local_rank"]), "8", "4", str(r["node_rank"]))
        assert e["MASTER_ADDR"] == recs[0]["node_ip"]
    # GPU NUMA binding: each node's 4 workers hold all 4 of its Ray GPUs, so exclusive stays exclusive; each worker
    # asks torch.numa for its own device, cuda:<local rank>, which this CPU torch cannot read: it runs unpinned
    for r in recs:
        a = r["affinity"]
        assert (a["rank"], a["local_rank"], a["gpu"], a["mode"], a["cores"]) == (
            r["world_rank"], r["local_rank"], r["local_rank"], "exclusive", None), a
        assert a["why"].startswith(f"torch.numa could not place cuda:{r['local_rank']} ("), a
    # the network profile (infiniband) and the launcher's worker env reached every worker
    for r in recs:
        for k, v in EXPECTED_NETWORK_ENV.items():
            assert r["env"][k] == v, (r["world_rank"], k)
            assert configs["worker_env"][k] == v
        assert r["env"]["OMP_NUM_THREADS"] == "1" and r["env"]["HF_HUB_OFFLINE"] == "1"
        assert str(REPO) in r["env"]["PYTHONPATH"].split(os.pathsep)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    drive(a.address, a.run_dir, a.out_dir)
