"""Worker stage: what the hardware can do fast — bf16 detection and a measured matmul peak (for MFU).

`bf16_supported(device)`: CUDA asks the driver (`torch.cuda.is_bf16_supported()`); a CPU answers yes when it
has native bf16 dot products (x86 `avx512_bf16` / `amx_bf16`, Arm `bf16` / `sve_bf16`); a CPU without them
is asked by timing — a small bf16 matmul against fp32 — because oneDNN may still emulate bf16 faster than
fp32 on some parts, and much slower on others. `resolve_bf16("auto" | bool, device)` is what an engine calls.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from pathlib import Path
from typing import Union

import torch

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16", "svebf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of the first core (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(f in cpu_flags() for f in _NATIVE_BF16_FLAGS)


def _time_matmul(dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: oneDNN/MKL pick and JIT their kernels
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def cpu_bf16_faster(n: int = 512, repeats: int = 5, margin: float = 1.1) -> bool:
    """True if a bf16 n x n matmul beats fp32 by `margin` on this CPU (best of `repeats`)."""
    try:
        return _time_matmul(torch.float32, n, repeats) > margin * _time_matmul(torch.bfloat16, n, repeats)
    except RuntimeError:  # no bf16 matmul kernel at all
        return False


def bf16_supported(device: Union[str, torch.device]) -> bool:
    """Whether bf16 autocast is worth using on `device` (and works there)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return True
        return cpu_bf16_faster()
    if device.type == "mps":
        try:
            torch.ones(2, device=device, dtype=torch.bfloat16) @ torch.ones(2, device=device, dtype=torch.bfloat16)
            return True
        except (RuntimeError, TypeError):
            return False
    return False


def resolve_bf16(setting: Union[bool, str, None], device: Union[str, torch.device]) -> bool:
    """`engine.bf16`: true / false as given; "auto" (or None) = `bf16_supported(device)`."""
    if isinstance(setting, bool):
        return setting
    if setting is None or str(setting).lower() == "auto":
        return bf16_supported(device)
    s = str(setting).lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"engine.bf16 must be true, false or auto, not {setting!r}")


def matmul_peak_flops(dtype: torch.dtype = torch.float32, shapes=None, repeats: int = 5, min_seconds: float = 1.0) -> dict:
    """Measured matmul FLOP/s on this device with the current torch thread count: the best over `shapes`.

    Each shape is run both as `a @ b` and as `F.linear(x, w, bias)` (what nn.Linear calls: addmm with a
    transposed weight, which may take a different BLAS/oneDNN kernel), best of `repeats` timed chunks of
    about min_seconds / repeats each. The best over all is the 'peak' an MFU is measured against: not a
    datasheet number, but the same process, threads and libraries as the training step.
    """
    import torch.nn.functional as F

    shapes = shapes or [(2048, 2048, 2048), (4096, 256, 1024), (4096, 512, 2048), (4096, 1024, 4096)]
    per_shape = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype)
        bias = torch.randn(n, dtype=dtype)
        for name, fn in (("mm", lambda: a @ b), ("linear", lambda: F.linear(a, w, bias))):
            fn()
            best = float("inf")
            for _ in range(repeats):
                reps = 0
                t0 = time.perf_counter()
                while True:
                    fn()
                    reps += 1
                    dt = time.perf_counter() - t0
                    if dt >= min_seconds / repeats:
                        break
                best = min(best, dt / reps)
            per_shape[f"{name} {m}x{k}x{n}"] = 2.0 * m * k * n / best
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "peak_flops": max(per_shape.values()),
        "per_shape_flops": per_shape,
    }


def describe() -> dict:
    """A short hardware record for benchmark output."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.is_available(),
    }


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}


def attention_kernel(setting: str, device: Union[str, torch.device], bf16: bool) -> str:
    """`engine.attention` resolved for this device: "default" (PyTorch picks), one SDPA backend name, or "manual".

    "auto" = "manual" on CPU under bf16: transformers' eager computation, bf16 matmuls around an fp32 softmax
    (orchestrator/model/attention.py). PyTorch's SDPA math kernel runs bf16 attention in fp32 on a CPU, plus its
    safe-softmax passes over every score tensor, and its CPU flash backward in bf16 is slower still at BERT lengths
    (B=32, 4 heads, T=128, d=64, one layer forward and backward: manual 10-12 ms, math 18-19 ms; flash's backward
    alone about twice math's; bench/README.md). In fp32 and on GPUs: PyTorch's own choice.
    """
    if setting == "auto":
        return "manual" if (torch.device(device).type == "cpu" and bf16) else "default"
    return setting


def use_attention(model: torch.nn.Module, kernel: str) -> None:
    """Put a model built for SDPA on the "manual" kernel's attention function (the config's attention
    implementation is read at every call; it is not saved with the model)."""
    if kernel == "manual":
        from orchestrator.model.attention import use_cpu_bf16_attention

        use_cpu_bf16_attention(model)


def attention_context(kernel: str):
    """A context manager that makes F.scaled_dot_product_attention use `kernel` (from `attention_kernel`)."""
    if kernel in ("default", "manual"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[kernel]))
