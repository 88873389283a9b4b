"""Launch stage (Ray Jobs): shared helpers for `bert-orch-submit` and the sweep launcher — address and
token auth, a fail-fast job client, job entrypoints and runtime envs, cluster resource fitting, log
tailing, and a private `ray start --head` for sweeps and tests.

Nothing here imports torch; ray is imported lazily inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional
from urllib.parse import urlparse

from orchestrator.errors import OrchestratorError

log = logging.getLogger(__name__)
# What Ray raises when a new node's raylet misses its fixed 30 s to register with the GCS (a busy machine)
_RAYLET_TIMEOUT = "timed out during startup"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded with the working dir (Ray also honours .gitignore): envs, outputs, VCS.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "runs", "multirun", "outputs", "wandb", ".cache", ".pytest_cache",
    "__pycache__", "*.egg-info", "*.pyc",
]
# Forwarded into every job's runtime_env when the submitting shell has them (then on to Train workers).
# Never secrets: Ray's Jobs API and dashboard show a job's runtime_env to anyone with cluster access. The W&B
# key comes from the nodes' own environment (exported before `ray start`, a Kubernetes secret, `wandb login`).
# Never the test-only fault injection either.
FORWARD_ENV = (
    "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_SILENT", "WANDB_PROJECT",
    "WANDB_ENTITY", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "BERT_ORCH_CACHE",
    "TOKENIZERS_PARALLELISM",
)
SECRET_ENV = ("WANDB_API_KEY",)
AUTH_HELP = (
    "this Ray cluster uses token authentication: export RAY_AUTH_MODE=token and make the cluster's "
    "token available as RAY_AUTH_TOKEN, in the file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token "
    "(print it on the head node with `ray get-auth-token`)"
)


class ClusterUnreachable(OrchestratorError):
    """No Ray job server answers at the address. The message names it."""


class ClusterAuthError(OrchestratorError):
    """The cluster refused our (missing or wrong) token. The message says what to set."""


# ---------------------------------------------------------------------------------------------
# address and auth


def resolve_address(explicit: Optional[str] = None, default: Optional[str] = DEFAULT_DASHBOARD) -> Optional[str]:
    """--address / hydra.launcher.address, then RAY_API_SERVER_ADDRESS (the `ray job` CLI's own), then RAY_ADDRESS."""
    for value in (explicit, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if value:
            return value.strip()
    return default


def _token_file() -> Path:
    """The file Ray reads the token from when RAY_AUTH_TOKEN is unset."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"


def local_token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or _token_file().is_file()


def ensure_token_auth_env() -> str:
    """Turn on token auth for this process's Ray clients when a token is at hand and the mode is unset.

    Ray 2.60 heads started with a token (`ray get-auth-token --generate`, or RAY_AUTH_MODE=token) demand
    it, but clients only send it with RAY_AUTH_MODE=token. Sending it to a dashboard without auth (the Jobs and
    State HTTP APIs) is harmless, so: token found -> send it. Returns the mode in effect ("token" / "disabled" /
    "unset").
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None and local_token_available():
        os.environ["RAY_AUTH_MODE"] = mode = "token"
    sync_ray_auth()
    return mode or "unset"


def sync_ray_auth() -> None:
    """Ray caches the auth mode and the token per process: make them follow this process's environment
    (what `ray get-auth-token --generate` does for itself). HTTP clients then follow a change; a process that
    is itself connected to a Ray cluster (ray.init) must keep that cluster's setting, or its own core-worker
    calls are refused (InvalidAuthToken): the tests therefore use one token for the whole session."""
    if "ray._raylet" not in sys.modules:
        return  # nothing cached yet: Ray reads the environment when first used
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode

    if (get_authentication_mode() == AuthenticationMode.TOKEN) != (os.environ.get("RAY_AUTH_MODE") == "token"):
        Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None, include_dashboard: bool = True,
                log_to_driver: bool = True, runtime_env: Optional[dict[str, Any]] = None, **local: Any) -> bool:
    """The one way this project joins Ray: `address`, else RAY_ADDRESS (what a Ray job runs with), else a
    local Ray of `num_cpus` (`local`: more ray.init options for it). Returns True when this call started
    Ray, so the caller shuts it down; an already connected process is left as it is."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        # Ray 2.60 turns token auth on for a new local Ray when RAY_AUTH_MODE is unset, and prints a WARNING saying
        # so at every start; choosing it here keeps that default and the console quiet (RAY_AUTH_MODE=disabled opts out)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    sync_ray_auth()  # this process may have talked to a cluster with other auth settings before
    kw: dict[str, Any] = {"log_to_driver": log_to_driver}
    if runtime_env:
        kw["runtime_env"] = runtime_env
    if address and address != "local":  # "local": a new local Ray even where RAY_ADDRESS names a cluster
        _join(address, kw)
        return False
    _retry_raylet_timeout(
        lambda: ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, **kw, **local),
        ray.shutdown, "a local Ray")
    _STARTED_HERE["gcs"] = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    return True


def _join(address: str, kw: dict[str, Any]) -> None:
    """ray.init(address): with the token at hand sent (a head started by `ray start` keeps one in ~/.ray/auth_token),
    and a refusal or an address nobody answers at as one line, in seconds (Ray itself retries for 20 s, then raises
    a traceback)."""
    import ray
    from ray.exceptions import AuthenticationError

    if address.startswith(("http://", "https://")):
        raise ClusterUnreachable(
            f"'{address}' is a Ray dashboard (Jobs API) address: a job joins a cluster by its GCS address"
            f" (<head>:6379, what `ray start --head` prints); to run through the Jobs API use"
            f" `bert-orch-submit --address {address} ...`")
    ensure_token_auth_env()
    check_reachable(address)
    try:
        if address != "auto" and not address.startswith("ray://"):
            _probe_gcs(address)
        ray.init(address=address, **kw)
    except AuthenticationError:
        raise ClusterAuthError(f"{address} refused {_token_sent()}: {AUTH_HELP}") from None
    except ConnectionError as exc:
        raise ClusterUnreachable(f"no Ray cluster at {address}: {str(exc).splitlines()[0][:200]}") from None


def _token_sent() -> str:
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return f"a request without a token (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')})"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the token in RAY_AUTH_TOKEN"
    return f"the token in {_token_file()}"


def _probe_gcs(address: str, timeout_s: float = 8.0) -> None:
    """One GCS call (half a second), so a refused token raises here instead of after ray.init's 20 retries, and a
    port that answers but is no GCS is named in seconds (Ray's client waits 40 s). Ray's C++ client also logs a
    refusal straight to fd 2: that line is held back, the exception says it."""
    import threading

    from ray._raylet import GcsClient

    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            GcsClient(address=address)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    with _stderr_held_back():
        probe = threading.Thread(target=call, daemon=True)
        probe.start()
        probe.join(timeout_s)
    if not outcome:
        raise ClusterUnreachable(f"{address} answers, but no Ray GCS replied in {timeout_s:.0f} s: give the head's GCS"
                                 " address (<head>:6379, what `ray start --head` prints), not its dashboard port")
    exc = outcome[0]
    if exc is None:
        return
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError) or not isinstance(exc, Exception):  # the caller words a refusal
        raise exc
    raise ClusterUnreachable(f"no Ray GCS at {address}: {str(exc).splitlines()[0][:200]}")


@contextlib.contextmanager
def _stderr_held_back() -> Iterator[None]:
    """fd 2 to /dev/null inside (C++ libraries write there directly); left as it is where it cannot be duplicated."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        saved = -1
    try:
        if saved >= 0:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
        yield
    finally:
        if saved >= 0:
            os.dup2(saved, 2)
            os.close(saved)


_STARTED_HERE: dict[str, Optional[str]] = {"gcs": None}  # the GCS address of the local Ray connect_ray started


def in_own_local_ray() -> bool:
    """True when this process is connected to a local Ray it started itself (connect_ray): a Ray that dies with this
    process, and whose jobs are all this process's."""
    import ray

    return ray.is_initialized() and _STARTED_HERE["gcs"] == ray.get_runtime_context().gcs_address


def _retry_raylet_timeout(start: Callable[[], Any], cleanup: Callable[[], None], what: str, attempts: int = 3) -> Any:
    """start(), retried (after cleanup()) when it fails because Ray's raylet missed its fixed 30 s to register with
    the GCS, which a machine busy with other work can make it do; any other failure, and the last one, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except Exception as exc:
            if _RAYLET_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            cleanup()
            log.warning("%s: the raylet did not register in Ray's 30 s (busy machine?): starting again (%d of %d)",
                        what, attempt + 1, attempts)
    raise AssertionError("unreachable")


def _host_port(address: str) -> tuple[str, int]:
    if "://" not in address:
        address = "tcp://" + address
    try:
        u = urlparse(address)
        host, port = u.hostname, u.port  # .port raises on a bad port, urlparse on a bad IPv6 literal
    except ValueError as exc:
        raise ClusterUnreachable(f"cannot parse Ray address '{address}': {exc}") from None
    if not host:
        raise ClusterUnreachable(f"cannot parse Ray address '{address}'")
    default = 443 if u.scheme == "https" else (8265 if u.scheme == "http" else 6379)
    return host, port or default


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A plain TCP connect, so a wrong address fails in seconds (not after the SDK's retries)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with `ray start --head` "
            f"or pass the head's dashboard address (--address / hydra.launcher.address / RAY_ADDRESS, "
            f"e.g. http://<head>:8265)"
        ) from None


def job_client(address: str):
    """JobSubmissionClient with token auth set up; errors name the address and what to do."""
    ensure_token_auth_env()
    check_reachable(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise ClusterAuthError(f"{address}: {AUTH_HELP} ({str(exc).splitlines()[0]})") from None
    except ConnectionError as exc:
        raise ClusterUnreachable(f"no Ray job server at {address}: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# what a job is


def entrypoint(overrides: Iterable[str], python: str = "python") -> str:
    """`python -m orchestrator <overrides>`, each override shell-quoted (Ray runs the entrypoint in a shell)."""
    return " ".join([python, "-m", "orchestrator", *(shlex.quote(o) for o in overrides)])


def forwarded_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    env.update(extra or {})
    return env


def runtime_env(working_dir: Optional[str | Path], env_vars: Mapping[str, str]) -> dict[str, Any]:
    """A job's runtime_env. Refuses secrets: Ray's Jobs API returns env_vars to anyone who can reach it."""
    leaked = sorted(k for k in env_vars if k in SECRET_ENV)
    if leaked:
        raise OrchestratorError(f"{', '.join(leaked)} would be visible in the job's runtime_env through Ray's Jobs API:"
                                " set it in the cluster nodes' environment instead (see README, 'Secrets')")
    renv: dict[str, Any] = {"env_vars": dict(env_vars)}
    if working_dir:
        renv["working_dir"] = str(working_dir)
        renv["excludes"] = list(WORKING_DIR_EXCLUDES)
    return renv


# ---------------------------------------------------------------------------------------------
# resources


def member_resources(plan) -> dict[str, float]:
    """What a training run holds while it runs: its Train workers (the job driver reserves nothing)."""
    c = plan.job.compute
    need = {"CPU": float(plan.world_size * c.cpus_per_worker)}
    if c.use_gpu:
        need["GPU"] = float(plan.world_size)
    return need


def fits(need: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(v <= free.get(k, 0.0) + 1e-9 for k, v in need.items() if v > 0)


@dataclass(frozen=True)
class ClusterResources:
    """What a cluster has: the sum over its alive nodes (`total`) and what no placement group or actor
    outside one holds (`available`). Read through Ray's State API, which the dashboard serves."""

    total: dict[str, float]
    available: dict[str, float]
    nodes: int


class ClusterNotReporting(OrchestratorError):
    """The cluster answered but reported no alive node with resources within the timeout."""


STATE_API_LIMIT = 10_000  # the State API truncates lists at `limit`; far above what a cluster holds


def _add(into: dict[str, float], resources: Optional[Mapping[str, Any]]) -> None:
    for k, v in (resources or {}).items():
        into[k] = into.get(k, 0.0) + float(v)


def read_cluster_resources(address: str) -> Optional[ClusterResources]:
    """One reading through `ray.util.state` (alive nodes, placement groups, actors); None = no report yet.

    Held = bundles of placement groups that hold their resources (Ray Train/Tune/Data workers) plus
    actors outside a placement group. Plain tasks are not counted (this project runs none).
    """
    from ray.util.state import list_actors, list_nodes, list_placement_groups
    from ray.util.state.exception import RayStateApiException

    kw = dict(address=address, limit=STATE_API_LIMIT, raise_on_missing_output=False)
    try:
        nodes = [n for n in list_nodes(filters=[("state", "=", "ALIVE")], **kw) if n.resources_total]
        if not nodes:
            return None
        groups = list_placement_groups(filters=[("state", "=", "CREATED")], detail=True, **kw)
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, **kw)
    except RayStateApiException:  # the dashboard is up but its state service is not serving yet
        return None
    total: dict[str, float] = {}
    held: dict[str, float] = {}
    for n in nodes:
        _add(total, n.resources_total)
    for g in groups:
        for bundle in g.bundles or []:
            _add(held, bundle.get("unit_resources"))
    for a in actors:
        if not a.placement_group_id:
            _add(held, a.required_resources)
    available = {k: max(0.0, v - held.get(k, 0.0)) for k, v in total.items()}
    return ClusterResources(total=total, available=available, nodes=len(nodes))


def cluster_resources(address: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> ClusterResources:
    """The cluster's resources, waiting (up to `timeout_s`) until it reports an alive node with resources.

    Right after `ray start --head` a cluster may not have reported yet: that is "not known yet", never
    "zero CPUs" (a sweep started with its cluster would otherwise refuse every member).
    """
    ensure_token_auth_env()
    deadline = time.monotonic() + timeout_s
    while True:
        reading = read_cluster_resources(address)
        if reading is not None:
            return reading
        if time.monotonic() >= deadline:
            raise ClusterNotReporting(
                f"{address}: no alive node with resources reported by Ray's State API after {timeout_s:.0f}s "
                f"(waited for the cluster's first resource report); is a node up? (`ray status` on the head)"
            )
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# following a job


def job_times(info) -> tuple[Optional[float], Optional[float]]:
    """Start and end of a job in epoch seconds (Ray reports milliseconds)."""
    start = info.start_time / 1000.0 if getattr(info, "start_time", None) else None
    end = info.end_time / 1000.0 if getattr(info, "end_time", None) else None
    return start, end


def wait_for_job(client, job_id: str, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> str:
    deadline = time.time() + timeout_s if timeout_s else None
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline and time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def tail_logs(client, job_id: str, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    import asyncio

    async def _tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception:  # the log websocket can drop at the end of a job: fall back to polling
        pass
    return wait_for_job(client, job_id)


def error_line(logs: str, fallback: str = "") -> str:
    """The line that says why a run failed: our CLI's `error: ...`, else the last exception line."""
    lines = [ln.strip() for ln in (logs or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return ln
    return (fallback or (lines[-1] if lines else "")).splitlines()[0] if (fallback or lines) else ""


# ---------------------------------------------------------------------------------------------
# a private Ray head (sweeps without an address, tests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RayletTimedOut(Exception):
    """`ray start` gave up waiting for its raylet to register (a fixed 30 s in Ray)."""

    def __init__(self) -> None:
        super().__init__(f"ray start --head: the node {_RAYLET_TIMEOUT}")


@dataclass
class LocalHead:
    """`ray start --head --block` on loopback with its own ports and temp dir, stoppable on its own.

    `--block` keeps the Ray processes in one process group (ours, via a new session), so stopping
    this head never touches another Ray on the machine (unlike a bare `ray stop`).
    """

    num_cpus: Optional[int] = None
    temp_dir: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    auth: bool = False
    """Token authentication: the token RAY_AUTH_TOKEN_PATH names when set (with RAY_AUTH_MODE=token), else a
    fresh one of this head's own in its temp dir; `client_env` names it."""
    token_path: Optional[str] = None
    ray_bin: Optional[str] = None
    proc: Optional[subprocess.Popen] = None
    dashboard_port: int = 0
    gcs_port: int = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def client_env(self) -> dict[str, str]:
        """What a client of this head needs in its environment (the token, when `auth`)."""
        if not self.auth:
            return {}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def _choose_token(self) -> None:
        import secrets

        given = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if os.environ.get("RAY_AUTH_MODE") == "token" and given and Path(given).is_file():
            self.token_path = given  # one token per process: Ray caches it, so never switch a process to another
            return
        path = Path(self.temp_dir) / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # Ray's own token format (ray get-auth-token --generate)
        self.token_path = str(path)

    def start(self, timeout_s: float = 90.0, attempts: int = 3) -> "LocalHead":
        """Start the head. Ray gives its raylet a fixed 30 s to register with the GCS; on a machine busy with
        other work that can pass, and `ray start` then exits saying so: that start is retried on fresh ports."""
        try:
            return _retry_raylet_timeout(lambda: self._start_once(timeout_s), self.stop, "ray start --head", attempts)
        except _RayletTimedOut:
            self.stop()
            raise OrchestratorError(f"ray start --head: the raylet did not register in Ray's 30 s, {attempts} times "
                                    f"(is the machine overloaded?): see {self.log_path}") from None

    def _start_once(self, timeout_s: float) -> "LocalHead":
        import tempfile

        # unix socket paths are limited to ~107 bytes: keep the temp dir short
        self.temp_dir = self.temp_dir or tempfile.mkdtemp(prefix="rh_", dir="/tmp")
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        if self.auth and self.token_path is None:
            self._choose_token()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        ray_bin = self.ray_bin or str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        env = dict(os.environ)
        # the job's `python` must be this interpreter (the one with the project's dependencies)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(k, None)
        env.update(self.client_env())
        env.update(self.env)
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if _RAYLET_TIMEOUT in self.log_path.read_text(errors="replace"):
                    raise _RayletTimedOut()
                raise OrchestratorError(f"ray start --head exited ({self.proc.returncode}): see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.dashboard_port), timeout=1):
                    pass
                if "--block" in self.log_path.read_text():
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise OrchestratorError(f"Ray head did not come up in {timeout_s:.0f}s: see {self.log_path}")

    def session_pids(self) -> list[int]:
        """Processes of this head: its process group, plus any process naming its temp dir."""
        import psutil

        pids = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.proc and os.getpgid(p.info["pid"]) == self.proc.pid:
                    pids.append(p.info["pid"])
                elif self.temp_dir and any(self.temp_dir in (a or "") for a in (p.info["cmdline"] or [])):
                    pids.append(p.info["pid"])
            except (ProcessLookupError, psutil.Error, OSError):
                continue
        return sorted(set(pids) - {os.getpid()})

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + grace_s
        while time.time() < deadline and self.session_pids():
            time.sleep(0.3)
        for pid in self.session_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        self._log.close()
