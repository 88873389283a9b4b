"""GPU acceptance: one command that proves the GPU path on a machine with one or more NVIDIA GPUs.

Run (from the repo root, on the GPU machine):
    .venv/bin/python bench/gpu_acceptance.py                       # results under bench/results/gpu_acceptance/
    .venv/bin/python bench/gpu_acceptance.py --dry-run             # print the planned steps (commands) only

Steps (chosen by the number of GPUs torch sees; each one is a StepSpec, so `plan_steps` is inspectable data):
  facts                  torch / CUDA / NCCL versions, device names, compute capability, memory, driver
                         (nvidia-smi), NVLink topology (nvidia-smi topo -m)                   [always]
  doctor                 `python -m orchestrator.doctor --use-gpu` on every GPU (up to 8): NCCL all-reduce
                         correctness and bus bandwidth vs the network profile                   [2+ GPUs]
  local_<prec>           BERT-Base seq 128 (experiment=bert_base_pretrain, synthetic corpus), launcher=local,
                         DeepSpeed ZeRO-1 at world size 1, 200 steps                           [1+ GPUs]
  ray_1gpu_zero2         the same model through Ray Train: 1 GPU worker, ZeRO-2, 100 steps     [1+ GPUs]
  ray_2gpu_zero2_kill    Ray Train, 2 GPU workers, ZeRO-2, 60 steps, checkpoint every 20; rank 1 SIGKILLs
                         itself after step 30 (BERT_ORCH_FAULT); Ray restarts the group, it resumes from
                         step 20 and finishes                                                   [2+ GPUs]
<prec> is bf16 on GPUs with native bf16 (compute capability >= 8.0: A100, H100, L4, A10, ...), else fp16.

Prints ONE JSON object on stdout (progress goes to stderr): pass/fail per step, tokens/s (steady state: the
logged windows after the first 20 steps, and not the first window after a restart) and MFU against the GPU's
dense tensor-core peak for that precision (`peak_tflops`: orchestrator.plan.memory.GPU_PEAK_TFLOPS plus a few
more below; an unknown GPU gets MFU null). The JSON is also written to <out-dir>/gpu_acceptance.json, and each
step's output to <out-dir>/<step>.log. Designed to finish in well under 10 minutes on one GPU.

Exit status: 0 every step that ran passed, 1 a step failed, 3 no CUDA GPU (one line on stderr, nothing run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_GPU_EXIT = 3
DEFAULT_OUT = REPO / "bench" / "results" / "gpu_acceptance"

# Training shape shared by the training steps: BERT-Base, seq 128, micro batch 32 per GPU.
MICRO_BATCH = 32
LOCAL_STEPS = 200
RAY_STEPS = 100
KILL_STEPS, KILL_CHECKPOINT_EVERY, KILL_AFTER_STEP = 60, 20, 30
LOG_EVERY = 10
WARMUP_STEPS = 20  # windows up to this step are not counted in tokens/s (CUDA/cuBLAS/NCCL warm-up)

# ----------------------------------------------------------------------------------------------- peaks

# Dense (no 2:4 sparsity) tensor-core TFLOP/s per GPU for GPUs orchestrator.plan.memory does not list
# (vendor datasheets; the sparse figures they print are 2x these).
EXTRA_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GH200": {"bf16": 989.0, "fp16": 989.0},      # Grace Hopper: the H100 SXM tensor cores
    "H100_NVL": {"bf16": 835.0, "fp16": 835.0},   # H100 NVL datasheet: 1,671 sparse per GPU
    "A30": {"bf16": 165.0, "fp16": 165.0},        # A30 datasheet: 165 | 330 sparse
    "A40": {"bf16": 149.7, "fp16": 149.7},        # A40 datasheet: 149.7 | 299.4 sparse
    "L40": {"bf16": 181.0, "fp16": 181.0},        # L40 datasheet: 181 | 362 sparse
    "RTX_A6000": {"bf16": 154.8, "fp16": 154.8},  # RTX A6000 datasheet: 154.8 | 309.7 sparse
    "RTX_4090": {"bf16": 165.2, "fp16": 165.2},   # Ada whitepaper: FP32-accumulate 165.2 | 330.4 sparse
}

# torch.cuda.get_device_name() -> table key; first match wins (so H100 NVL/PCIe before H100, A10G before A10).
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"GH200", "GH200"),
    (r"H200", "H200"),
    (r"B200", "B200"),
    (r"H100.*NVL", "H100_NVL"),
    (r"H100.*PCIE", "H100_PCIE"),
    (r"H100", "H100"),
    (r"A100", "A100"),
    (r"A10G", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bA30\b", "A30"),
    (r"\bA40\b", "A40"),
    (r"L40S", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"),
    (r"RTX A6000", "RTX_A6000"),
    (r"RTX 4090", "RTX_4090"),
    (r"V100", "V100"),
    (r"\bT4\b", "T4"),
)


def peak_table() -> dict[str, dict[str, float]]:
    from orchestrator.plan.memory import GPU_PEAK_TFLOPS  # pure Python, no torch

    return {**GPU_PEAK_TFLOPS, **EXTRA_PEAK_TFLOPS}


def gpu_key(device_name: str) -> Optional[str]:
    """'NVIDIA A100-SXM4-80GB' -> 'A100', 'NVIDIA H100 PCIe' -> 'H100_PCIE'; None for a GPU not in the table."""
    name = device_name.upper()
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name):
            return key
    return None


def peak_tflops(device_name: str, precision: str = "bf16") -> Optional[float]:
    """Dense tensor-core peak of one GPU in `precision`; None when the GPU or its precision is not listed."""
    key = gpu_key(device_name)
    if key is None:
        return None
    return peak_table().get(key, {}).get(precision)


def mfu(tokens_per_s: Optional[float], flops_per_token: Optional[float], num_gpus: int,
        peak_tflops_per_gpu: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved matmul FLOP/s per GPU over the GPU's peak. None if anything is unknown.

    tokens_per_s is the whole job's (all workers); flops_per_token the plan's matmul FLOPs per real token
    (forward + backward, orchestrator.plan.memory.flops_per_token).
    """
    if not tokens_per_s or not flops_per_token or not peak_tflops_per_gpu or num_gpus < 1:
        return None
    return tokens_per_s / num_gpus * flops_per_token / (peak_tflops_per_gpu * 1e12)


