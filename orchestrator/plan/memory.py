"""Memory planner and time/cost estimator for BERT encoders (pure Python: no torch/deepspeed import).

Model states (per GPU, P = parameter count, N = data-parallel size, L = largest layer's parameters)
follow the ZeRO paper (Rajbhandari et al. 2020, sec. 3 and 5) and DeepSpeed's estimators
(``deepspeed/runtime/zero/stage_1_and_2.py:estimate_zero2_model_states_mem_needs`` and
``stage3.py:estimate_zero3_model_states_mem_needs``), with Adam/AdamW/LAMB (two fp32 moments).

Mixed precision (bf16 / fp16 with fp32 master weights), bytes per parameter:

    state                      bytes  ZeRO-0  ZeRO-1  ZeRO-2  ZeRO-3
    16-bit params                  2  full    full    full    /N (+ gathered layer)
    16-bit grads                   2  full    full    /N      /N
    fp32 grads (for the step)      4  full    /N      /N      /N
    fp32 master + m + v           12  full    /N      /N      /N

So ZeRO-0 = 20P, ZeRO-1 = 4P + 16P/N, ZeRO-2 = 2P + 18P/N, ZeRO-3 = 20P/N + 4L.  The fp32 gradient copy is
what DeepSpeed's optimizers really hold (FP16_Optimizer/BF16_Optimizer at stage 0, the fp32 partition
``.grad`` at stages 1-3); the ZeRO paper's 16P ("2+2+K, K=12") leaves it out.  ZeRO-3 also holds the
16-bit params and grads of the layer being gathered: DeepSpeed budgets 4 bytes x largest layer (L).

fp32 training: params 4, grads 4, Adam moments 8 bytes/param (no master copy), partitioned the same way.

Optimizer offload (``offload_optimizer``, ZeRO 1-3) moves fp32 master/moments and fp32 grads to host memory
(and at ZeRO-2/3 the 16-bit grad partitions are streamed to the host too); parameter offload
(``offload_param``, ZeRO-3 only) moves the 16-bit param shards as well, leaving only the gathered layer.

Activations per transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", sec. 4.1, generalised to element size e and intermediate size i; b = micro batch,
s = sequence length, h = hidden, a = heads; dropout masks are 1 byte):

    attention  (5e+1)·sbh + (2e+1)·a·s²·b      (QKV input, Q, K, V, proj input, mask; scores, probs, mask)
    MLP        (e+1)·sbh + 2e·sbi               (fc1 input, GeLU input, fc2 input, mask)
    LayerNorm  2e·sbh
    total      (8e+2)·sbh + 2e·sbi + (2e+1)·a·s²·b      -> 34·sbh + 5·a·s²·b for e=2, i=4h

With a fused/flash attention kernel the s² terms are not stored (``flash_attention=True``).  With activation
checkpointing (one checkpoint per layer) only each layer's input (e·sbh) is kept plus one layer's full set
during its recomputation.  The embedding output and MLM head (logits in fp32 for the loss) are added.
ZeRO's gradient-reduction bucket (``on_gpu`` given): hidden² elements on a GPU, two of them with overlap_comm; on
a CPU at ZeRO-1/2 one bucket as large as the gradients (plan/deepspeed_config.bucket_elements), in the working
precision.
Not included: CUDA context (~0.5-1 GB), allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from orchestrator.errors import ConfigError

__all__ = [
    "parameter_count",
    "largest_layer_params",
    "MemoryEstimate",
    "estimate_model_states",
    "activation_bytes",
    "estimate_memory",
    "flops_per_token",
    "GPU_PEAK_TFLOPS",
    "GPU_PEAK_TFLOPS_SOURCES",
    "DEFAULT_MFU",
    "estimate_time_cost",
    "format_memory_table",
    "format_cost",
]

GiB = 1024**3

_PRECISIONS = ("fp32", "bf16", "fp16")
# fp32 bytes per parameter for optimizer moments
_OPTIMIZER_MOMENT_BYTES = {"adamw": 8, "adam": 8, "lamb": 8, "sgd": 4}


# --------------------------------------------------------------------------- parameter counts


def parameter_count(
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    vocab_size: int,
    max_position_embeddings: int = 512,
    type_vocab_size: int = 2,
    with_pretraining_heads: bool = True,
) -> int:
    """Exact parameter count of HF ``BertForPreTraining`` (``with_pretraining_heads=False``: ``BertModel``
    with its pooler).  The MLM decoder weight is tied to the word embeddings and counted once.
    """
    h, i, v = hidden_size, intermediate_size, vocab_size
    embeddings = (v + max_position_embeddings + type_vocab_size) * h + 2 * h  # + LayerNorm
    per_layer = (
        3 * (h * h + h)  # Q, K, V
        + (h * h + h) + 2 * h  # attention output dense + LayerNorm
        + (h * i + i)  # intermediate dense
        + (i * h + h) + 2 * h  # output dense + LayerNorm
    )
    pooler = h * h + h
    total = embeddings + num_hidden_layers * per_layer + pooler
    if with_pretraining_heads:
        mlm = (h * h + h) + 2 * h + v  # transform dense + LayerNorm + decoder bias (weight tied)
        nsp = 2 * h + 2
        total += mlm + nsp
    return total


def largest_layer_params(
    hidden_size: int, intermediate_size: int, vocab_size: int, with_pretraining_heads: bool = True
) -> int:
    """Parameters of the largest single module, as DeepSpeed's ``model_to_params`` counts it
    (a module's own parameters, ``recurse=False``): the MLM decoder (tied weight V·h + bias V), else the word
    embedding (V·h) or an FFN dense (h·i + i), whichever is larger."""
    h, i, v = hidden_size, intermediate_size, vocab_size
    candidates = [v * h, h * i + i, i * h + h]
    if with_pretraining_heads:
        candidates.append(v * h + v)
    return max(candidates)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory (bytes) of one data-parallel rank; ``cpu_bytes`` is this rank's share of host memory."""

    num_params: int
    zero_stage: int
    world_size: int
    precision: str
    params_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    buffers_bytes: int  # ZeRO-3 gathered layer(s)
    activations_bytes: int
    cpu_bytes: int  # offloaded states, per rank, on the host

    @property
    def model_states_bytes(self) -> int:
        return self.params_bytes + self.gradients_bytes + self.optimizer_bytes + self.buffers_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_states_bytes + self.activations_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_states_bytes"] = self.model_states_bytes
        d["total_bytes"] = self.total_bytes
        d["total_gib"] = round(self.total_bytes / GiB, 3)
        return d


def _check(zero_stage: int, world_size: int, precision: str, offload_optimizer: bool, offload_param: bool,
           optimizer: str) -> None:
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError("engine.zero_stage", f"must be 0, 1, 2 or 3, got {zero_stage!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError("compute", f"world size must be a positive integer, got {world_size!r}")
    if precision not in _PRECISIONS:
        raise ConfigError("engine.precision", f"must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    if offload_optimizer and zero_stage == 0:
        raise ConfigError("engine.offload_optimizer", "optimizer offload needs ZeRO stage 1, 2 or 3")
    if offload_param and zero_stage != 3:
        raise ConfigError("engine.offload_param", "parameter offload needs ZeRO stage 3")
    if optimizer not in _OPTIMIZER_MOMENT_BYTES:
        raise ConfigError("optim.name", f"unknown optimizer {optimizer!r}; known: {', '.join(_OPTIMIZER_MOMENT_BYTES)}")


def estimate_model_states(
    num_params: int,
    largest_layer: int,
    *,
    zero_stage: int,
    world_size: int,
    precision: str = "bf16",
    offload_optimizer: bool = False,
    offload_param: bool = False,
    optimizer: str = "adamw",
    bucket_elements: int = 0,
    bucket_buffers: int = 1,
) -> dict[str, int]:
    """Per-GPU bytes of params / gradients / optimizer / buffers (and host ``cpu`` bytes) — see module docstring.

    bucket_elements, bucket_buffers: ZeRO-1/2/3's gradient-reduction bucket and how many of them (2 with
    overlap_comm), counted as buffers."""
    _check(zero_stage, world_size, precision, offload_optimizer, offload_param, optimizer)
    P, N, L = num_params, world_size, largest_layer
    moments = _OPTIMIZER_MOMENT_BYTES[optimizer]
    mixed = precision != "fp32"
    p_bytes = 2 if mixed else 4  # working params (and their grads)
    master = 4 if mixed else 0  # fp32 master copy
    fp32_grad = 4 if mixed else 0  # fp32 gradient for the optimizer step

    def part(x: float, partitioned: bool) -> float:
        return x / N if partitioned else x

    params = part(p_bytes * P, zero_stage >= 3)
    lp_grads = part(p_bytes * P, zero_stage >= 2)
    hp_grads = part(fp32_grad * P, zero_stage >= 1)
    optim = part((master + moments) * P, zero_stage >= 1)
    buffers = 2 * p_bytes * L if zero_stage == 3 else 0
    if zero_stage >= 1:
        buffers += bucket_buffers * bucket_elements * p_bytes
    cpu = 0.0
    if offload_optimizer:
        cpu += optim + hp_grads
        optim, hp_grads = 0.0, 0.0
        if zero_stage >= 2:  # 16-bit grad partitions are reduced in buckets and copied to the host
            cpu += lp_grads
            lp_grads = 0.0
    if offload_param:
        cpu += params
        params = 0.0
    return {
        "params": int(params),
        "gradients": int(lp_grads + hp_grads),
        "optimizer": int(optim),
        "buffers": int(buffers),
        "cpu": int(cpu),
    }


def activation_bytes(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    num_attention_heads: int,
    vocab_size: int,
    micro_batch_size: int,
    seq_length: int,
    precision: str = "bf16",
    activation_checkpointing: bool = False,
    flash_attention: bool = False,
    masked_fraction: float = 0.15,
    sparse_mlm: bool = False,
) -> int:
    """Activation bytes kept for backward on one GPU (see module docstring for the per-layer formula)."""
    e = 4 if precision == "fp32" else 2
    b, s, h, i, a = micro_batch_size, seq_length, hidden_size, intermediate_size, num_attention_heads
    sbh = s * b * h
    per_layer = (8 * e + 2) * sbh + 2 * e * s * b * i
    if not flash_attention:
        per_layer += (2 * e + 1) * a * s * s * b
    if activation_checkpointing:
        layers = num_hidden_layers * e * sbh + per_layer
    else:
        layers = num_hidden_layers * per_layer
    embeddings = (e + 1) * sbh  # LayerNorm input + dropout mask
    n_mlm = b * s * masked_fraction if sparse_mlm else b * s
    head = 4 * e * n_mlm * h + (e + 4) * n_mlm * vocab_size  # transform/GeLU/LN/decoder inputs; logits + fp32 loss
    return int(layers + embeddings + head)


def estimate_memory(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    num_attention_heads: int,
    vocab_size: int,
    max_position_embeddings: int = 512,
    type_vocab_size: int = 2,
    with_pretraining_heads: bool = True,
    zero_stage: int = 0,
    world_size: int = 1,
    precision: str = "bf16",
    offload_optimizer: bool = False,
    offload_param: bool = False,
    optimizer: str = "adamw",
    micro_batch_size: int = 8,
    seq_length: int = 128,
    activation_checkpointing: bool = False,
    flash_attention: bool = False,
    masked_fraction: float = 0.15,
    sparse_mlm: bool = False,
    counted: Optional[tuple[int, int]] = None,
    on_gpu: Optional[bool] = None,
) -> MemoryEstimate:
    """Per-GPU memory estimate for training a BERT encoder with DeepSpeed ZeRO ``zero_stage`` on ``world_size`` ranks.

    counted: (parameters, largest module's parameters) of the model when BERT's closed form does not describe it
    (another family, an RTD generator; model/families.counted_parameters); the activations keep the BERT layer
    formula, which the families share (ALBERT's shared layer still runs num_hidden_layers times).
    on_gpu: count ZeRO's gradient-reduction bucket as the plan renders it for a GPU (True) or CPU (False) worker;
    None leaves it out."""
    if counted is not None:
        P, L = counted
    else:
        P = parameter_count(hidden_size, num_hidden_layers, intermediate_size, vocab_size,
                            max_position_embeddings, type_vocab_size, with_pretraining_heads)
        L = largest_layer_params(hidden_size, intermediate_size, vocab_size, with_pretraining_heads)
    from orchestrator.plan.deepspeed_config import bucket_elements

    bucket = 0 if on_gpu is None else bucket_elements(on_gpu, hidden_size, P, zero_stage)
    ms = estimate_model_states(P, L, zero_stage=zero_stage, world_size=world_size, precision=precision,
                               offload_optimizer=offload_optimizer, offload_param=offload_param,
                               optimizer=optimizer, bucket_elements=bucket, bucket_buffers=2 if on_gpu else 1)
    act = activation_bytes(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                           intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                           vocab_size=vocab_size, micro_batch_size=micro_batch_size, seq_length=seq_length,
                           precision=precision, activation_checkpointing=activation_checkpointing,
                           flash_attention=flash_attention, masked_fraction=masked_fraction,
                           sparse_mlm=sparse_mlm)
    return MemoryEstimate(num_params=P, zero_stage=zero_stage, world_size=world_size, precision=precision,
                          params_bytes=ms["params"], gradients_bytes=ms["gradients"],
                          optimizer_bytes=ms["optimizer"], buffers_bytes=ms["buffers"],
                          activations_bytes=act, cpu_bytes=ms["cpu"])


# --------------------------------------------------------------------------- FLOPs


def flops_per_token(
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    seq_length: int,
    vocab_size: int,
    masked_fraction: float = 0.15,
    sparse_mlm: bool = True,
    training: bool = True,
    with_nsp: bool = True,
    last_layer_at_loss: bool = False,
) -> float:
    """Matmul FLOPs per input token (a matmul of m×k by k×n = 2·m·n·k FLOPs).

    Per layer and token: QKV 3·2h², attention scores 2·s·h (q·kᵀ over s keys, all heads), context 2·s·h
    (probs·V), output projection 2h², FFN 2·2·h·i.  MLM head per predicted token: transform 2h² + decoder
    2·h·V — on masked tokens only (``masked_fraction``) when ``sparse_mlm`` (NVIDIA/MLPerf-style gather),
    on every token otherwise (HF ``BertForPreTraining``).  Pooler (2h²) + NSP (2·2h) once per sequence.
    Embedding lookups, LayerNorm, softmax, GeLU, bias adds are not matmuls and are ignored.
    ``last_layer_at_loss`` (ours, BERT-layer families: ``families.encode_at``): the last layer projects keys and
    values at every token and does the rest (query, attention, output projection, FFN) only at the predicted tokens
    and, with NSP, each sequence's [CLS].
    ``training``: backward = 2x forward, so 3x forward in total.
    """
    h, i, s, v = hidden_size, intermediate_size, seq_length, vocab_size
    per_layer = 3 * 2 * h * h + 2 * s * h + 2 * s * h + 2 * h * h + 2 * 2 * h * i
    mlm_tokens = masked_fraction if sparse_mlm else 1.0
    head = mlm_tokens * (2 * h * h + 2 * h * v)
    per_sequence = (2 * h * h + 2 * h * 2) if with_nsp else 0.0
    layers = num_hidden_layers * per_layer
    if last_layer_at_loss and num_hidden_layers:
        read = min(1.0, mlm_tokens + (1.0 / s if with_nsp else 0.0))  # tokens whose last-layer output a loss reads
        layers += 2 * 2 * h * h + read * (per_layer - 2 * 2 * h * h) - per_layer
    forward = layers + head + per_sequence / s
    return float(3 * forward if training else forward)


# --------------------------------------------------------------------------- time / cost

# Dense (no 2:4 sparsity) tensor-core peak, TFLOP/s per GPU, from the vendors' datasheets:
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},  # SXM5
    "H100_PCIE": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},  # SXM2; no bf16 tensor cores
    "T4": {"fp16": 65.0, "fp32": 8.1},
}
GPU_PEAK_TFLOPS_SOURCES = {
    "A100": "NVIDIA A100 datasheet (SXM, dense: BF16/FP16 312, TF32 156; 624/312 are with sparsity)",
    "H100": "NVIDIA H100 datasheet, SXM5 (dense BF16/FP16 989.4; 1979 is with sparsity); PCIe 756",
    "H200": "NVIDIA H200 datasheet (same Hopper tensor cores as H100 SXM: 989 dense BF16)",
    "B200": "NVIDIA DGX B200/HGX B200 datasheet (dense BF16 2.25 PFLOPS per GPU; 4.5 with sparsity)",
    "L40S": "NVIDIA L40S datasheet (BF16 362 dense; 733 with sparsity)",
    "L4": "NVIDIA L4 datasheet (BF16 242 with sparsity -> 121 dense)",
    "A10": "NVIDIA A10 datasheet (BF16 125 dense; 250 with sparsity)",
    "A10G": "AWS g5 A10G: not published by NVIDIA; ~70 dense BF16 as reported by third-party spec comparisons",
    "V100": "NVIDIA V100 datasheet, SXM2 (FP16 tensor 125; PCIe 112)",
    "T4": "NVIDIA T4 datasheet (FP16 tensor 65)",
}

