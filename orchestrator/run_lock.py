"""One job per run dir: the driver holds an exclusive lock on `<run dir>/.lock` from before its data preparation
until its summary is written.

`flock` is released by the kernel when the holder exits, also on SIGKILL, so a killed job never blocks the next
start. On shared storage the lock holds across nodes where the filesystem supports locks: Linux NFS clients (v3
with lockd, v4) implement flock as an NFS byte-range lock; a crashed *node*'s lock is freed when its NFSv4 lease
expires (90 s by default). Filesystems without lock support (some FUSE and object-store mounts) only lock within
one node. The lock file also names the holder (host, pid, Ray job id), which a refused start prints.

The driver's lock dies with the driver, but its workers may not: a Ray worker whose driver and raylet were killed
-9 lives on until it notices (it stops at its next step, see `Trainer`), and one caught mid-checkpoint finishes
writing it. So every worker also holds `<run dir>/.workers.lock` shared while it trains, and a start waits for that
file to be free before its own workers read the run dir: no earlier start's worker can publish or prune a
checkpoint under a resuming run. That lock is a POSIX record lock (`lockf`), which a forked child (a DataLoader
worker) does not inherit, so it ends with the training process itself; an `flock` would live on in the children.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from orchestrator.errors import OrchestratorError

LOCK_FILE = ".lock"
WORKERS_LOCK = ".workers.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # what a non-blocking lock attempt on a held file raises


class RunDirBusy(OrchestratorError):
    """Another job holds the run dir. The message names it."""


def _ray_job_id() -> Optional[str]:
    """The Ray Job this process is the entrypoint of (Ray passes its metadata in the environment)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
    except ValueError:
        return "another job (holder unknown)"
    ray_job = f", Ray job {h['ray_job']}" if h.get("ray_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
    return f"pid {h.get('pid')} on {h.get('host')}{ray_job}, since {since}"


def _open(run_dir: str | os.PathLike, name: str) -> tuple[Path, int]:
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run dir for this process, or raise RunDirBusy naming the holder at once (never waits)."""
    path, fd = _open(run_dir, LOCK_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        if exc.errno in _BUSY:
            raise RunDirBusy(f"run dir '{run_dir}' is in use by {_describe(holder)}: wait for that job, stop it,"
                             " or choose another run dir (run_name=... or hydra.run.dir=...)") from None
        raise
    try:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "ray_job": _ray_job_id(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_pids(path: Path) -> list[int]:
    """Pids on this node holding a lock on `path` (from /proc/locks; empty where it cannot be read)."""
    try:
        ino = os.stat(path).st_ino
        pids = []
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()
            if "->" in f:  # a waiter, not a holder
                continue
            if len(f) >= 6 and f[5].rsplit(":", 1)[-1] == str(ino):
                pids.append(int(f[4]))
        return sorted(set(pids))
    except (OSError, ValueError, IndexError):
        return []


@contextlib.contextmanager
def worker_hold(run_dir: str | os.PathLike) -> Iterator[None]:
    """A training worker's shared hold on the run dir, released by the kernel when the worker exits."""
    _, fd = _open(run_dir, WORKERS_LOCK)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)  # blocks only while a starting driver checks (an instant)
        yield
    finally:
        os.close(fd)


def wait_for_earlier_workers(run_dir: str | os.PathLike, timeout_s: float = 120.0, say=print) -> float:
    """Return once no worker of an earlier start holds the run dir (seconds waited); RunDirBusy after timeout_s."""
    path = Path(run_dir) / WORKERS_LOCK
    if not path.exists():
        return 0.0
    fd = os.open(path, os.O_RDWR)
    t0 = time.monotonic()
    try:
        told = False
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(fd, fcntl.LOCK_UN)
                return time.monotonic() - t0
            except OSError as exc:
                if exc.errno not in _BUSY:
                    raise
            late = time.monotonic() - t0 > timeout_s
            if late or not told:  # who holds it (/proc/locks) only when there is something to say
                pids = _lock_pids(path)
                where = f" (pids {', '.join(map(str, pids))} on this node)" if pids else ""
                if late:
                    raise RunDirBusy(f"{path}: workers of an earlier start still hold the run dir after"
                                     f" {timeout_s:.0f} s{where}: stop them, then run again")
                say(f"waiting for the workers of an earlier start to exit{where}")
                told = True
            time.sleep(0.2)
    finally:
        os.close(fd)
