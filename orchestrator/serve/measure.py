"""Serving stage: the backends run on the same padded batches — PyTorch fp32 (torch.inference_mode), ONNX Runtime
fp32 and int8 with as many intra-op threads as torch uses and ORT_ENABLE_ALL graph optimisation — collecting their
outputs per example and timing them: throughput at the batch size, p50/p99 latency at batch 1 after a warm-up.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from orchestrator.serve.tasks import INPUTS

Runner = Callable[[dict], Sequence[np.ndarray]]
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def pad_batches(rows: list[dict], size: int, pad_id: int) -> list[tuple[dict, list[int]]]:
    """(feed, row lengths) per batch: each padded on the right to its longest row, attention_mask 0 on pads."""
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        lengths = [len(r["input_ids"]) for r in chunk]
        feed = {k: np.full((len(chunk), max(lengths)), pad_id if k == "input_ids" else 0, dtype=np.int64)
                for k in INPUTS}
        for j, r in enumerate(chunk):
            for k in INPUTS:
                feed[k][j, :lengths[j]] = r[k]
        out.append((feed, lengths))
    return out


def torch_runner(module) -> Runner:
    import torch

    def run(feed: dict) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(feed[k]) for k in INPUTS))
        return [o.numpy() for o in out]

    return run


def ort_session(path: Path, provider: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(str(path), so, providers=providers)


def ort_runner(session) -> Runner:
    names = [i.name for i in session.get_inputs()]
    return lambda feed: session.run(None, {k: feed[k] for k in names})


def run_batches(runners: dict[str, Runner], batches: list[tuple[dict, list[int]]], token_level: bool):
    """Every backend on every batch (untimed): outputs per backend, [output][example]."""
    outs: dict[str, list[list[np.ndarray]]] = {name: [] for name in runners}
    for feed, lengths in batches:
        for name, run in runners.items():
            res = run(feed)
            if not outs[name]:
                outs[name] = [[] for _ in res]
            for k, o in enumerate(res):
                outs[name][k].extend(o[j, :n] if token_level else o[j] for j, n in enumerate(lengths))
    return outs


def throughput(runners: dict[str, Runner], batches: list, repeats: int) -> dict[str, float]:
    """Examples per second over the whole eval set, the median of `repeats` passes after a warm-up batch. Each
    backend is timed in passes of its own: ONNX Runtime's and torch's worker threads spin for a while after a
    run, so interleaved runs would slow each other down."""
    n = sum(len(lengths) for _, lengths in batches)
    out = {}
    for name, run in runners.items():
        run(batches[0][0])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for feed, _ in batches:
                run(feed)
            times.append(time.perf_counter() - t0)
        out[name] = n / max(float(np.median(times)), 1e-9)
    return out


def latency(runners: dict[str, Runner], rows: list[dict], pad_id: int, repeats: int, warmup: int = 3) -> dict:
    """p50 / p99 milliseconds per example at batch 1 over the rows, `repeats` passes, after `warmup` calls."""
    feeds = [feed for feed, _ in pad_batches(rows, 1, pad_id)]
    out = {}
    for name, run in runners.items():
        for feed in feeds[:warmup]:
            run(feed)
        ms = []
        for _ in range(repeats):
            for feed in feeds:
                t0 = time.perf_counter()
                run(feed)
                ms.append((time.perf_counter() - t0) * 1000)
        out[name] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}
    return out


def cpu_info() -> dict:
    """The CPU model and the instruction-set flags that decide fp32 / int8 / bf16 speed (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def emit_bench_result(out: dict, path: Optional[str], indent: int = 2) -> None:
    """A bench's JSON record: stamped with the CPU (model and the flags that decide its speed), the Python version
    and the date where the record does not give them; printed, and written to `path` (atomically) when given."""
    import json

    from orchestrator.io import write_text_atomic

    out.setdefault("cpu", cpu_info())
    out.setdefault("python", platform.python_version())
    out.setdefault("date", time.strftime("%Y-%m-%d"))
    text = json.dumps(out, indent=indent)
    if path:
        write_text_atomic(path, text + "\n")
    print(text)
