"""Cluster doctor: start a Ray Train worker group and check hosts, GPUs, topology and all-reduce bandwidth.

    python -m orchestrator.doctor --num-workers 2                       # local Ray, CPU workers, gloo
    python -m orchestrator.doctor --num-workers 16 --use-gpu --network infiniband --address auto

Each worker reports its hostname and GPUs, runs ``nvidia-smi topo -m`` and ``ibstat`` when present (parsed with
``orchestrator.cluster.topology``), names the cores of its GPU's NUMA node that a job's worker would bind to
(``compute.gpu_numa_binding=node``, orchestrator/worker/affinity.py; a note says why when there are none), then
times ``all_reduce`` over several message sizes on the process group Ray Train created (NCCL on GPU, gloo on CPU).
Bandwidths follow nccl-tests (``doc/PERFORMANCE.md``): algbw = bytes / time, busbw = algbw * 2(n-1)/n for
all-reduce.

On GPU the doctor exits non-zero when NCCL fell back to sockets on an RDMA profile (seen in the
NCCL_DEBUG=INFO log: ``NET/Socket``), or when the bus bandwidth is far below the profile's expectation.
Exit codes: 0 healthy, 1 a check failed, 2 the run itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time

from orchestrator.cluster.network import (
    BUS_BANDWIDTH_SOURCES,
    NETWORK_PROFILES,
    expected_bus_bandwidth_gbps,
    network_env,
)

DEFAULT_SIZES = "1MB,8MB,64MB"
# On GPU, a healthy RDMA profile must reach at least this fraction of its expected busbw at the largest size.
MIN_FRACTION_OF_EXPECTED = 0.25
_TRANSPORT_MARKERS = ("NET/Socket", "NET/IB", "NET/OFI", "NET/AWS Libfabric", "NET/Libfabric", "via P2P",
                      "via SHM", "P2P/IPC", "P2P/CUMEM")

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'64MB' -> 67108864 (binary units, as nccl-tests uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad message size {text!r}; use e.g. 1MB, 512KB, 1GB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 4:
        raise ValueError(f"message size {text!r} is smaller than one float32")
    return n


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def format_size(n: int) -> str:
    for unit, f in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= f and n % f == 0:
            return f"{n // f}{unit}"
    return f"{n}B"


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests all-reduce bus bandwidth: algbw * 2(n-1)/n."""
    return algbw * 2 * (world_size - 1) / world_size if world_size > 0 else 0.0


# --------------------------------------------------------------------------- worker side


def _run(cmd: list[str], timeout: float = 30.0) -> tuple[int, str]:
    import shutil
    import subprocess

    if shutil.which(cmd[0]) is None:
        return -1, ""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except (OSError, subprocess.SubprocessError) as e:  # noqa: PERF203
        return -2, str(e)


def _probe_host() -> dict:
    """Hostname, GPUs, parsed nvidia-smi topology and ibstat of this worker's node."""
    import torch

    from orchestrator.cluster.topology import parse_ibstat, parse_nvidia_smi_topo

    info: dict = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "topology": None,
        "ibstat": None,
        "notes": [],
    }
    rc, out = _run(["nvidia-smi", "topo", "-m"])
    if rc == 0:
        try:
            info["topology"] = parse_nvidia_smi_topo(out).to_dict()
        except ValueError as e:
            info["notes"].append(f"nvidia-smi topo -m unparsable: {e}")
    elif rc != -1:
        info["notes"].append(f"nvidia-smi topo -m failed (rc={rc})")
    rc, out = _run(["ibstat"])
    if rc == 0:
        try:
            info["ibstat"] = [ca.to_dict() for ca in parse_ibstat(out)]
        except ValueError as e:
            info["notes"].append(f"ibstat unparsable: {e}")
    elif rc != -1:
        info["notes"].append(f"ibstat failed (rc={rc})")
    return info


