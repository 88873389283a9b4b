"""Memory planner vs HF parameter counts and DeepSpeed's own ZeRO estimators; FLOPs hand count; time/cost."""

import math
import warnings

import pytest

from orchestrator.errors import ConfigError
from orchestrator.plan.memory import (
    GPU_PEAK_TFLOPS,
    MemoryEstimate,
    estimate_memory,
    estimate_model_states,
    estimate_time_cost,
    flops_per_token,
    format_cost,
    format_memory_table,
    largest_layer_params,
    parameter_count,
)

BASE = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, vocab_size=30522)
LARGE = dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, vocab_size=30522)
HEADS = {"base": 12, "large": 16}
SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=1000,
             max_position_embeddings=128, type_vocab_size=3)


# --------------------------------------------------------------------------- parameter counts


def _hf_model(cls_name: str, **kw):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=kw["hidden_size"], num_hidden_layers=kw["num_hidden_layers"],
                                  num_attention_heads=4, intermediate_size=kw["intermediate_size"],
                                  vocab_size=kw["vocab_size"], max_position_embeddings=kw["max_position_embeddings"],
                                  type_vocab_size=kw["type_vocab_size"])
    return getattr(transformers, cls_name)(cfg)


def test_parameter_count_matches_hf_bert_for_pretraining():
    model = _hf_model("BertForPreTraining", **SMALL)
    # parameters() de-duplicates the tied decoder weight, as DeepSpeed's model_to_params does by data_ptr
    assert parameter_count(**SMALL) == sum(p.numel() for p in model.parameters())


def test_parameter_count_matches_hf_bert_model_without_heads():
    model = _hf_model("BertModel", **SMALL)
    assert parameter_count(**SMALL, with_pretraining_heads=False) == sum(p.numel() for p in model.parameters())


def test_largest_layer_matches_deepspeed_model_to_params():
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = _hf_model("BertForPreTraining", **SMALL)
    total, largest = model_to_params(model)
    assert total == parameter_count(**SMALL)
    assert largest == largest_layer_params(SMALL["hidden_size"], SMALL["intermediate_size"], SMALL["vocab_size"])


def test_bert_base_and_large_sizes():
    # the well-known ~110M / ~340M figures
    assert parameter_count(**BASE) == 110_106_428
    assert parameter_count(**LARGE) == 336_226_108


# --------------------------------------------------------------------------- model states vs DeepSpeed


def _ds_estimators():
    warnings.filterwarnings("ignore")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def _ours(model, stage, n, **kw):
    P = parameter_count(**model)
    L = largest_layer_params(model["hidden_size"], model["intermediate_size"], model["vocab_size"])
    ms = estimate_model_states(P, L, zero_stage=stage, world_size=n, precision="bf16", **kw)
    return P, L, ms["params"] + ms["gradients"] + ms["optimizer"] + ms["buffers"]


CASES = [(name, model, stage, nodes)
         for name, model in (("base", BASE), ("large", LARGE))
         for stage in (0, 1, 2, 3)
         for nodes in (1, 2)]


