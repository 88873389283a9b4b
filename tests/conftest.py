"""Shared test fixtures: offline env, one token cache per session, Hydra compose, one Ray instance."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["BERT_ORCH_FAULTS_ENABLED"] = "1"  # the fault-injection hook works only where enabled on purpose
# Ray Train's controller notices finished workers at its next health check (default every 2 s): ~3 s less per
# Ray job, in every process the tests start (Ray Train propagates it to its controller and workers).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def _session_ray_token() -> None:
    """Every Ray the tests start (the shared local instance, heads, test clusters, CLI subprocesses) uses token
    auth with one token: Ray caches the auth mode and token per process, and a process that talks to a cluster
    with another setting afterwards is refused (InvalidAuthToken), even from its background threads."""
    import atexit
    import secrets
    import shutil
    import tempfile

    if os.environ.get("RAY_AUTH_MODE") == "token" and os.path.isfile(os.environ.get("RAY_AUTH_TOKEN_PATH", "")):
        return
    d = tempfile.mkdtemp(prefix="bert_orch_test_token_")
    atexit.register(shutil.rmtree, d, True)  # the process that made it (pytest's controller) removes it at exit
    path = os.path.join(d, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path


_session_ray_token()


def _threads_per_xdist_worker() -> int:
    """The cores this process may use, shared out among pytest-xdist's workers (0 outside xdist). torch's default
    is every core in every worker: on 2 cores and 2 workers, 4 OpenMP threads that spin while they wait for each
    other. tests/test_families.py's fast tests took 47 s that way and 12.7 s with one thread per worker."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return 0
    return max(1, len(os.sched_getaffinity(0)) // workers)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with its worker's share of the cores (a job run in-process sets its own count)."""
    n = _threads_per_xdist_worker()
    if n:
        import torch

        torch.set_num_threads(n)
    yield


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Vocabularies and token arrays are cached once per session (what users get across runs)."""
    cache = os.environ.get("BERT_ORCH_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["BERT_ORCH_CACHE"] = cache
    yield cache


# The suite runs on 2 pytest-xdist workers (pyproject addopts: `-n 2 --dist loadgroup`). Tests that share something
# costly run as one xdist group, on one worker, one after another, so that it is made once:
# - a Ray instance (`ray_cluster`, `ray_head`): started for the group's first test and stopped after its last (an
#   idle Ray still costs 0.07-0.10 core: GCS, raylet, dashboard, agents). (test_ray_train.py's two long jobs start
#   their own local Ray, as README command 1 does: they are plain `slow` tests, free to run beside the group.)
# - a module-scoped fixture of the integration tier (`slow`: trained runs): on both workers, it would be built
#   twice. (The unit tier's module fixtures are cheap; its tests spread over both workers.)
# A test that shares two of these joins both into one group. Groups and `slow` tests are handed out first (the
# longest work first, the short unit tests fill the gaps at the end). pytest is pinned below 9.2 (constraints.txt):
# 9.2's Node.nodeid no longer reads `_nodeid`, where pytest-xdist 3.8 writes the group (pytest-xdist#1386).
def _share_keys(item) -> list[str]:
    keys = []
    if "ray_head" in item.fixturenames:
        keys.append("ray_head")
    if "ray_cluster" in item.fixturenames:
        keys.append("ray_local")
    # the unit tier's module fixtures are cheap: its tests spread freely
    if item.get_closest_marker("slow") and any(
            defs and defs[-1].scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values()):
        keys.append(f"module_{item.path.stem}")
    return keys


def _xdist_groups(items) -> dict:
    """item -> group name: the tests that share a key (union-find over the keys), named by their first key."""
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    keys = {item: _share_keys(item) for item in items}
    for ks in keys.values():
        for k in ks[1:]:
            parent[find(k)] = find(ks[0])
    return {item: find(ks[0]) for item, ks in keys.items() if ks}


# The longest `slow` tests outside the groups, longest first (seconds on a fresh clone, 2-core EPYC, 2026-12-04):
# handed out first, so that neither worker is left alone with one of them at the end (longest-processing-time
# order; the rest keep file order, and the short unit tests fill the gaps).
LONGEST_FIRST = (
    "test_faults.py::test_elastic_two_node_cluster_shrinks_and_grows",  # 158
    "test_ray_train.py::test_default_pipeline_pretrains_then_finetunes",  # 155
    "test_bench_smoke.py::test_throughput_bench_tiny_all_three_phases",  # 82
    "test_finetune.py::test_qa_windows_beat_the_first_window_baseline",  # 61
    "test_ray_train.py::test_ray_job_killed_with_sigkill_resumes_with_same_command",  # 52
    "test_gpu_placement.py::test_two_nodes_of_four_gpus_one_worker_per_gpu",  # 47
    "test_cluster_resources.py::test_a_head_just_started_is_read_at_once_and_a_sweep_on_a_private_head_runs",  # 46
)


def _longest_rank(item) -> int:
    return next((i for i, name in enumerate(LONGEST_FIRST) if item.nodeid.endswith(name)), len(LONGEST_FIRST))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the marks into the scheduling groups
def pytest_collection_modifyitems(config, items):
    groups = _xdist_groups(items)
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    # each group's tests next to each other (also with `-n 0`: one start per Ray instance); groups, then `slow`
    # tests (the longest first), then the rest, each in file order (xdist then hands out groups with more tests first)
    first = {g: i for i, g in enumerate(dict.fromkeys(groups[it] for it in items if it in groups))}
    items.sort(key=lambda it: (0, first[groups[it]]) if it in groups
               else (1, _longest_rank(it)) if it.get_closest_marker("slow") else (2, 0))


def compose(overrides: list[str]):
    """Compose one job. The default experiment is the quickstart *pipeline*; tests of single jobs start
    from its pretraining stage unless they name an experiment themselves."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        if not any(o.startswith("experiment=") for o in overrides):
            overrides = ["experiment=quickstart_pretrain", *overrides]
        return hcompose(config_name="config", overrides=list(overrides))


# Library lines a run does not print unless verbose=true (orchestrator/logs.py)
LIBRARY_NOISE = ("Setting accelerator to CPU", "Reporting training result", "UNEXPECTED", "Writing model shards",
                 "FutureWarning", "PreemptionWatcher", "Token authentication is")


def progress_steps(output: str, total: int) -> list[int]:
    """The steps of the progress lines in a run's output (one per log step: step/total, ..., elapsed, ETA), after
    checking that the output holds none of the libraries' routine lines."""
    import re

    noise = [ln for ln in output.splitlines() if any(n in ln for n in LIBRARY_NOISE)]
    assert not noise, noise[:5]
    pattern = re.compile(rf"\bstep (\d+)/{total} \(\d+%\)  loss .* tok/s  elapsed \d+:\d\d  eta (\d+:\d\d|\?)$")
    return [int(m.group(1)) for ln in output.splitlines() if (m := pattern.search(ln))]


def assert_page_links_valid_pngs(page: Path) -> list[str]:
    """Every PNG in the report dir is a valid image and the page links each one (and nothing outside the dir)."""
    import re

    from PIL import Image

    text = page.read_text()
    links = re.findall(r'<img src="([^"]+)"', text)
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert pngs and sorted(links) == pngs, (links, pngs)
    for name in pngs:
        with Image.open(page.parent / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
            im.verify()
    return links


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _ray_auth_follows_the_environment():
    """Ray caches its auth mode and token per process: a test that pointed this process at a token-auth
    cluster (and restored the environment) must not leave the next test's Ray start demanding a token."""
    yield
    from orchestrator.launch.ray_job import sync_ray_auth

    sync_ray_auth()


class _Shared:
    """A Ray instance the tests of a group share on this xdist worker: started before the first test that asks for
    it (by fixture name), stopped after the last one in a row, started again if a later test asks for it."""

    def __init__(self, start, stop):
        self._start, self._stop, self.handle = start, stop, None

    def acquire(self):
        if self.handle is None:
            self.handle = self._start()
        return self.handle

    def release(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            self._stop(handle)


def _start_local_ray():
    import ray

    from orchestrator.launch.ray_job import connect_ray

    # no dashboard: the tests' fits on it need no state API (the placement-group cleaner that polls it is left out on
    # a Ray this process started), and its head modules are ~10 more processes; the CLI's local Ray keeps its own
    connect_ray(address="local", num_cpus=2, include_dashboard=False)
    return ray


_HEAD = None


def _start_head():
    """One private 2-CPU `ray start --head` (loopback, own ports and temp dir, token auth with the session's
    token), the same `LocalHead` each time it is started; only its own processes are stopped."""
    from orchestrator.launch import ray_job

    global _HEAD
    _HEAD = _HEAD or ray_job.LocalHead(num_cpus=2, auth=True)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            mp.delenv(k, raising=False)
        _HEAD.start()
    assert _HEAD.client_env()["RAY_AUTH_TOKEN_PATH"] == os.environ["RAY_AUTH_TOKEN_PATH"]
    return _HEAD


def _stop_head(h) -> None:
    h.stop()
    assert not h.session_pids(), "the head's processes are gone"


_SHARED = {"ray_cluster": _Shared(_start_local_ray, lambda ray: ray.shutdown()),
           "ray_head": _Shared(_start_head, _stop_head)}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for name, shared in _SHARED.items():
        if name in item.fixturenames:
            shared.acquire()


@pytest.hookimpl(trylast=True)  # after the test's fixtures (a module's fixture may use the instance) are torn down
def pytest_runtest_teardown(item, nextitem):
    for name, shared in _SHARED.items():
        if name in item.fixturenames and (nextitem is None or name not in nextitem.fixturenames):
            shared.release()


def pytest_sessionfinish(session):
    for shared in _SHARED.values():
        shared.release()


@pytest.fixture(scope="session")
def ray_cluster():
    """The local Ray instance (2 CPUs) shared by the Ray tests in a row: the launcher joins it, never restarts it."""
    return _SHARED["ray_cluster"].acquire()


@pytest.fixture(scope="session")
def ray_head():
    """The private head shared by the Ray Jobs and sweep tests in a row (a `LocalHead`)."""
    return _SHARED["ray_head"].acquire()


def run_cli(args: list[str], cwd: Path = REPO, timeout: float = 900, env_extra: dict | None = None):
    import subprocess

    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _train_plans(config) -> None:
    """Train function of `train_in_one_worker_group`: each plan in turn, on the group's one process group."""
    from orchestrator.worker.trainer import run

    for plan_dict in config["plans"]:
        run(plan_dict, reporter=None, interactive=False)


def train_in_one_worker_group(jobs: list) -> list[dict]:
    """Plan each (cfg, run_dir) pair and train them one after another in ONE Ray Train worker group (one group
    start instead of one per job), for tests whose assertion is about the training math, not the launcher.
    Returns each job's summary.json."""
    from ray import cloudpickle

    from orchestrator.driver import make_plan
    from orchestrator.launch.ray_train import torch_trainer, trainer_configs

    plans = [make_plan(cfg, run_dir=str(run_dir))[0] for cfg, run_dir in jobs]
    assert len({p.world_size for p in plans}) == 1, "one worker group: one world size"
    for p in plans:
        p.write(p.run_dir)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/conftest.py
    scaling, run_config = trainer_configs(plans[0])
    result = torch_trainer(_train_plans, train_loop_config={"plans": [p.to_dict() for p in plans]},
                           scaling_config=scaling, run_config=run_config).fit()
    if result.error is not None:
        raise result.error
    return [json.loads((Path(p.run_dir) / "summary.json").read_text()) for p in plans]