# ----------------------------------------------------------------------------------------------- facts


def no_gpu_message(torch_version: str, cuda_build: Optional[str]) -> str:
    why = ("a CPU-only build of torch" if cuda_build is None
           else f"CUDA {cuda_build} build, but no usable driver/device: check nvidia-smi and CUDA_VISIBLE_DEVICES")
    return (f"gpu_acceptance: no CUDA GPU visible to torch {torch_version} ({why}); "
            "this acceptance run needs at least one NVIDIA GPU")


def _run_text(cmd: list[str], timeout: float = 30.0) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def nvidia_smi_driver() -> Optional[str]:
    out = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0].strip() if out and out.strip() else None


def nvlink_all(topo_text: Optional[str]) -> Optional[bool]:
    """Whether every GPU pair is NVLink-connected, from `nvidia-smi topo -m`; None if unknown."""
    if not topo_text:
        return None
    from orchestrator.cluster.topology import parse_nvidia_smi_topo

    try:
        return parse_nvidia_smi_topo(topo_text).all_gpus_nvlink
    except ValueError:
        return None


def gpu_facts() -> dict[str, Any]:
    """What this machine's torch sees (call only after torch.cuda.is_available())."""
    import torch

    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append({
            "index": i,
            "name": p.name,
            "gpu_key": gpu_key(p.name),
            "capability": f"{p.major}.{p.minor}",
            "bf16_native": p.major >= 8,
            "memory_gib": round(p.total_memory / 2**30, 1),
        })
    try:
        v = torch.cuda.nccl.version()  # a tuple (2, 21, 5); an int (22105) in old torch
        nccl = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception as e:  # noqa: BLE001 - a torch without NCCL is a fact to report, not a crash
        nccl = f"unavailable ({type(e).__name__})"
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, Optional[str]] = {"torch": torch.__version__}
    for dist_name in ("deepspeed", "ray", "transformers"):  # metadata only: importing deepspeed prints to stdout
        try:
            versions[dist_name] = version(dist_name)
        except PackageNotFoundError:
            versions[dist_name] = None
    return {
        "torch_cuda": torch.version.cuda,
        "nccl": nccl,
        "cudnn": torch.backends.cudnn.version(),
        "driver": nvidia_smi_driver(),
        "devices": devices,
        "nvlink_all": nvlink_all(_run_text(["nvidia-smi", "topo", "-m"])) if len(devices) > 1 else None,
        "cpu_count": os.cpu_count() or 1,
        "versions": versions,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class StepSpec:
    """One planned step: what runs (argv/env), on how many GPUs, and what a pass looks like (expect)."""

    name: str
    kind: str  # facts | doctor | train
    gpus: int = 0
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    run_dir: Optional[str] = None
    timeout_s: float = 60.0
    expect: dict[str, Any] = field(default_factory=dict)
    skip_reason: Optional[str] = None


def precision_for(devices: list[dict]) -> str:
    """bf16 when every GPU has native bf16 tensor cores (compute capability >= 8.0), else fp16."""
    return "bf16" if devices and all(d["bf16_native"] for d in devices) else "fp16"


def doctor_network(num_gpus: int, nvlink: Optional[bool]) -> str:
    """One node: the NVLink profile when every pair is NVLink-connected; otherwise 'tcp' (PCIe-only boxes: the
    nvlink profile's ~230 GB/s expectation would fail them; tcp's floor only catches a broken collective)."""
    return "nvlink_single_node" if num_gpus > 1 and nvlink else "tcp"


def cpus_per_worker(workers: int, cpu_count: int) -> int:
    """CPUs to reserve per Ray worker: what the box has, one left for the driver, 1..8."""
    return max(1, min(8, (cpu_count - 1) // max(1, workers)))


def train_overrides(facts: dict, workers: int, precision: str) -> list[str]:
    """Hydra overrides of a BERT-Base seq-128 job on `workers` GPUs of this machine (synthetic corpus)."""
    dev = facts["devices"][0]
    o = [
        "experiment=bert_base_pretrain", "data=synthetic", "task=pretrain", "logger=none",
        f"compute.gpus_per_node={workers}", f"compute.cpus_per_worker={cpus_per_worker(workers, facts['cpu_count'])}",
        f"compute.gpu_memory_gib={dev['memory_gib']}",
        f"train.micro_batch_size_per_gpu={MICRO_BATCH}", f"train.global_batch_size={MICRO_BATCH * workers}",
        f"train.log_every_steps={LOG_EVERY}", f"schedule.warmup_steps={WARMUP_STEPS}",
    ]
    from orchestrator.plan.memory import GPU_PEAK_TFLOPS

    if dev["gpu_key"] in GPU_PEAK_TFLOPS:  # the plan's own cost estimate knows only these
        o.append(f"compute.gpu_type={dev['gpu_key']}")
    o += ["engine.bf16=true", "engine.fp16=false"] if precision == "bf16" else ["engine.bf16=false", "engine.fp16=true"]
    return o


def plan_steps(facts: dict, out_dir: Path, python: str = sys.executable) -> list[StepSpec]:
    """The steps this machine runs, in order; steps its GPU count cannot run carry a skip_reason."""
    n = len(facts["devices"])
    out_dir = Path(out_dir)
    prec = precision_for(facts["devices"])
    orch = [python, "-m", "orchestrator"]
    steps = [StepSpec("facts", "facts", timeout_s=60)]

    doctor = StepSpec("doctor", "doctor", gpus=min(n, 8), timeout_s=300,
                      expect={"world_size": min(n, 8), "network": doctor_network(n, facts.get("nvlink_all"))})
    if n >= 2:
        doctor.argv = [python, "-m", "orchestrator.doctor", "--num-workers", str(min(n, 8)), "--use-gpu",
                       "--network", doctor.expect["network"], "--sizes", "8MB,64MB,256MB",
                       "--cpus-per-worker", "1", "--storage-path", str(out_dir / "doctor"),
                       "--json-out", str(out_dir / "doctor.json")]
    else:
        doctor.skip_reason = f"the doctor's all-reduce needs 2+ GPUs (found {n})"
    steps.append(doctor)

    def train(name: str, workers: int, launcher: list[str], steps_: int, extra: list[str], env=None,
              expect=None, timeout=420.0) -> StepSpec:
        run_dir = out_dir / name
        argv = [*orch, *train_overrides(facts, workers, prec), *launcher, f"train.max_steps={steps_}", *extra,
                f"hydra.run.dir={run_dir}"]
        return StepSpec(name, "train", gpus=workers, argv=argv, env=dict(env or {}), run_dir=str(run_dir),
                        timeout_s=timeout, expect={"world_size": workers, "steps": steps_, "precision": prec,
                                                   **(expect or {})})

    def ray_cpus(workers: int) -> str:  # the local Ray the job starts must hold its workers' CPU reservations
        return f"launcher.num_cpus={max(facts['cpu_count'], workers * cpus_per_worker(workers, facts['cpu_count']))}"

    steps.append(train(f"local_{prec}", 1, ["launcher=local", "engine=zero1"], LOCAL_STEPS,
                       [f"train.eval_every_steps={LOCAL_STEPS}", f"train.checkpoint_every_steps={LOCAL_STEPS}"],
                       timeout=360))
    steps.append(train("ray_1gpu_zero2", 1, ["launcher=ray", "engine=zero2", "launcher.max_failures=0", ray_cpus(1)],
                       RAY_STEPS, [f"train.eval_every_steps={RAY_STEPS}", f"train.checkpoint_every_steps={RAY_STEPS}"],
                       timeout=420))
    fault = f"kill_rank=1@step={KILL_AFTER_STEP}"
    kill = train("ray_2gpu_zero2_kill", 2, ["launcher=ray", "engine=zero2", "launcher.max_failures=2", ray_cpus(2)],
                 KILL_STEPS, [f"train.eval_every_steps={KILL_STEPS}", f"train.checkpoint_every_steps={KILL_CHECKPOINT_EVERY}",
                              "train.keep_last=3"],
                 env={"BERT_ORCH_FAULT": fault},
                 expect={"fault": fault, "resumed_from_step": KILL_AFTER_STEP // KILL_CHECKPOINT_EVERY * KILL_CHECKPOINT_EVERY},
                 timeout=600)
    if n < 2:
        kill.skip_reason = f"a 2-worker job needs 2+ GPUs (found {n})"
    steps.append(kill)
    return steps


# ----------------------------------------------------------------------------------------------- evaluate


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_tokens_per_s(records: list[dict], warmup_steps: int = WARMUP_STEPS) -> Optional[float]:
    """Tokens/s of the logged training windows after `warmup_steps`, leaving out the first window after each
    (re)start (a `resume` event): its time includes the restart's warm-up. Every window has the same number of
    steps of near-equal tokens (packed rows), so total tokens / total time is the harmonic mean of the windows."""
    rates: list[float] = []
    skip_next = False
    for r in records:
        if r.get("event") == "resume":
            skip_next = True
            continue
        if "tokens_per_s" not in r or "loss" not in r:
            continue
        if skip_next:
            skip_next = False
            continue
        if r["step"] > warmup_steps and r["tokens_per_s"] > 0:
            rates.append(float(r["tokens_per_s"]))
    if not rates:
        return None
    return len(rates) / sum(1.0 / x for x in rates)


def evaluate_train(spec: StepSpec, returncode: Optional[int], device_name: str) -> dict[str, Any]:
    """Pass/fail of a training step from its run dir (summary.json, plan.json, metrics.jsonl)."""
    run_dir = Path(spec.run_dir)
    exp = spec.expect
    res: dict[str, Any] = {"precision": exp["precision"], "world_size": None, "steps": None, "tokens_per_s": None,
                           "tokens_per_s_per_gpu": None, "mfu": None, "peak_tflops_per_gpu": None,
                           "flops_per_token": None, "final_loss": None, "resumed_from": None}
    failures: list[str] = []
    if returncode != 0:
        failures.append("timed out" if returncode is None else f"exit status {returncode}")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("status") != "completed":
        failures.append(f"summary status {summary.get('status')!r}" + (f": {summary['error']}" if summary.get("error") else ""))
    res["world_size"], res["steps"] = summary.get("world_size"), summary.get("steps")
    if summary and summary.get("world_size") != exp["world_size"]:
        failures.append(f"world size {summary.get('world_size')} != {exp['world_size']}")
    if summary and summary.get("steps") != exp["steps"]:
        failures.append(f"{summary.get('steps')} steps != {exp['steps']}")
    loss = (summary.get("final_train") or {}).get("loss")
    res["final_loss"] = loss
    if summary and (loss is None or not math.isfinite(loss)):
        failures.append(f"final training loss {loss!r} is not finite")
    recs = _read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    steps_logged = [r["step"] for r in recs if "loss" in r]
    if summary and steps_logged != list(range(LOG_EVERY, exp["steps"] + 1, LOG_EVERY)):
        failures.append(f"logged steps {steps_logged} are not every {LOG_EVERY} up to {exp['steps']} once each")
    if "resumed_from_step" in exp:
        res["resumed_from"] = summary.get("resumed_from")
        want = f"step_{exp['resumed_from_step']:08d}"
        if not str(summary.get("resumed_from") or "").endswith(want):
            failures.append(f"resumed_from {summary.get('resumed_from')!r}, expected the checkpoint {want}")
        marker = run_dir / ".faults" / exp["fault"]
        if not marker.is_file():
            failures.append(f"the injected fault {exp['fault']} never fired (no {marker.name} marker)")
        else:
            res["killed_after_step"] = json.loads(marker.read_text())["step"]
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    res["flops_per_token"] = (plan.get("cost") or {}).get("flops_per_token")
    res["vocab_size"] = (plan.get("dataset") or {}).get("vocab_size")
    tps = steady_tokens_per_s(recs)
    if summary and not tps:
        failures.append("no steady-state tokens/s (too few logged windows after warm-up)")
    res["tokens_per_s"] = tps
    res["tokens_per_s_per_gpu"] = tps / exp["world_size"] if tps else None
    res["peak_tflops_per_gpu"] = peak_tflops(device_name, exp["precision"])
    res["mfu"] = mfu(tps, res["flops_per_token"], exp["world_size"], res["peak_tflops_per_gpu"])
    res["status"] = "fail" if failures else "pass"
    res["failures"] = failures
    return res


def evaluate_doctor(spec: StepSpec, returncode: Optional[int], json_path: Path) -> dict[str, Any]:
    """The doctor's own verdict (exit 0 healthy, 1 a check failed, 2 it could not run) plus its numbers."""
    res: dict[str, Any] = {"network": spec.expect["network"], "backend": None, "world_size": None,
                           "largest_busbw_gbps": None, "notes": []}
    failures: list[str] = []
    if returncode != 0:
        failures.append("timed out" if returncode is None else f"doctor exit status {returncode}")
    if json_path.is_file():
        d = json.loads(json_path.read_text())
        res.update(backend=d.get("backend"), world_size=d.get("world_size"), notes=d.get("notes", []))
        if d.get("all_reduce"):
            res["largest_busbw_gbps"] = d["all_reduce"][-1]["busbw_gbps"]
            res["largest_size_bytes"] = d["all_reduce"][-1]["size_bytes"]
        failures += d.get("failures", [])
        if d.get("world_size") != spec.expect["world_size"]:
            failures.append(f"doctor ran {d.get('world_size')} workers, expected {spec.expect['world_size']}")
    elif returncode == 0:
        failures.append(f"no doctor JSON at {json_path}")
    res["status"] = "fail" if failures else "pass"
    res["failures"] = failures
    return res


def assemble_report(facts: dict, results: list[dict], started: float, out_dir: Path) -> dict[str, Any]:
    """The one JSON: overall pass when every step that ran passed (skipped steps say why and do not fail)."""
    ran = [r for r in results if r["status"] != "skipped"]
    ok = bool(ran) and all(r["status"] == "pass" for r in ran)
    return {
        "gpu_acceptance": "pass" if ok else "fail",
        "gpus": len(facts["devices"]),
        "device": facts["devices"][0]["name"] if facts["devices"] else None,
        "precision": precision_for(facts["devices"]),
        "facts": facts,
        "steps": {r["name"]: r for r in results},
        "failed_steps": [r["name"] for r in ran if r["status"] != "pass"],
        "total_seconds": round(time.time() - started, 1),
        "out_dir": str(out_dir),
    }


# ----------------------------------------------------------------------------------------------- run


def _env(spec: StepSpec, out_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BERT_ORCH_FAULT", "RAY_ADDRESS")}
    env.setdefault("BERT_ORCH_CACHE", str(out_dir / "cache"))  # one tokenizer/dataset cache for all steps
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    env.update(spec.env)
    return env


def run_step(spec: StepSpec, facts: dict, out_dir: Path) -> dict[str, Any]:
    base = {"name": spec.name, "kind": spec.kind, "gpus": spec.gpus}
    if spec.skip_reason:
        return {**base, "status": "skipped", "reason": spec.skip_reason}
    t0 = time.time()
    if spec.kind == "facts":
        ok = bool(facts["devices"]) and facts["torch_cuda"] is not None
        return {**base, "status": "pass" if ok else "fail", "seconds": 0.0,
                "failures": [] if ok else ["torch sees no CUDA device"]}
    if spec.run_dir and Path(spec.run_dir).exists():
        shutil.rmtree(spec.run_dir)  # a fresh run: an old checkpoint would be resumed, not trained
    doctor_json = out_dir / "doctor.json"
    if spec.kind == "doctor":
        doctor_json.unlink(missing_ok=True)  # never judge this run by an earlier run's numbers
    log_path = out_dir / f"{spec.name}.log"
    print(f"gpu_acceptance: {spec.name} ... (log {log_path})", file=sys.stderr, flush=True)
    rc: Optional[int]
    with open(log_path, "w") as log:
        log.write(" ".join(spec.argv) + "\n\n")
        log.flush()
        proc = subprocess.Popen(spec.argv, cwd=REPO, env=_env(spec, out_dir), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=spec.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step's own process group (its Ray, if it started one)
            proc.wait()
            rc = None
    if spec.kind == "doctor":
        res = evaluate_doctor(spec, rc, doctor_json)
    else:
        res = evaluate_train(spec, rc, facts["devices"][0]["name"])
    res = {**base, **res, "seconds": round(time.time() - t0, 1), "log": str(log_path)}
    print(f"gpu_acceptance: {spec.name} {res['status']} in {res['seconds']:.0f}s"
          + (f": {'; '.join(res['failures'])}" if res.get("failures") else ""), file=sys.stderr, flush=True)
    return res


def run_all(specs: list[StepSpec], facts: dict, out_dir: Path,
            runner: Callable[[StepSpec, dict, Path], dict] = run_step) -> list[dict]:
    return [runner(s, facts, out_dir) for s in specs]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT), help="logs, run dirs and gpu_acceptance.json")
    ap.add_argument("--dry-run", action="store_true", help="print the planned steps as JSON, run nothing")
    args = ap.parse_args(argv)

    import torch  # the first heavy thing, and only to ask whether there is a GPU at all

    if not torch.cuda.is_available():
        print(no_gpu_message(torch.__version__, torch.version.cuda), file=sys.stderr)
        return NO_GPU_EXIT
    started = time.time()
    out_dir = Path(args.out_dir).resolve()
    facts = gpu_facts()
    specs = plan_steps(facts, out_dir)
    if args.dry_run:
        print(json.dumps({"facts": facts, "steps": [asdict(s) for s in specs]}, indent=2))
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_acceptance: {len(facts['devices'])} x {facts['devices'][0]['name']}, CUDA {facts['torch_cuda']},"
          f" NCCL {facts['nccl']}, driver {facts['driver']}", file=sys.stderr, flush=True)
    report = assemble_report(facts, run_all(specs, facts, out_dir), started, out_dir)
    text = json.dumps(report, indent=2)
    (out_dir / "gpu_acceptance.json").write_text(text + "\n")
    print(text)
    return 0 if report["gpu_acceptance"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