def _numa_cores(gpu_index: int) -> dict:
    """cuda:`gpu_index`'s NUMA node cores as a job's worker would bind to them (worker/affinity.py, mode node), as
    a sysfs-style range string, or None with the reason."""
    from orchestrator.worker.affinity import choose_gpu_cores

    cores, _, why = choose_gpu_cores(gpu_index, "node", 1, None)
    return {"numa_cores": format_cores(cores) if cores is not None else None, "numa_why": why}


def format_cores(cores: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the notation of sysfs cpulist and numactl)."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _nccl_transports(log_dir: str | None) -> list[str]:
    """Transport markers in this process's NCCL debug log (NCCL_DEBUG_FILE=<dir>/nccl.%h.%p.log)."""
    if not log_dir:
        return []
    path = os.path.join(log_dir, f"nccl.{socket.gethostname()}.{os.getpid()}.log")
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    return sorted({m for m in _TRANSPORT_MARKERS if m in text})


def _time_all_reduce(size_bytes: int, device, iters: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist

    world_size = dist.get_world_size()
    numel = max(1, size_bytes // 4)
    # Correctness first: each rank contributes rank+1, the sum is n(n+1)/2 everywhere.
    check = torch.full((numel,), float(dist.get_rank() + 1), dtype=torch.float32, device=device)
    dist.all_reduce(check)
    expected = world_size * (world_size + 1) / 2
    correct = bool(torch.all(check == expected).item())
    del check
    buf = torch.zeros(numel, dtype=torch.float32, device=device)  # zeros stay finite however often summed
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        dist.all_reduce(buf)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    sync()
    elapsed = (time.perf_counter() - t0) / iters
    # the slowest rank defines the collective's time
    t = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    elapsed = float(t.item())
    algbw = numel * 4 / elapsed / 1e9
    return {"size_bytes": numel * 4, "time_us": elapsed * 1e6, "algbw_gbps": algbw,
            "busbw_gbps": bus_bandwidth(algbw, world_size), "iters": iters, "correct": correct}


def doctor_worker(config: dict) -> dict | None:
    """Ray Train worker function: probe the host, time all-reduce, gather everything on rank 0."""
    import torch
    import torch.distributed as dist

    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = _probe_host()
    info.update(rank=rank, local_rank=ctx.get_local_rank(), node_rank=ctx.get_node_rank(),
                device=str(device), backend=dist.get_backend())
    if device.type == "cuda":  # the cores a job's worker on this GPU binds to (compute.gpu_numa_binding=node)
        info.update(_numa_cores(device.index or 0))

    results = [_time_all_reduce(s, device, config["iters"], config["warmup"]) for s in config["sizes"]]
    info["transports"] = _nccl_transports(config.get("nccl_log_dir"))

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, info)
    summary = {"world_size": world_size, "backend": dist.get_backend(), "workers": gathered, "all_reduce": results}
    ray.train.report({"largest_busbw_gbps": results[-1]["busbw_gbps"] if results else 0.0})
    if rank != 0:
        return None
    if config.get("json_out"):
        with open(config["json_out"], "w") as f:
            json.dump(summary, f, indent=2)
    return summary


# --------------------------------------------------------------------------- driver side


def run_doctor(
    num_workers: int,
    use_gpu: bool = False,
    address: str | None = None,
    network: str = "tcp",
    sizes: list[int] | None = None,
    iters: int = 10,
    warmup: int = 2,
    debug: bool = False,
    storage_path: str | None = None,
    json_out: str | None = None,
    cpus_per_worker: float = 1.0,
) -> dict:
    """Start (or connect to) Ray, run ``doctor_worker`` on ``num_workers`` Ray Train workers, return rank 0's summary."""
    import ray
    from ray.train import RunConfig, ScalingConfig

    from orchestrator.launch.ray_train import torch_trainer

    sizes = sizes or parse_sizes(DEFAULT_SIZES)
    # NCCL INFO logging is how we see the transport; on GPU always on, written to per-process files.
    env = network_env(network, debug=debug or use_gpu)
    nccl_log_dir = None
    if use_gpu:
        nccl_log_dir = os.environ.get("DOCTOR_NCCL_LOG_DIR") or os.path.join(
            storage_path or tempfile.gettempdir(), "doctor-nccl-logs")
        os.makedirs(nccl_log_dir, exist_ok=True)
        env["NCCL_DEBUG_FILE"] = os.path.join(nccl_log_dir, "nccl.%h.%p.log")
    if not use_gpu:
        env.pop("NCCL_SOCKET_IFNAME", None)  # gloo ignores NCCL_*; keep the CPU env minimal

    from orchestrator.launch.ray_job import connect_ray

    started_here = connect_ray(address, num_cpus=max(int(num_workers * cpus_per_worker + 0.999), os.cpu_count() or 1),
                               include_dashboard=False, log_to_driver=debug)
    storage = storage_path or tempfile.mkdtemp(prefix="doctor-")
    try:
        trainer = torch_trainer(
            doctor_worker,
            train_loop_config={"sizes": sizes, "iters": iters, "warmup": warmup,
                               "nccl_log_dir": nccl_log_dir, "json_out": json_out},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker,
                                                               **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=f"doctor-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                 storage_path=storage, worker_runtime_env={"env_vars": env}),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"doctor workers failed: {result.error}")
        summary = result.return_value
        if not summary:
            raise RuntimeError("doctor workers returned no summary from rank 0")
        summary["network"] = network
        summary["env"] = env
        summary["use_gpu"] = use_gpu
        return summary
    finally:
        if started_here:
            ray.shutdown()


def evaluate(summary: dict) -> tuple[list[str], list[str]]:
    """(failures, notes) for a doctor summary.  Failures are only raised for GPU runs (CPU/gloo is a smoke test)."""
    failures: list[str] = []
    notes: list[str] = []
    network = summary["network"]
    expected = expected_bus_bandwidth_gbps(network)
    workers = summary["workers"]
    hosts = sorted({w["hostname"] for w in workers})
    multi_node = len(hosts) > 1
    results = summary["all_reduce"]
    if not results:
        failures.append("no all-reduce results")
        return failures, notes
    if not all(r["correct"] for r in results):
        failures.append("all-reduce returned wrong sums: the collective itself is broken")
    if any(r["busbw_gbps"] <= 0 for r in results):
        failures.append("non-positive bandwidth measured")
    largest = results[-1]
    ratio = largest["busbw_gbps"] / expected
    notes.append(f"largest message {format_size(largest['size_bytes'])}: busbw {largest['busbw_gbps']:.3f} GB/s "
                 f"= {ratio:.1%} of the '{network}' expectation ({expected:g} GB/s: {BUS_BANDWIDTH_SOURCES[network]})")
    if not summary["use_gpu"]:
        notes.append("CPU workers over gloo: a smoke test of the worker group and process group, "
                     "not comparable to the GPU/NCCL expectation; no bandwidth check applied")
        return failures, notes

    if summary["backend"] != "nccl":
        failures.append(f"GPU run but the process group backend is {summary['backend']!r}, not 'nccl'")
    sockets = [w["rank"] for w in workers if "NET/Socket" in w.get("transports", [])]
    if network in ("infiniband", "efa") and multi_node and sockets:
        failures.append(f"NCCL fell back to TCP sockets (NET/Socket in the NCCL log of ranks {sockets}) on the "
                        f"'{network}' profile: check NCCL_IB_HCA / the aws-ofi-nccl plugin / FI_PROVIDER")
    if network in ("infiniband", "efa") and not multi_node:
        notes.append(f"all workers on one node ({hosts[0]}): traffic stays on NVLink/PCIe, "
                     f"the {network} fabric was not exercised")
    elif largest["size_bytes"] >= 64 * 2**20 and ratio < MIN_FRACTION_OF_EXPECTED:
        failures.append(f"bus bandwidth {largest['busbw_gbps']:.1f} GB/s is below "
                        f"{MIN_FRACTION_OF_EXPECTED:.0%} of the '{network}' expectation ({expected:g} GB/s)")
    for w in workers:
        if "numa_cores" in w and w["numa_cores"] is None:
            notes.append(f"{w['hostname']} rank {w['rank']}: a job's worker on {w['device']} would run unbound:"
                         f" {w['numa_why']}")
        topo = w.get("topology")
        if network == "nvlink_single_node" and topo and not topo.get("all_gpus_nvlink"):
            notes.append(f"{w['hostname']}: not all GPU pairs are NVLink-connected (nvidia-smi topo -m)")
        for ca in w.get("ibstat") or []:
            for p in ca["ports"]:
                if not p["active"] and network == "infiniband":
                    notes.append(f"{w['hostname']}: {ca['name']} port {p['number']} is {p['state']}/"
                                 f"{p['physical_state']}")
    return failures, notes


def format_report(summary: dict) -> list[str]:
    workers = summary["workers"]
    hosts = sorted({w["hostname"] for w in workers})
    lines = [f"doctor: {summary['world_size']} workers, backend {summary['backend']}, "
             f"{len(hosts)} node(s), network profile '{summary['network']}'", ""]
    lines.append(f"{'rank':>4}  {'host':<24} {'device':<8} {'gpus':>4}  {'nvlink-all':<10} {'ib-active':<9} "
                 f"{'numa-cores':<16} transports")
    for w in sorted(workers, key=lambda w: w["rank"]):
        topo = w.get("topology")
        nv = "-" if not topo else ("yes" if topo["all_gpus_nvlink"] else "no")
        ib = w.get("ibstat")
        ib_s = "-" if ib is None else str(sum(p["active"] for ca in ib for p in ca["ports"]))
        numa = w.get("numa_cores") or "-"
        lines.append(f"{w['rank']:>4}  {w['hostname'][:24]:<24} {w['device']:<8} {w['gpu_count']:>4}  {nv:<10} "
                     f"{ib_s:<9} {numa:<16} {','.join(w.get('transports') or []) or '-'}")
    lines.append("")
    lines.append(f"all_reduce float32, {summary['world_size']} ranks ({summary['backend']})")
    lines.append(f"{'size':>8} {'time(us)':>12} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}  ok")
    for r in summary["all_reduce"]:
        lines.append(f"{format_size(r['size_bytes']):>8} {r['time_us']:>12.1f} {r['algbw_gbps']:>12.3f} "
                     f"{r['busbw_gbps']:>12.3f}  {'yes' if r['correct'] else 'NO'}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The doctor's options, checked (bad sizes or fewer than 2 workers exit 2 with argparse's one line)."""
    ap = argparse.ArgumentParser(prog="python -m orchestrator.doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else start a local Ray)")
    ap.add_argument("--network", default="tcp", choices=NETWORK_PROFILES)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated message sizes, e.g. 1MB,8MB,64MB")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--storage-path", default=None, help="Ray Train storage path (default: a temp dir)")
    ap.add_argument("--json-out", default=None, help="also write the summary JSON here (driver side)")
    ap.add_argument("--debug", action="store_true", help="NCCL_DEBUG=INFO and Ray worker logs to the console")
    args = ap.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        ap.error(str(e))
    if args.num_workers < 2:
        ap.error("--num-workers must be >= 2 for an all-reduce test")
    args.sizes = sizes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run_doctor(args.num_workers, use_gpu=args.use_gpu, address=args.address, network=args.network,
                             sizes=args.sizes, iters=args.iters, warmup=args.warmup, debug=args.debug,
                             storage_path=args.storage_path, cpus_per_worker=args.cpus_per_worker)
    except Exception as e:  # noqa: BLE001 - the doctor reports, it does not trace back
        print(f"doctor: FAILED to run: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for line in format_report(summary):
        print(line)
    failures, notes = evaluate(summary)
    print("")
    for n in notes:
        print(f"note: {n}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**summary, "failures": failures, "notes": notes}, f, indent=2)
    if failures:
        for f_ in failures:
            print(f"FAIL: {f_}", file=sys.stderr)
        return 1
    print("doctor: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
