"""`bert-orch export RUN_DIR`: a finished run's export/ as serving-ready ONNX — RUN_DIR/export/onnx/model.onnx
(fp32), model.int8.onnx (dynamic int8) and serving.json — with parity, accuracy and speed measured on the run's
held-out rows against PyTorch.

Exporter: torch.onnx.export(dynamo=True) — torch.export, then onnxscript's translation, ONNX opset 18 — with
dynamic batch and sequence dims (torch.export.Dim; the sequence bounded by max_position_embeddings). Checked with
torch 2.13 / transformers 5.24 on BERT: its graph matches PyTorch to ~1e-8 at every batch size and length, with
eager and SDPA attention alike. The legacy TorchScript exporter (dynamo=False, dynamic_axes) traces transformers
5's attention-mask construction with the example's values: its outputs were 5e-3..2e-2 off, also at the traced
shape, so it is not used. Optimum (optimum-onnx 0.1.0) requires transformers<4.58: `pip install --dry-run
optimum-onnx` resolves only by downgrading transformers to 4.57.6, so it is not used either. The model is loaded
with attn_implementation="eager" (plain MatMul + Softmax, all of which the int8 pass sees; SDPA exports as well).

int8: onnxruntime.quantization.quantize_dynamic, QInt8 weights on MatMul/Gemm (activations quantised per batch at
run time). Its cost is measured: agreement with PyTorch and, where the eval rows carry gold answers, accuracy.
ORT's quant_pre_process is not run: its symbolic shape inference fails on the dynamo graph, and with that step
skipped it changed no int8 output.

GPU: a GPU server adds onnxruntime-gpu's CUDAExecutionProvider (and TensorrtExecutionProvider); pass
--provider CUDAExecutionProvider there, and convert model.onnx to fp16 (onnxruntime.transformers.float16) for its
tensor cores. Dynamic int8 is a CPU format: on CUDA its integer MatMuls fall back to the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from orchestrator.errors import ConfigError, DataError, OrchestratorError
from orchestrator.serve.tasks import HEADS, INPUTS, TASKS, eval_rows, export_dir_of, read_json, read_rows_file, run_task

OPSET = 18
BACKENDS = ("torch_fp32", "onnx_fp32", "onnx_int8")
GPU_HINT = ("GPU server: pip install onnxruntime-gpu, pass --provider CUDAExecutionProvider (or "
            "TensorrtExecutionProvider) and convert model.onnx to fp16 (onnxruntime.transformers.float16); "
            "model.int8.onnx is for CPUs (its integer MatMuls fall back to the CPU on CUDA)")
LARGE_BYTES = 1_800_000_000  # protobuf's 2 GB limit: bigger models keep their weights in model.onnx.data


def check_runtime(provider: str) -> None:
    """The serve extra is installed and the provider is one this onnxruntime has, else one line."""
    from orchestrator.extras import require

    for module in ("onnxruntime", "onnx", "onnxscript"):
        require(module, "serve", "export", "bert-orch export")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise ConfigError("--provider", f"{provider} is not available in this onnxruntime (available: "
                                        f"{', '.join(available)}); CUDA / TensorRT need onnxruntime-gpu")


def _sample(rows: list[dict], max_len: int, pad_id: int):
    """Example inputs for tracing: 2 rows (dims 0/1 would be specialised), the second padded, so the graph keeps
    the attention-mask path."""
    import torch

    n = max(2, min(8, max_len))
    ids = (list(rows[0]["input_ids"]) * n)[:n]
    input_ids = torch.tensor([ids, ids[: n // 2] + [pad_id] * (n - n // 2)], dtype=torch.long)
    mask = torch.tensor([[1] * n, [1] * (n // 2) + [0] * (n - n // 2)], dtype=torch.long)
    return input_ids, mask, torch.zeros_like(input_ids)


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines, warnings and registry log lines (e.g. torchvision not installed) off; its
    errors still raise."""
    logs = [logging.getLogger("torch.onnx"), logging.getLogger()]  # root: quantize_dynamic's "pre-processing" hint
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def export_fp32(module, rows: list[dict], path: Path, task: str, max_len: int, pad_id: int, large: bool) -> None:
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=max_len)
    dims = {k: {0: batch, 1: seq} for k in INPUTS}
    try:
        with _quiet():
            program = torch.onnx.export(module, _sample(rows, max_len, pad_id), dynamo=True, dynamic_shapes=dims,
                                        input_names=list(INPUTS), output_names=list(HEADS[task][2]),
                                        opset_version=OPSET, external_data=large)
            program.save(str(path), external_data=large)
    except Exception as exc:  # noqa: BLE001 - the exporter's many error types: one line naming the model
        raise DataError(str(path.parent.parent), f"ONNX export failed: {type(exc).__name__}: "
                                                 f"{(str(exc).strip().splitlines() or [''])[0]}") from exc


