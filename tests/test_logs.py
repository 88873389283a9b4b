"""Quiet by default: the libraries' routine logs are off in a worker unless verbose=true (orchestrator/logs.py).
The runs' own output is checked in the integration tier (test_local_train.py, test_ray_train.py: progress lines,
none of conftest.LIBRARY_NOISE)."""

from __future__ import annotations

import logging
import warnings

import pytest

from orchestrator.logs import quiet_libraries


@pytest.fixture
def restore_levels():
    from ray.train.v2._internal.execution import context
    from transformers.utils import logging as hf_logging

    ray_logger = logging.getLogger(context.__file__)
    saved = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), ray_logger.level, warnings.filters[:])
    yield ray_logger
    hf_logging.set_verbosity(saved[0])
    (hf_logging.enable_progress_bar if saved[1] else hf_logging.disable_progress_bar)()
    ray_logger.setLevel(saved[2])
    warnings.filters[:] = saved[3]


@pytest.mark.parametrize("verbose", [False, True])
def test_library_chatter_is_off_unless_verbose(restore_levels, verbose):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    restore_levels.setLevel(logging.INFO)
    quiet_libraries(verbose)
    assert (hf_logging.get_verbosity() == logging.ERROR) is not verbose, "transformers' load reports"
    assert hf_logging.is_progress_bar_enabled() is verbose, "transformers' save bars"
    assert restore_levels.isEnabledFor(logging.INFO) is verbose, "Ray Train's 'Reporting training result' lines"
    assert restore_levels.isEnabledFor(logging.WARNING), "warnings always pass"


def test_verbose_reaches_every_stage_of_a_pipeline():
    from orchestrator.driver import pass_through, refuse_job_overrides_on_pipeline

    refuse_job_overrides_on_pipeline(["verbose=true"])  # not refused as a job-level override
    assert pass_through(["verbose=true", "optim.lr=1"]) == ["verbose=true"]


def test_a_pipelines_stages_share_one_wandb_group(tmp_path):
    import json

    from conftest import compose
    from orchestrator.driver import train

    run_dir = tmp_path / "qs"
    train(compose(["experiment=quickstart", "plan_only=true", "logger=wandb"]), run_dir=str(run_dir),
          interactive=False, passed=["logger=wandb"])
    plan = json.loads((run_dir / "pretrain" / "plan.json").read_text())
    assert plan["config"]["logger"]["name"] == "wandb" and plan["config"]["logger"]["group"] == "pipeline-qs"
    train(compose(["experiment=quickstart", "plan_only=true", "logger=wandb", "logger.group=mine"]),
          run_dir=str(tmp_path / "qs2"), interactive=False, passed=["logger=wandb", "logger.group=mine"])
    assert json.loads((tmp_path / "qs2" / "pretrain" / "plan.json").read_text())["config"]["logger"]["group"] == "mine"


@pytest.mark.parametrize("overrides, module, extra, key", [
    (["logger=wandb"], "wandb", "tracking", "logger"),
    (["experiment=none", "task=ner", "task.synthetic=ner"], "seqeval", "ner", "task"),
])
def test_a_job_needing_a_missing_extra_is_refused_naming_it(tmp_path, monkeypatch, overrides, module, extra, key):
    import sys

    from conftest import compose
    from orchestrator.driver import make_plan
    from orchestrator.errors import ConfigError

    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    with pytest.raises(ConfigError) as err:
        make_plan(compose(overrides), run_dir=str(tmp_path / "run"), prepare=False)
    assert str(err.value) == (f"config key '{key}': {overrides[-1] if key == 'logger' else 'task=ner'} needs {module},"
                              f" which is in the '{extra}' extra: pip install 'bert-orchestrator[{extra}]' (or pip"
                              f" install {module})")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir()), "refused before any work"


def test_the_default_install_leaves_the_extras_out():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert not any(m in core for m in ("wandb", "optuna", "seqeval"))
    assert {"tracking", "sweeps", "ner"} <= project["optional-dependencies"].keys()
