"""Cluster doctor: helpers, the verdict logic, and a real 2-worker Ray Train run on CPU (gloo)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from orchestrator import doctor


def test_parse_sizes():
    assert doctor.parse_sizes("1MB,8MB,64MB") == [2**20, 8 * 2**20, 64 * 2**20]
    assert doctor.parse_sizes("512KB, 1G") == [512 * 2**10, 2**30]
    assert doctor.parse_size("4096") == 4096
    for bad in ("1XB", "MB", "2B", "-1MB"):
        with pytest.raises(ValueError):
            doctor.parse_size(bad)
    assert doctor.format_size(64 * 2**20) == "64MB" and doctor.format_size(1000) == "1000B"


def test_bus_bandwidth_follows_nccl_tests():
    assert doctor.bus_bandwidth(10.0, 2) == pytest.approx(10.0)
    assert doctor.bus_bandwidth(10.0, 8) == pytest.approx(17.5)
    assert doctor.bus_bandwidth(10.0, 1) == 0.0


def test_nccl_transport_detection_reads_this_process_log(tmp_path):
    log = tmp_path / f"nccl.{socket.gethostname()}.{os.getpid()}.log"
    log.write_text("host:1:2 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/Socket/0\n"
                   "host:1:2 [0] NCCL INFO Channel 00 : 0[0] -> 1[1] via P2P/IPC\n")
    assert doctor._nccl_transports(str(tmp_path)) == ["NET/Socket", "P2P/IPC", "via P2P"]
    assert doctor._nccl_transports(str(tmp_path / "missing")) == []


def _summary(use_gpu, busbw, transports=(), hosts=("n1", "n2"), network="infiniband", backend="nccl"):
    workers = [{"rank": r, "hostname": hosts[r % len(hosts)], "device": "cuda:0" if use_gpu else "cpu",
                "gpu_count": 8 if use_gpu else 0, "transports": list(transports), "topology": None, "ibstat": None}
               for r in range(4)]
    sizes = [2**20, 64 * 2**20]
    return {"world_size": 4, "backend": backend, "workers": workers, "network": network, "use_gpu": use_gpu,
            "all_reduce": [{"size_bytes": s, "time_us": 1.0, "algbw_gbps": busbw * 2 / 3, "busbw_gbps": busbw,
                            "iters": 5, "correct": True} for s in sizes]}


def test_gpu_socket_fallback_fails_loudly():
    failures, _ = doctor.evaluate(_summary(True, 150.0, transports=["NET/Socket"]))
    assert any("fell back to TCP sockets" in f for f in failures)


def test_gpu_healthy_infiniband_passes():
    failures, notes = doctor.evaluate(_summary(True, 170.0, transports=["NET/IB", "via P2P"]))
    assert failures == [] and any("infiniband" in n for n in notes)


def test_gpu_far_below_expectation_fails():
    failures, _ = doctor.evaluate(_summary(True, 3.0, transports=["NET/IB"]))
    assert any("below" in f for f in failures)
    failures, _ = doctor.evaluate(_summary(True, 3.0, network="efa", backend="gloo"))
    assert any("not 'nccl'" in f for f in failures) and any("below" in f for f in failures)


def test_single_node_rdma_profile_is_only_a_note():
    failures, notes = doctor.evaluate(_summary(True, 3.0, hosts=("n1",)))
    assert failures == [] and any("not exercised" in n for n in notes)


def test_cpu_run_is_never_failed_on_bandwidth():
    failures, notes = doctor.evaluate(_summary(False, 0.01, network="tcp", backend="gloo"))
    assert failures == [] and any("smoke test" in n for n in notes)
    bad = _summary(False, 0.5, network="tcp", backend="gloo")
    bad["all_reduce"][0]["correct"] = False
    assert any("wrong sums" in f for f in doctor.evaluate(bad)[0])


def test_report_table():
    lines = doctor.format_report(_summary(True, 170.0, transports=["NET/IB"]))
    assert lines[0].startswith("doctor: 4 workers, backend nccl, 2 node(s)")
    table = lines[lines.index(next(x for x in lines if x.strip().startswith("size"))) + 1:]
    assert [t.split()[0] for t in table] == ["1MB", "64MB"]
    assert table[1].split()[3] == "170.000"


def test_the_report_shows_each_gpus_numa_cores_and_says_why_when_there_are_none():
    summary = _summary(True, 170.0, transports=["NET/IB"], hosts=("n1",))
    for w in summary["workers"]:
        w["device"], w["numa_cores"], w["numa_why"] = f"cuda:{w['rank']}", "0-15,32-47", "cuda's NUMA node cores"
    summary["workers"][3].update(numa_cores=None, numa_why="torch.numa could not place cuda:3 (RuntimeError: x)")
    rows = {int(x.split()[0]): x.split() for x in doctor.format_report(summary)[3:7]}
    assert doctor.format_report(summary)[2].split()[6] == "numa-cores"
    assert [rows[r][6] for r in range(4)] == ["0-15,32-47"] * 3 + ["-"]
    failures, notes = doctor.evaluate(summary)
    assert failures == []
    assert [n for n in notes if "unbound" in n] == [
        "n1 rank 3: a job's worker on cuda:3 would run unbound: torch.numa could not place cuda:3 (RuntimeError: x)"]
    # this CPU torch has no CUDA: the worker-side probe says so rather than failing the doctor
    probe = doctor._numa_cores(0)
    assert probe["numa_cores"] is None and probe["numa_why"].startswith("torch.numa could not place cuda:0")
    assert doctor.format_cores([7, 0, 1, 2, 5, 8, 32]) == "0-2,5,7-8,32"


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        doctor.main(["--num-workers", "1"])
    with pytest.raises(SystemExit):
        doctor.main(["--network", "carrier-pigeon"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_doctor_runs_two_cpu_workers_on_local_ray(tmp_path):
    out = tmp_path / "doctor.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run(
        [sys.executable, "-m", "orchestrator.doctor", "--num-workers", "2", "--sizes", "256KB,4MB,32MB",
         "--iters", "5", "--network", "tcp", "--storage-path", str(tmp_path / "ray"), "--json-out", str(out)],
        capture_output=True, text=True, timeout=220, env=env, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert sorted(w["rank"] for w in summary["workers"]) == [0, 1]
    assert all(w["hostname"] and w["device"] == "cpu" for w in summary["workers"])
    sizes = [r["size_bytes"] for r in summary["all_reduce"]]
    assert sizes == [256 * 2**10, 4 * 2**20, 32 * 2**20]
    for r in summary["all_reduce"]:
        assert r["correct"] is True
        assert r["time_us"] > 0 and r["algbw_gbps"] > 0
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"])  # 2 ranks: 2(n-1)/n = 1
    assert summary["failures"] == []
    # the printed table has one row per size
    rows = [line.split() for line in p.stdout.splitlines() if line.strip().split()[:1] in (["256KB"], ["4MB"], ["32MB"])]
    assert len(rows) == 3 and all(float(r[3]) > 0 for r in rows)
    assert "doctor: OK" in p.stdout