@pytest.mark.parametrize("name,model,stage,nodes", CASES)
def test_model_states_within_10pct_of_deepspeed(name, model, stage, nodes):
    """What is compared (GPU bytes of model states, 8 GPUs per node x ``nodes``, bf16, AdamW, no offload):

    - DeepSpeed ships two estimators: ``estimate_zero2_model_states_mem_needs`` in stage_1_and_2.py, used
      for both stage 1 and stage 2 (it has no separate stage-1 formula), and
      ``estimate_zero3_model_states_mem_needs`` in stage3.py.  The ``*_all_cold`` wrappers only print, so we
      call the functions they wrap.  ``additional_buffer_factor`` (1.5) applies to their *CPU* figure only.
    - ZeRO-0: DeepSpeed's stage-2 formula with a single GPU (no partitioning) = 20 B/param.
    - ZeRO-1: DeepSpeed's formula is the stage-2 one, which partitions the 16-bit gradients; stage 1 keeps
      them whole.  We compare our figure minus that unpartitioned part, 2P(1-1/N), and check the part
      exactly (test below).
    - ZeRO-2: direct (2P + 18P/N).
    - ZeRO-3: direct.  DeepSpeed counts 18 B/param partitioned + 4 B x largest layer; we count 20
      (16-bit grad partition in the default grad_accum_dtype plus the fp32 copy made for the step), i.e.
      +2P/N: 8.1% (Base) / 9.5% (Large) above DeepSpeed at N=8, less at N=16; at N<=4 the gap exceeds 10%
      for Large, which the exact-difference test below pins down instead.
    """
    z2, z3 = _ds_estimators()
    gpus = 8 * nodes
    P, L, ours = _ours(model, stage, gpus)
    if stage == 0:
        _, deepspeed_bytes = z2(P, num_gpus_per_node=1, num_nodes=1, cpu_offload=False)
    elif stage in (1, 2):
        _, deepspeed_bytes = z2(P, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=False)
    else:
        _, deepspeed_bytes, _ = z3(P, L, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=False, cpu_offload_params=False,
                      zero_init=True)
    compared = ours - (2 * P - 2 * P // gpus if stage == 1 else 0)
    assert abs(compared - deepspeed_bytes) / deepspeed_bytes < 0.10, (name, stage, gpus, compared, deepspeed_bytes)


@pytest.mark.parametrize("model", [BASE, LARGE])
def test_stage1_keeps_full_16bit_grads_and_stage3_adds_2_bytes(model):
    z2, z3 = _ds_estimators()
    P, L, s1 = _ours(model, 1, 8)
    _, _, s2 = _ours(model, 2, 8)
    assert s1 - s2 == pytest.approx(2 * P * (1 - 1 / 8), abs=2)
    _, _, s3 = _ours(model, 3, 8)
    _, ds3, _ = z3(P, L, 8, 1, cpu_offload=False, cpu_offload_params=False, zero_init=True)
    assert s3 - ds3 == pytest.approx(2 * P / 8, abs=4)


@pytest.mark.parametrize("model", [BASE, LARGE])
@pytest.mark.parametrize("stage,offp", [(2, False), (3, False), (3, True)])
def test_offload_matches_deepspeed(model, stage, offp):
    z2, z3 = _ds_estimators()
    P, L, ours = _ours(model, stage, 8, offload_optimizer=True, offload_param=offp)
    if stage == 2:
        _, deepspeed_bytes = z2(P, 8, 1, cpu_offload=True)
    else:
        _, deepspeed_bytes, _ = z3(P, L, 8, 1, cpu_offload=True, cpu_offload_params=offp, zero_init=True)
    assert abs(ours - deepspeed_bytes) / deepspeed_bytes < 0.10


def test_stage_ordering_and_fp32():
    totals = [_ours(LARGE, s, 8)[2] for s in range(4)]
    assert totals == sorted(totals, reverse=True)
    P = parameter_count(**BASE)
    fp32 = estimate_model_states(P, 0, zero_stage=0, world_size=1, precision="fp32")
    assert fp32["params"] == 4 * P and fp32["gradients"] == 4 * P and fp32["optimizer"] == 8 * P


def test_offload_moves_states_to_host():
    P, L = parameter_count(**BASE), largest_layer_params(768, 3072, 30522)
    on = estimate_model_states(P, L, zero_stage=2, world_size=8)
    off = estimate_model_states(P, L, zero_stage=2, world_size=8, offload_optimizer=True)
    assert off["optimizer"] == 0 and off["gradients"] == 0 and off["params"] == on["params"]
    assert off["cpu"] == pytest.approx(on["optimizer"] + on["gradients"], abs=4)


@pytest.mark.parametrize("kw,key", [
    (dict(zero_stage=4, world_size=8), "engine.zero_stage"),
    (dict(zero_stage=0, world_size=8, offload_optimizer=True), "engine.offload_optimizer"),
    (dict(zero_stage=2, world_size=8, offload_optimizer=True, offload_param=True), "engine.offload_param"),
    (dict(zero_stage=2, world_size=8, precision="fp8"), "engine.precision"),
    (dict(zero_stage=2, world_size=0), "compute"),
])
def test_invalid_settings_are_config_errors(kw, key):
    with pytest.raises(ConfigError) as e:
        estimate_model_states(1000, 10, **kw)
    assert e.value.key == key


# --------------------------------------------------------------------------- activations / full estimate


def test_activation_formula_matches_korthikanti_for_ffn_4h():
    """With i = 4h and 16-bit activations the per-layer term is sbh(34 + 5as/h) (Korthikanti et al. 2022)."""
    from orchestrator.plan.memory import activation_bytes

    b, s, h, a, L, v = 8, 512, 1024, 16, 24, 30522
    kw = dict(hidden_size=h, num_hidden_layers=L, intermediate_size=4 * h, num_attention_heads=a, vocab_size=v,
              micro_batch_size=b, seq_length=s, precision="bf16")
    one = activation_bytes(**{**kw, "num_hidden_layers": 1})
    two = activation_bytes(**{**kw, "num_hidden_layers": 2})
    assert two - one == s * b * h * (34 + 5 * a * s / h)
    ckpt = activation_bytes(**kw, activation_checkpointing=True)
    full = activation_bytes(**kw)
    assert ckpt < full / 5
    assert activation_bytes(**kw, flash_attention=True) < full
    assert activation_bytes(**kw, sparse_mlm=True) < full


def test_estimate_memory_bert_large_fits_a100_with_zero2():
    est = estimate_memory(**LARGE, num_attention_heads=16, zero_stage=2, world_size=8, precision="bf16",
                          micro_batch_size=8, seq_length=512)
    assert isinstance(est, MemoryEstimate)
    assert est.total_bytes == est.params_bytes + est.gradients_bytes + est.optimizer_bytes + \
        est.buffers_bytes + est.activations_bytes
    # at micro batch 8 x 512 tokens activations (~7.7 GiB, 24 layers x sbh(34 + 5as/h)) dominate model states
    assert est.activations_bytes > est.model_states_bytes
    assert 6 * 2**30 < est.total_bytes < 40 * 2**30  # fits a 40 GB A100
    d = est.to_dict()
    assert d["total_bytes"] == est.total_bytes and d["zero_stage"] == 2 and d["num_params"] == 336_226_108
    with pytest.raises(Exception):
        est.zero_stage = 3  # frozen
    lines = format_memory_table([est], gpu_memory_gib=8)
    assert len(lines) == 3 and "does not fit" in lines[2]
    assert "does not fit" not in format_memory_table(est, gpu_memory_gib=80)[2]


# --------------------------------------------------------------------------- FLOPs


def test_flops_per_token_bert_base_hand_count():
    h, L, i, s, V = 768, 12, 3072, 128, 30522
    # per layer, forward, per token (2 FLOPs per multiply-add):
    qkv = 3 * (2 * 768 * 768)            # 3 projections h->h             = 3,538,944
    scores = 2 * 128 * 768               # q . k for 128 keys, all heads  =   196,608
    context = 2 * 128 * 768              # probs . v                      =   196,608
    out_proj = 2 * 768 * 768             #                                = 1,179,648
    ffn = 2 * 768 * 3072 + 2 * 3072 * 768  #                              = 9,437,184
    layer = qkv + scores + context + out_proj + ffn
    assert layer == 14_548_992
    mlm_all = 2 * 768 * 768 + 2 * 768 * 30522   # transform + decoder on one token = 48,059,520
    nsp = (2 * 768 * 768 + 2 * 768 * 2) / 128   # pooler + classifier once per 128-token sequence
    forward_dense = 12 * layer + mlm_all + nsp
    assert flops_per_token(h, L, i, s, V, sparse_mlm=False, training=False) == pytest.approx(forward_dense)
    forward_sparse = 12 * layer + 0.15 * mlm_all + nsp
    assert flops_per_token(h, L, i, s, V, masked_fraction=0.15, sparse_mlm=True, training=True) == \
        pytest.approx(3 * forward_sparse)
    # ~ 6 * non-embedding params per token, plus attention: sanity against the usual 6N rule
    n_layers_params = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert 3 * 12 * layer / (6 * n_layers_params) == pytest.approx(1.0, rel=0.05)


# --------------------------------------------------------------------------- time / cost


def test_time_cost_arithmetic():
    fpt = flops_per_token(**{k: v for k, v in BASE.items()}, seq_length=128)
    tokens = 1e9
    r = estimate_time_cost(tokens, fpt, "A100", num_gpus=8, mfu=0.4, price_per_gpu_hour=4.1)
    expected_s = tokens * fpt / (8 * 312e12 * 0.4)
    assert r["hours"] == pytest.approx(expected_s / 3600)
    assert r["gpu_hours"] == pytest.approx(8 * r["hours"])
    assert r["cost"] == pytest.approx(4.1 * r["gpu_hours"])
    assert estimate_time_cost(tokens, fpt, "a100-sxm4-80gb", 8)["gpu_type"] == "A100"
    assert estimate_time_cost(tokens, fpt, "H100", 8)["hours"] < r["hours"] / 3
    assert estimate_time_cost(tokens, fpt, "A100", 8)["cost"] is None
    lines = format_cost(r)
    assert any("GPU-hours" in x for x in lines)
    assert lines[-1] == f"cost:    {r['cost']:,.2f} at 4.1 per GPU-hour"
    assert format_cost(estimate_time_cost(tokens, fpt, "A100", 8))[-1] == "cost:    (no price_per_gpu_hour given)"


def test_time_cost_errors_and_table():
    assert GPU_PEAK_TFLOPS["A100"]["bf16"] == 312 and GPU_PEAK_TFLOPS["H100"]["bf16"] == 989
    assert GPU_PEAK_TFLOPS["V100"]["fp16"] == 125 and "bf16" not in GPU_PEAK_TFLOPS["V100"]
    with pytest.raises(ConfigError):
        estimate_time_cost(1e9, 1e9, "TPUv4", 8)
    with pytest.raises(ConfigError):
        estimate_time_cost(1e9, 1e9, "V100", 8, precision="bf16")
    with pytest.raises(ConfigError):
        estimate_time_cost(1e9, 1e9, "A100", 8, mfu=1.5)
    assert math.isfinite(estimate_time_cost(1e9, 1e9, "L4", 1)["hours"])


def test_flops_per_token_last_layer_at_the_loss_positions_hand_count():
    """Ours (families.encode_at): the last layer's keys and values at every token, its query, attention, output
    projection and FFN at the predicted 15% (and each sequence's [CLS] with NSP) only."""
    h, L, i, s, V = 512, 4, 2048, 128, 12588
    layer = 4 * 2 * h * h + 4 * s * h + 2 * 2 * h * i
    kv = 2 * 2 * h * h
    head = 0.15 * (2 * h * h + 2 * h * V)
    last = kv + 0.15 * (layer - kv)
    assert flops_per_token(h, L, i, s, V, sparse_mlm=True, training=False, with_nsp=False, last_layer_at_loss=True) \
        == pytest.approx(3 * layer + last + head)
    nsp = (2 * h * h + 2 * h * 2) / s
    last_nsp = kv + (0.15 + 1 / s) * (layer - kv)
    assert flops_per_token(h, L, i, s, V, sparse_mlm=True, training=True, with_nsp=True, last_layer_at_loss=True) \
        == pytest.approx(3 * (3 * layer + last_nsp + head + nsp))
    whole = flops_per_token(h, L, i, s, V, sparse_mlm=True, training=False, with_nsp=False)
    assert whole - (3 * layer + last + head) == pytest.approx(layer - last)  # what it saves: 85% of a layer less KV
