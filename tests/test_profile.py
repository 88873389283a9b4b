"""train.profile_steps: the chosen optimizer steps run under torch.profiler on every rank, which writes a summary by
category, torch's op table and a Chrome trace; the training itself is the same as without it."""

from __future__ import annotations

import json

import pytest

from conftest import compose, read_jsonl, train_in_one_worker_group
from orchestrator.driver import train
from orchestrator.errors import ConfigError

TINY = ["experiment=none", "launcher=local", "compute=cpu1", "engine=torch", "data.synthetic_documents=120",
        "tokenizer.vocab_size=256", "task.max_seq_length=32", "train.global_batch_size=8",
        "train.micro_batch_size_per_gpu=8", "train.max_steps=4", "train.log_every_steps=1",
        "train.eval_every_steps=null", "train.checkpoint_every_steps=4"]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "event" not in r}


def _profile(run_dir, rank: int) -> dict:
    summary = json.loads((run_dir / "profile" / f"rank{rank}.json").read_text())
    trace = json.loads((run_dir / "profile" / f"rank{rank}.trace.json").read_text())
    assert trace["traceEvents"], "the trace holds the profiled steps' events"
    assert "Self CPU" in (run_dir / "profile" / f"rank{rank}.txt").read_text()
    return summary


def test_profiled_steps_write_summary_table_and_trace_and_train_the_same(tmp_path):
    plain = train(compose(TINY), run_dir=str(tmp_path / "plain"))
    profiled = train(compose([*TINY, "train.profile_steps=[2,3]"]), run_dir=str(tmp_path / "profiled"))
    assert plain["status"] == profiled["status"] == "completed"
    assert _losses(tmp_path / "profiled") == _losses(tmp_path / "plain"), "profiling changes no number"
    assert not (tmp_path / "plain" / "profile").exists()
    summary = _profile(tmp_path / "profiled", 0)
    assert summary["profiled_steps"] == [2, 3] and summary["steps"] == 2
    cats = summary["categories"]
    assert cats["matmul"]["ms_per_step"] > 0 and summary["top_ops"][0]["self_ms_per_step"] > 0
    assert sum(c["fraction"] for c in cats.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("steps, why", [("[3]", "[first, last]"), ("[3,2]", "1 <= first <= last"),
                                        ("[0,1]", "1 <= first"), ("[3,9]", "past train.max_steps=4")])
def test_a_profile_window_that_cannot_run_is_refused_naming_the_key(steps, why):
    with pytest.raises(ConfigError) as ei:
        train(compose([*TINY, f"train.profile_steps={steps}", "plan_only=true"]))
    assert ei.value.key == "train.profile_steps" and why in str(ei.value)


@pytest.mark.slow
def test_each_ray_worker_profiles_its_steps_and_the_collectives_show(ray_cluster, tmp_path):
    """Two workers under ZeRO-2: each writes its own files, and the gradient reduce-scatter / parameter all-gather
    over gloo is its own category (what the throughput bench's profile of (c) reads)."""
    cfg = compose([*TINY, "launcher=ray", "compute=cpu2", "engine=zero2", "train.micro_batch_size_per_gpu=4",
                   "train.profile_steps=[3,4]"])
    (summary,) = train_in_one_worker_group([(cfg, tmp_path / "run")])
    assert summary["status"] == "completed" and summary["world_size"] == 2
    for rank in (0, 1):
        prof = _profile(tmp_path / "run", rank)
        assert prof["rank"] == rank and prof["profiled_steps"] == [3, 4]
        assert prof["categories"]["collectives"]["ms_per_step"] > 0, prof["categories"]