# Model FLOPs utilisation assumed when nothing is measured.  Well-tuned dense transformer training reaches
# 40-55% MFU on A100/H100 (Megatron-LM 2021: 52% of peak at 1T params; PaLM: 46%); small BERT models with
# short sequences and data-parallel ZeRO sit at the low end, so 0.4 is a moderate, not optimistic, default.
DEFAULT_MFU = 0.4


def _normalise_gpu(gpu_type: str) -> str:
    key = gpu_type.strip().upper().replace("-", "_").replace(" ", "_")
    for suffix in ("_80GB", "_40GB", "_141GB", "_24GB", "_SXM5", "_SXM4", "_SXM2", "_SXM"):
        key = key.removesuffix(suffix)
    if key not in GPU_PEAK_TFLOPS:
        raise ConfigError("compute.gpu_type",
                          f"unknown GPU type {gpu_type!r}; known: {', '.join(GPU_PEAK_TFLOPS)}")
    return key


def estimate_time_cost(
    tokens: float,
    flops_per_token: float,
    gpu_type: str,
    num_gpus: int,
    mfu: float = DEFAULT_MFU,
    price_per_gpu_hour: float | None = None,
    precision: str = "bf16",
) -> dict:
    """Wall-clock hours, GPU-hours and (if priced) cost to process ``tokens`` training tokens.

    hours = tokens * flops_per_token / (num_gpus * peak * mfu) / 3600.
    """
    gpu = _normalise_gpu(gpu_type)
    if precision not in GPU_PEAK_TFLOPS[gpu]:
        raise ConfigError("engine.precision", f"{gpu} has no {precision} tensor-core peak listed")
    if num_gpus < 1:
        raise ConfigError("compute", f"num_gpus must be >= 1, got {num_gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError("compute.mfu", f"must be in (0, 1], got {mfu}")
    peak = GPU_PEAK_TFLOPS[gpu][precision] * 1e12
    total_flops = float(tokens) * float(flops_per_token)
    seconds = total_flops / (num_gpus * peak * mfu)
    hours = seconds / 3600.0
    gpu_hours = hours * num_gpus
    return {
        "gpu_type": gpu,
        "precision": precision,
        "num_gpus": num_gpus,
        "mfu": mfu,
        "peak_tflops_per_gpu": GPU_PEAK_TFLOPS[gpu][precision],
        "total_flops": total_flops,
        "tokens_per_second": float(tokens) / seconds if seconds > 0 else math.inf,
        "hours": hours,
        "gpu_hours": gpu_hours,
        "price_per_gpu_hour": price_per_gpu_hour,
        "cost": None if price_per_gpu_hour is None else gpu_hours * price_per_gpu_hour,
    }


# --------------------------------------------------------------------------- formatting


def _gib(x: int) -> str:
    return f"{x / GiB:8.2f}"


def format_memory_table(estimates: list[MemoryEstimate] | MemoryEstimate, gpu_memory_gib: float | None = None) -> list[str]:
    """Printable lines: one row per estimate (GiB per GPU); flags rows over ``gpu_memory_gib`` if given."""
    if isinstance(estimates, MemoryEstimate):
        estimates = [estimates]
    head = (f"{'zero':>4} {'world':>5} {'prec':>5} | {'params':>8} {'grads':>8} {'optim':>8} {'buffers':>8} "
            f"{'activ':>8} | {'total':>8} {'host':>8}  (GiB per GPU)")
    lines = [head, "-" * len(head)]
    for m in estimates:
        flag = ""
        if gpu_memory_gib is not None and m.total_bytes > gpu_memory_gib * GiB:
            flag = f"  > {gpu_memory_gib:g} GiB: does not fit"
        lines.append(f"{m.zero_stage:>4} {m.world_size:>5} {m.precision:>5} | {_gib(m.params_bytes)} "
                     f"{_gib(m.gradients_bytes)} {_gib(m.optimizer_bytes)} {_gib(m.buffers_bytes)} "
                     f"{_gib(m.activations_bytes)} | {_gib(m.total_bytes)} {_gib(m.cpu_bytes)}{flag}")
    return lines


def format_cost(estimate: dict) -> list[str]:
    """Printable lines for an ``estimate_time_cost`` result."""
    lines = [
        f"compute: {estimate['num_gpus']} x {estimate['gpu_type']} ({estimate['precision']}, "
        f"peak {estimate['peak_tflops_per_gpu']:g} TFLOP/s each, MFU {estimate['mfu']:.0%})",
        f"work:    {estimate['total_flops']:.3e} FLOPs, {estimate['tokens_per_second']:,.0f} tokens/s",
        f"time:    {estimate['hours']:.2f} h wall clock, {estimate['gpu_hours']:.1f} GPU-hours",
    ]
    if estimate.get("cost") is not None:
        lines.append(f"cost:    {estimate['cost']:,.2f} at {estimate['price_per_gpu_hour']:g} per GPU-hour")
    else:
        lines.append("cost:    (no price_per_gpu_hour given)")
    return lines