def quantize_int8(src: Path, dst: Path, large: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=large)


def compare(task: str, outs: dict, rows: list[dict], extra: dict) -> dict[str, Any]:
    """Each ONNX backend against PyTorch fp32 (max abs diff, agreement); every backend against gold, if any."""
    from orchestrator.serve import metrics as mt

    groups = mt.rerank_groups(rows, extra) if task == "rerank" else None
    preds = {name: mt.predictions(task, o, rows) for name, o in outs.items()}
    parity = {name: {"max_abs_diff": mt.max_abs_diff(task, outs["torch_fp32"], o, rows),
                     "agreement": mt.agreement(task, preds["torch_fp32"], preds[name], rows, groups)}
              for name, o in outs.items() if name != "torch_fp32"}
    answers = mt.gold(task, rows, extra, groups)
    acc = None if answers is None else {"metric": answers[0],
                                        **{n: mt.accuracy(task, p, answers[1]) for n, p in preds.items()}}
    return {"parity": parity, "agreement_metric": mt.AGREEMENT[task], "accuracy": acc,
            "groups": len({str(g) for g in groups}) if groups else None}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _measure(tmp: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """Export (and quantise) into tmp, run every backend on the eval rows, write tmp/serving.json; the figures."""
    import torch

    from orchestrator.io import write_json_atomic
    from orchestrator.serve import measure as ms
    from orchestrator.serve.metrics import TOKEN_TASKS
    from orchestrator.serve.modules import load_module

    task, rows, threads = ctx["task"], ctx["rows"], torch.get_num_threads()
    module = load_module(ctx["export"], task)
    large = sum(p.numel() * 4 for p in module.parameters()) > LARGE_BYTES
    t0 = time.perf_counter()
    export_fp32(module, rows, tmp / "model.onnx", task, ctx["max_len"], ctx["pad_id"], large)
    files = {"onnx_fp32": "model.onnx"}
    if ctx["int8"]:
        quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx", large)
        files["onnx_int8"] = "model.int8.onnx"
    export_s = time.perf_counter() - t0
    runners = {"torch_fp32": ms.torch_runner(module)}
    for name, f in files.items():
        runners[name] = ms.ort_runner(ms.ort_session(tmp / f, ctx["provider"], threads))
    batches = ms.pad_batches(rows, ctx["batch"], ctx["pad_id"])
    doc = compare(task, ms.run_batches(runners, batches, token_level=task in TOKEN_TASKS), rows, ctx["extra"])
    doc["throughput_examples_per_s"] = ms.throughput(runners, batches, ctx["repeats"])
    doc["latency_ms_batch1"] = ms.latency(runners, rows[: ctx["latency_rows"]], ctx["pad_id"], ctx["repeats"])
    doc.update(_describe(ctx, files, tmp, threads, export_s))
    write_json_atomic(tmp / "serving.json", doc)
    return doc


def _pooling(export: Path) -> dict[str, Any]:
    from orchestrator.serve.tasks import pooling_of

    modes, normalize = pooling_of(export)
    return {"modes": list(modes), "normalize": normalize}


def _describe(ctx: dict[str, Any], files: dict[str, str], tmp: Path, threads: int, export_s: float) -> dict[str, Any]:
    import onnxruntime as ort

    from orchestrator.serve.measure import cpu_info

    weights = ctx["export"] / "model.safetensors"
    sizes = {n: sum(p.stat().st_size for p in tmp.glob(f + "*")) for n, f in files.items()}
    sizes["torch_fp32"] = weights.stat().st_size if weights.is_file() else None
    return {
        "task": ctx["task"], "run_dir": str(ctx["run_dir"]), "eval_rows": len(ctx["rows"]),
        "eval_source": ctx["source"], "batch": ctx["batch"], "repeats": ctx["repeats"], "threads": threads,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "export_s": export_s,
        "exporter": {"api": "torch.onnx.export(dynamo=True)", "opset": OPSET, "attn_implementation": "eager",
                     "dynamic_axes": {"batch": "any", "sequence": f"2..{ctx['max_len']}"}},
        "inputs": list(INPUTS), "outputs": list(HEADS[ctx["task"]][2]),
        "pooling": _pooling(ctx["export"]) if ctx["task"] == "embed" else None,
        "files": files, "bytes": sizes,
        "quantization": {"api": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                         "op_types": ["MatMul", "Gemm"]} if ctx["int8"] else None,
        "provider": ctx["provider"], "providers_available": ort.get_available_providers(),
        "session": {"intra_op_num_threads": threads, "graph_optimization_level": "ORT_ENABLE_ALL"},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # other work skews timings
        "versions": _versions(), "cpu": cpu_info(), "gpu": GPU_HINT,
    }


def export_run(run_dir: str | Path, *, int8: bool = True, batch: int = 32, repeats: int = 3,
               provider: str = "CPUExecutionProvider", task: Optional[str] = None,
               rows: Optional[Sequence[dict]] = None, latency_rows: int = 256,
               threads: Optional[int] = None) -> dict[str, Any]:
    """Export RUN_DIR/export to RUN_DIR/export/onnx (published whole: built in a temporary dir, then renamed) and
    return serving.json's figures. rows: tokenised eval rows to measure on instead of data/features.json's;
    threads: torch's and ONNX Runtime's intra-op threads (default: torch.get_num_threads())."""
    check_runtime(provider)
    run = Path(run_dir)
    export = export_dir_of(run)
    task = run_task(run, export, task)
    cfg = read_json(export / "config.json")
    max_len = int(cfg.get("max_position_embeddings") or 512)
    rows, extra, source = eval_rows(run, max_len, rows)
    if threads:
        import torch

        torch.set_num_threads(threads)
    ctx = {"run_dir": run, "export": export, "task": task, "rows": rows, "extra": extra, "source": source,
           "max_len": max_len, "pad_id": int(cfg.get("pad_token_id") or 0), "int8": int8, "batch": batch,
           "repeats": repeats, "provider": provider, "latency_rows": latency_rows}
    from orchestrator.io import atomic_save_dir

    result: dict[str, Any] = {}
    atomic_save_dir(lambda tmp: result.update(_measure(tmp, ctx)), export / "onnx")
    return result


def table(doc: dict[str, Any]) -> str:
    """The figures of serving.json as a short text table."""
    acc = doc.get("accuracy") or {}
    lines = [f"task {doc['task']}: {doc['eval_rows']} eval rows, batch {doc['batch']}, {doc['threads']} threads, "
             f"{doc['provider']}; agreement = {doc['agreement_metric']}"
             + (f"; accuracy = {acc['metric']}" if acc else ""),
             f"{'backend':<11} {'max|diff|':>9} {'agree':>7} {'accuracy':>8} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'ex/s@' + str(doc['batch']):>9} {'MB':>7}"]
    for name in BACKENDS:
        if name not in doc["throughput_examples_per_s"]:
            continue
        par, lat, size = doc["parity"].get(name, {}), doc["latency_ms_batch1"][name], doc["bytes"].get(name)
        diff = f"{par['max_abs_diff']:.1e}" if par else "-"
        agree = f"{par['agreement']:.4f}" if par else "-"
        lines.append(f"{name.replace('_', ' '):<11} {diff:>9} {agree:>7} {acc.get(name, float('nan')):>8.4f} "
                     f"{lat['p50_ms']:>7.2f} {lat['p99_ms']:>7.2f} {doc['throughput_examples_per_s'][name]:>9.1f} "
                     f"{(size or 0) / 1e6:>7.2f}")
    return "\n".join(lines)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return int(text)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="bert-orch export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished run dir (its export/ is exported to export/onnx/)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="also write model.int8.onnx (dynamic int8) and measure it (default: on)")
    ap.add_argument("--batch", type=_positive, default=32, help="batch size of the parity and throughput passes")
    ap.add_argument("--repeats", type=_positive, default=3, help="timed passes for latency and throughput")
    ap.add_argument("--latency-rows", type=_positive, default=256, help="eval rows timed one by one (batch 1)")
    ap.add_argument("--provider", default="CPUExecutionProvider",
                    help="ONNX Runtime execution provider, e.g. CUDAExecutionProvider with onnxruntime-gpu")
    ap.add_argument("--threads", type=_positive, help="intra-op threads of torch and ONNX Runtime alike "
                                                      "(default: torch's, usually the cores)")
    ap.add_argument("--task", choices=TASKS, help="override the task the run recorded")
    ap.add_argument("--eval-rows", metavar="FILE",
                    help="tokenised rows (JSON list or JSON Lines) to measure on instead of data/features.json's")
    args = ap.parse_args(argv)
    try:
        rows = read_rows_file(args.eval_rows) if args.eval_rows else None
        doc = export_run(args.run_dir, int8=args.int8, batch=args.batch, repeats=args.repeats,
                         provider=args.provider, task=args.task, rows=rows, latency_rows=args.latency_rows,
                         threads=args.threads)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(table(doc))
    out = Path(args.run_dir) / "export" / "onnx"
    print(f"wrote {out}/{{{', '.join([*doc['files'].values(), 'serving.json'])}}}")
