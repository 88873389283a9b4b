"""Plan stage: what makes two runs the same job — the config keys that change what training computes.

A checkpoint records its job's identity; a start that finds a checkpoint of another identity refuses, naming
every differing key (train.resume=force resumes anyway, train.resume=never refuses any checkpoint). What does not
change the math may differ: world size (within the elastic rules), micro batch and accumulation (the global batch
is kept), launcher, compute, logging, evaluation and checkpoint cadence, the divergence guards, and the step budget
(a longer max_steps continues the run; a shorter one than the checkpoint is refused by the resume check).
The ZeRO stage stays in: its optimizer shards do not load into another stage.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

# group -> keys that are part of the identity (None: all of the group's keys except EXCLUDED ones)
RESULT_KEYS: dict[str, Any] = {
    "model": None,
    "task": None,
    "data": None,
    "tokenizer": None,
    "optim": None,
    "schedule": None,
    "engine": ("backend", "zero_stage", "bf16", "fp16", "gradient_clipping"),
    "train": ("global_batch_size", "seed", "init_from"),
}
EXCLUDED = {
    "model": ("name",),  # a label; the sizes rule
    "data": ("cache_dir", "num_proc", "loader_workers", "eval_max_samples"),  # where and how fast, not what
}

# keys added after runs existed, left out at these values: an older run's name and checkpoint still match its job
ADDED_AT_DEFAULT = {"model.family": "bert", "model.embedding_size": None, "task.sop": False,
                    "task.distill_from": None, "task.distill_layers": None, "task.distill_temperature": 2.0,
                    "task.distill_alpha_kl": 5.0, "task.distill_alpha_mlm": 2.0, "task.distill_alpha_cos": 1.0,
                    "tokenizer.kind": "wordpiece", "task.objective": "mlm", "task.rtd_generator_layers": None,
                    "task.rtd_weight": 50.0, "task.sbo": False}


def job_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of the result-affecting keys of a job config (a plan's `config` dict), JSON-normal."""
    out: dict[str, Any] = {}
    for group, keys in RESULT_KEYS.items():
        values = config.get(group) or {}
        for key in sorted(values):
            dotted = f"{group}.{key}"
            if dotted in ADDED_AT_DEFAULT and values[key] == ADDED_AT_DEFAULT[dotted]:
                continue
            if (keys is None and key not in EXCLUDED.get(group, ())) or (keys is not None and key in keys):
                out[dotted] = values[key]
    return json.loads(json.dumps(out))


def identity_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for every key whose value differs (a key new to the schema counts only if set)."""
    missing = object()
    lines = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, missing), now.get(key, missing)
        if old is missing and new is None or new is missing and old is None:
            continue
        if old != new:
            show = lambda v: "<unset>" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(old)} -> {show(new)}")
    return lines
