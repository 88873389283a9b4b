"""Every shipped GPU preset plans, or is refused with a message that says what to change: each GPU `compute=`
preset x pretraining experiment (BERT-Base/Large, phase 1/2) x `engine=zero0..zero3` (+ the offload variants).
Every DeepSpeed config the plan renders is accepted by DeepSpeed's own config class, given the plan's
data-parallel size (a stub mpu: DeepSpeedConfig reads the world size from it)."""

from __future__ import annotations

import itertools
import re

import pytest

from conftest import REPO, compose

GPU_COMPUTE = sorted(p.stem for p in (REPO / "conf" / "compute").glob("gpu_*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("bert_*_pretrain*.yaml"))
ENGINES = {
    "zero0": ["engine=zero0"], "zero1": ["engine=zero1"], "zero2": ["engine=zero2"], "zero3": ["engine=zero3"],
    "zero2_offload": ["engine=zero2", "engine.offload_optimizer=true"],
    "zero3_offload": ["engine=zero3", "engine.offload_optimizer=true", "engine.offload_param=true"],
}
COMBOS = list(itertools.product(GPU_COMPUTE, EXPERIMENTS, ENGINES))
# a refusal must name a key and a concrete change
FIX = re.compile(r"config key '[\w.]+'.*((set|use) [\w.]+=|lower |raise |enable )")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A corpus for data.paths and, for phase 2, a phase-1 checkpoint dir of the model's shape (config only:
    planning does not read weights)."""
    from transformers import BertConfig

    root = tmp_path_factory.mktemp("presets")
    (root / "corpus.txt").write_text("One sentence here. Another one there.\n\nA second document.\n")
    dirs = {}
    for name, shape in {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072),
                        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      intermediate_size=4096)}.items():
        d = root / f"phase1_{name}"
        d.mkdir()
        BertConfig(vocab_size=30522, max_position_embeddings=512, **shape).to_json_file(str(d / "config.json"))
        (d / "model.safetensors").write_bytes(b"")  # planning checks the weights are there; it reads config.json only
        dirs[name] = d
    return {"corpus": root / "corpus.txt", "phase1": dirs}


def _plan(compute: str, experiment: str, engine: str, inputs, run_dir):
    from orchestrator.driver import make_plan

    overrides = [f"experiment={experiment}", f"compute={compute}", *ENGINES[engine],
                 f"data.paths=[{inputs['corpus']}]"]
    if experiment.endswith("phase2"):
        overrides.append(f"train.init_from={inputs['phase1']['large' if 'large' in experiment else 'base']}")
    return make_plan(compose(overrides), str(run_dir), prepare=False)[0]


class _DataParallel:
    """What DeepSpeedConfig asks of an mpu to learn the data-parallel size without a process group."""

    def __init__(self, size: int):
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def _deepspeed_accepts(ds_config: dict, world_size: int, monkeypatch) -> None:
    import deepspeed.runtime.config as ds_runtime_config
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig asks dist.get_rank() first and falls back to world size 1 without a process group
    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)
    checked = DeepSpeedConfig(dict(ds_config), mpu=_DataParallel(world_size))
    assert checked.world_size == world_size
    assert checked.train_batch_size == ds_config["train_batch_size"]
    assert checked.train_micro_batch_size_per_gpu == ds_config["train_micro_batch_size_per_gpu"]
    assert checked.gradient_accumulation_steps == ds_config["gradient_accumulation_steps"]
    assert checked.zero_optimization_stage == ds_config["zero_optimization"]["stage"]
    assert checked.bfloat16_config.enabled == ds_config["bf16"]["enabled"]
    offload = ds_config["zero_optimization"].get("offload_optimizer")
    if offload:  # parsed into DeepSpeed's own offload config, not ignored
        assert checked.zero_config.offload_optimizer.device == offload["device"]


@pytest.mark.slow  # 78 compositions and DeepSpeed config checks: ~25 s
def test_every_gpu_preset_combination_plans_or_says_what_to_change(inputs, tmp_path, monkeypatch):
    from orchestrator.errors import ConfigError

    planned, refused = [], []
    for compute, experiment, engine in COMBOS:
        try:
            plan = _plan(compute, experiment, engine, inputs, tmp_path / f"{compute}_{experiment}_{engine}")
        except ConfigError as exc:
            msg = str(exc)
            assert FIX.search(msg), f"{compute} x {experiment} x {engine} refused without a fix: {msg}"
            refused.append((compute, experiment, engine, msg))
            continue
        planned.append((compute, experiment, engine))
        assert plan.world_size == plan.num_nodes * plan.workers_per_node
        assert plan.deepspeed_config["zero_optimization"]["stage"] == int(engine[4])
        if "offload" in engine:
            assert plan.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
            assert plan.deepspeed_config["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
        _deepspeed_accepts(plan.deepspeed_config, plan.world_size, monkeypatch)
    for row in refused:
        print("refused:", *row)
    print(f"{len(planned)} of {len(COMBOS)} combinations plan; {len(refused)} are refused with a fix")
    # the single-node preset plans BERT-Base under every engine, and BERT-Large's LAMB recipe under ZeRO-0
    assert {(c, e, g) for c, e, g in COMBOS if c == "gpu_1x8" and "base" in e} <= set(planned)
    assert {("gpu_1x8", e, "zero0") for e in EXPERIMENTS} <= set(planned)
    # every recipe plans on its own compute preset with its own engine, as shipped
    for experiment in EXPERIMENTS:
        from orchestrator.driver import make_plan

        extra = ([f"train.init_from={inputs['phase1']['large' if 'large' in experiment else 'base']}"]
                 if experiment.endswith("phase2") else [])
        plan = make_plan(compose([f"experiment={experiment}", f"data.paths=[{inputs['corpus']}]", *extra]),
                         str(tmp_path / f"shipped_{experiment}"), prepare=False)[0]
        assert plan.job.compute.use_gpu, experiment
        _deepspeed_accepts(plan.deepspeed_config, plan.world_size, monkeypatch)


def test_deepspeed_refuses_a_config_whose_batch_does_not_multiply(inputs, tmp_path, monkeypatch):
    """The check above can fail: DeepSpeed's own class refuses a batch triple that does not multiply."""
    plan = _plan("gpu_1x8", "bert_base_pretrain", "zero2", inputs, tmp_path / "x")
    bad = {**plan.deepspeed_config, "gradient_accumulation_steps": plan.grad_accum_steps + 1}
    with pytest.raises(AssertionError, match="train_batch_size"):
        _deepspeed_accepts(bad, plan.world_size, monkeypatch)
