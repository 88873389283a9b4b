"""Reading a cluster's resources through Ray's State API: a head started a moment ago is waited for (never
read as zero CPUs), a sweep submitted right after its private head starts runs, and a cluster that never
reports ends with the bounded wait's message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO
from orchestrator.errors import OrchestratorError
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


FAKE_RAY = r'''#!{python}
"""A stand-in for `ray start --head --block`: the first start times out as Ray's raylet registration does on
a busy machine; the next one serves its dashboard port and blocks."""
import pathlib, socket, sys, time
count = pathlib.Path({count!r})
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
if n == 1 or pathlib.Path(str(count) + ".always").exists():
    print("Exception: The current node timed out during startup. This could happen because some of the raylet "
          "failed to startup or the GCS has become overloaded.", flush=True)
    sys.exit(1)
port = int(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--dashboard-port=")))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen()
print("started; --block", flush=True)
time.sleep(60)
'''


def test_a_head_whose_raylet_registers_too_late_is_started_again(tmp_path):
    """Ray waits a fixed 30 s for its raylet; when a loaded machine misses that, the head is started again on
    fresh ports instead of failing the sweep or the test session."""
    fake = tmp_path / "ray"
    fake.write_text(FAKE_RAY.format(python=sys.executable, count=str(tmp_path / "starts")))
    fake.chmod(0o755)
    head = ray_job.LocalHead(num_cpus=1, ray_bin=str(fake), temp_dir=str(tmp_path / "head"))
    try:
        head.start(timeout_s=30)
        assert (tmp_path / "starts").read_text() == "2"
        with socket.create_connection(("127.0.0.1", head.dashboard_port), timeout=2):
            pass
    finally:
        head.stop()
    (tmp_path / "starts.always").touch()  # every start from now on times out: the last failure is one line
    with pytest.raises(OrchestratorError, match="did not register in Ray's 30 s, 2 times"):
        ray_job.LocalHead(num_cpus=1, ray_bin=str(fake), temp_dir=str(tmp_path / "head2")).start(attempts=2)


def test_a_local_ray_whose_raylet_registers_too_late_is_started_again(monkeypatch):
    import ray

    calls = []

    def fake_init(address=None, **kw):
        calls.append((address, kw.get("num_cpus")))
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because some of the "
                            "raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # "local" starts a local Ray whatever RAY_ADDRESS says
    assert ray_job.connect_ray("local", num_cpus=2) is True
    assert calls == [("local", 2), "shutdown", ("local", 2)]
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):  # any other failure is not retried
        ray_job.connect_ray("local", num_cpus=2)
