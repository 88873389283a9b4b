"""Every field's rule in config/schema.py is enforced, names its key, and no float admits NaN or infinity.

The cases are generated from the schema itself: a new field with a rule is tested without a new test line.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest

from orchestrator.config.schema import JobConfig, check_job, to_job_config
from orchestrator.errors import ConfigError
from tests.conftest import compose, run_cli


def _leaves(cls, prefix=""):
    """(dotted key, dataclasses.Field) of every leaf field of a config dataclass type."""
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaves(type(default), f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


def _outside(meta) -> list:
    """Values just outside a rule: below its lower bound, above its upper one, not among its choices."""
    bad = []
    if meta.get("ge") is not None:
        bad.append(meta["ge"] - 1 if isinstance(meta["ge"], int) else meta["ge"] - 1e-3)
    if meta.get("gt") is not None:
        bad.append(meta["gt"])
    if meta.get("le") is not None:
        bad.append(meta["le"] + 1e-3)
    if meta.get("lt") is not None:
        bad.append(meta["lt"])
    if meta.get("choices") is not None:
        options = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        bad.append(99 if all(isinstance(o, int) for o in options) else "no_such_option")
    return bad


RULED = [(k, f) for k, f in _leaves(JobConfig) if any(f.metadata.get(r) is not None for r in ("ge", "gt", "le", "lt", "choices"))]
CASES = [(k, v) for k, f in RULED for v in _outside(f.metadata)]
FLOATS = [k for k, f in _leaves(JobConfig) if f.type in ("float", "Optional[float]")]


@pytest.fixture(scope="module")
def valid_job(tmp_path_factory) -> JobConfig:
    job = to_job_config(compose([]))
    job.run_dir = str(tmp_path_factory.mktemp("run"))
    check_job(job)  # the base is valid: each case below breaks exactly one field
    return job


def _set(job: JobConfig, key: str, value) -> JobConfig:
    job = copy.deepcopy(job)
    *path, leaf = key.split(".")
    obj = job
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)
    return job


def test_the_schema_has_rules_to_test():
    assert len(RULED) >= 70 and len(CASES) >= 90 and len(FLOATS) >= 20, (len(RULED), len(CASES), len(FLOATS))


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_value_outside_a_fields_rule_is_refused_naming_the_key(valid_job, key, value):
    with pytest.raises(ConfigError) as ei:
        check_job(_set(valid_job, key, value))
    assert ei.value.key == key, str(ei.value)


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_float_admits_nan_or_infinity(valid_job, key, value):
    with pytest.raises(ConfigError) as ei:
        check_job(_set(valid_job, key, value))
    assert ei.value.key == key and "finite" in str(ei.value), str(ei.value)


def test_nan_on_the_command_line_is_one_line_naming_the_key(tmp_path):
    """What an auditor typed: optim.lr=nan used to reach plan.json as NaN."""
    res = run_cli(["experiment=quickstart_pretrain", "plan_only=true", "optim.lr=nan", f"hydra.run.dir={tmp_path}/r"],
                  timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert err == ["error: config key 'optim.lr': must be a finite number, got nan"], res.stderr
    assert not (tmp_path / "r" / "plan.json").exists()
