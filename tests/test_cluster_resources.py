"""Reading a cluster's resources through Ray's State API: a head started a moment ago is waited for (never
read as zero CPUs), a sweep submitted right after its private head starts runs, and a cluster that never
reports ends with the bounded wait's message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO
from orchestrator.launch import ray_job


class _NoNodes(BaseHTTPRequestHandler):
    """A dashboard whose State API answers, but lists no node (a cluster that never reports)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = {"result": True, "msg": "", "data": {"result": {
            "result": [], "total": 0, "num_after_truncation": 0, "num_filtered": 0,
            "partial_failure_warning": None, "warnings": None}}}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.requests.append(self.path)

    def log_message(self, *args):
        pass


@pytest.fixture()
def silent_dashboard():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoNodes)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_cluster_that_never_reports_ends_with_the_bounded_wait(silent_dashboard):
    address = f"http://127.0.0.1:{silent_dashboard.server_address[1]}"
    t0 = time.monotonic()
    with pytest.raises(ray_job.ClusterNotReporting) as err:
        ray_job.cluster_resources(address, timeout_s=2.0, poll_s=0.2)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert address in msg and "no alive node with resources" in msg and "after 2s" in msg, msg
    assert 2.0 <= took < 10, took
    # it asked more than once (a wait, not one look) and only through the State API's node list
    assert len(silent_dashboard.requests) >= 3
    assert all(r.startswith("/api/v0/nodes") for r in silent_dashboard.requests), silent_dashboard.requests


def test_a_missing_report_is_not_zero_resources(monkeypatch):
    """No reading yet -> wait; once a reading comes, that is what is returned."""
    readings = iter([None, None, ray_job.ClusterResources({"CPU": 2.0}, {"CPU": 2.0}, 1)])
    monkeypatch.setattr(ray_job, "read_cluster_resources", lambda address: next(readings))
    got = ray_job.cluster_resources("http://127.0.0.1:1", timeout_s=5, poll_s=0.01)
    assert got.total == {"CPU": 2.0} and got.nodes == 1
    assert ray_job.fits({"CPU": 1.0}, got.available) and not ray_job.fits({"CPU": 3.0}, got.available)


@pytest.mark.slow
def test_a_head_just_started_is_read_at_once_and_a_sweep_on_a_private_head_runs(tmp_path, monkeypatch):
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    head = ray_job.LocalHead(num_cpus=2, auth=True).start()  # token auth, this session's token
    try:
        res = ray_job.cluster_resources(head.dashboard_url, timeout_s=60)  # asked the moment `start` returns
        assert res.total["CPU"] == 2.0 and res.available["CPU"] == 2.0 and res.nodes == 1, res
    finally:
        head.stop()
    assert not head.session_pids()

    # a one-member sweep with no address, from a shell with no Ray token: the launcher starts its own head (with
    # a token of its own) and submits at once
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    sweep_dir = tmp_path / "one"
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "-m", "experiment=quickstart_pretrain", "debug=local",
         "train.max_steps=2", "train.eval_every_steps=2", "train.log_every_steps=1", "hydra.launcher.num_cpus=1",
         "hydra.launcher.poll_s=0.5", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())["members"]
    assert [r["status"] for r in rows] == ["succeeded"], rows
    assert "started a private Ray head" in out.stderr + out.stdout
