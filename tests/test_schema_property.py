"""Property: any invalid value of any schema field, given as a command-line override, is refused with one line
naming that key (exit status 2 in the CLI), never a traceback. Values are drawn by hypothesis from each field's
own rule (below / above its range, NaN and infinity, outside its choices, the wrong type)."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config.schema import JobConfig
from orchestrator.driver import train
from orchestrator.errors import OrchestratorError
from tests.conftest import compose
from tests.test_schema_rules import _leaves

FIELDS = [(k, f) for k, f in _leaves(JobConfig) if f.type in ("int", "float", "str", "Optional[int]", "Optional[float]",
                                                               "Optional[str]") and not k.startswith("pipeline")]
RULED = [(k, f) for k, f in FIELDS if any(f.metadata.get(r) is not None for r in ("ge", "gt", "le", "lt", "choices"))]


def _render(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        return "'" + v + "'"
    return repr(v)


@st.composite
def invalid_override(draw):
    key, f = draw(st.sampled_from(RULED))
    m, is_int = f.metadata, "int" in f.type
    kinds = []
    numbers = st.integers if is_int else (lambda lo=None, hi=None: st.floats(lo, hi, allow_nan=False))
    if m.get("ge") is not None:
        kinds.append(numbers(max_value=m["ge"] - 1) if is_int else st.floats(max_value=m["ge"], exclude_max=True,
                                                                              allow_nan=False, allow_infinity=False))
    if m.get("gt") is not None:
        kinds.append(st.integers(max_value=int(m["gt"])) if is_int else st.floats(max_value=m["gt"], allow_nan=False,
                                                                                   allow_infinity=False))
    if m.get("le") is not None:
        kinds.append(st.floats(min_value=m["le"], exclude_min=True, allow_nan=False, allow_infinity=False))
    if m.get("lt") is not None:
        kinds.append(st.floats(min_value=m["lt"], allow_nan=False, allow_infinity=False))
    if m.get("choices") is not None:
        options = m["choices"]() if callable(m["choices"]) else m["choices"]
        kinds.append(st.integers(-5, 99).filter(lambda v: v not in options) if is_int
                     else st.from_regex(r"\A[a-z][a-z_]{0,11}\Z").filter(lambda v: v not in options))
    if "float" in f.type:
        kinds.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    if f.type != "str" and f.type != "Optional[str]":
        kinds.append(st.from_regex(r"\A[a-z]{1,8}\Z").filter(lambda v: v not in ("nan", "inf", "null", "true", "false")))
    value = draw(st.one_of(*kinds))
    return key, f"{key}={_render(value)}"


BASES = {  # a job whose composed config holds the key: task keys live in their task's group file
    "pretrain": ["experiment=quickstart_pretrain"],
    "classify": ["experiment=none", "task=classify", "task.synthetic=category", "task.max_seq_length=256"],
    "ner": ["experiment=none", "task=ner", "task.synthetic=ner", "task.max_seq_length=256"],
    "qa": ["experiment=none", "task=qa", "task.synthetic=squad", "task.max_seq_length=256"],
    "embed": ["experiment=none", "task=embed", "task.synthetic=retrieval", "task.max_seq_length=256"],
    "rerank": ["experiment=none", "task=rerank", "task.synthetic=retrieval", "task.max_seq_length=256"],
}
_COMPOSED: dict = {}


def _base_with(key: str):
    """A composed base config (cached: composing reads every YAML file) holding `key`, and whether to add it."""
    from omegaconf import OmegaConf

    for name, overrides in BASES.items():
        if name not in _COMPOSED:
            _COMPOSED[name] = compose([*overrides, "plan_only=true", "launcher=local", "compute=cpu1"])
        if OmegaConf.select(_COMPOSED[name], key, default="<absent>", throw_on_missing=False) != "<absent>":
            return _COMPOSED[name], False
    return _COMPOSED["pretrain"], True  # in no group file (e.g. run_dir): a user adds it with +key=...


@pytest.mark.slow  # 320 plans (~25 s)
@settings(max_examples=320, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=invalid_override())
def test_every_invalid_value_is_one_line_naming_its_key(case, tmp_path_factory):
    """The override is parsed by Hydra's own override grammar and applied to a composed config (what `compose`
    does, without re-reading the YAML tree for each of the 320 cases), then planned as the CLI plans it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    key, override = case
    base, add = _base_with(key)
    value = OverridesParser.create().parse_override(override).value()
    cfg = copy.deepcopy(base)
    OmegaConf.update(cfg, key, value, force_add=add)
    try:
        train(cfg, run_dir=str(tmp_path_factory.mktemp("p")))
    except OrchestratorError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(f"config key '{key}'"), (override, msg)
    else:
        raise AssertionError(f"{override} was accepted")


def test_every_schema_field_is_in_a_group_file():
    """So that `key=value` works on the command line (Hydra refuses keys its YAML lacks without a `+`)."""
    absent = [k for k, _ in FIELDS if _base_with(k)[1] and k not in ("run_dir", "debug_note")]
    assert not absent, absent


def test_the_property_covers_every_ruled_field():
    assert len(RULED) >= 75, len(RULED)
