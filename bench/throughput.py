"""Benchmark: our BERT pretraining worker vs the standard Hugging Face MLM loop, side by side, one command.

Run (from the repo root):
    .venv/bin/python bench/throughput.py --model mini --steps 150            # 4 x 256, seq 128
    .venv/bin/python bench/throughput.py --model small --steps 40            # 4 x 512 x 8 heads
Prints one JSON object and writes it to bench/results/throughput_<model>_seq<seq>.json (--out to change).

In one invocation, on the same text (the training documents of `--data`, the held-out documents for
evaluation), tokenizer, model shape, sequence length and global batch:
  (a) baseline: `transformers.BertForMaskedLM` (its default attention), `DataCollatorForLanguageModeling`
      (15%, 80/10/10), torch's fused AdamW (`Trainer`'s default optim, `adamw_torch_fused`) + the job's schedule
      (linear warmup/decay by default, the transformers function ours calls) + grad clipping 1.0 (what `Trainer`
      does), fp32, default dropout 0.1 (`--baseline-dropout`), texts tokenised and
      concatenated into full blocks as `run_mlm.py` does by default (so no padding). Runs in its own process
      with the same torch thread count.
  (b) ours, `launcher=local engine=torch`: sparse MLM head, the last layer only at the masked positions (keys and
      values everywhere), packing with position/segment resets and block-diagonal masks, bf16 autocast when
      `bf16_supported(cpu)` (attention then `engine.attention=manual`, else SDPA), fused AdamW, dropout 0.
  (c) ours, `launcher=ray compute=cpu2 engine=zero2`: 2 CPU workers x 1 thread, DeepSpeed ZeRO-2.
Throughput is real (non-padding) tokens per second over the steps after `--warmup-steps`, training only
(no eval/checkpoint time). Held-out MLM accuracy of (a) and (b) is computed here by one function on the
same masked held-out blocks (`BertForMaskedLM.from_pretrained` of both saved models), after the same
number of optimizer steps of the same global batch (the baseline's full blocks carry slightly more
tokens per step than our packed rows, so the comparison favours the baseline; both counts are reported).
MFU of (a) and (b) is against a matmul peak measured in this run (same threads, same dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

_T_PROCESS = time.perf_counter()  # the baseline's time to first step counts from here (process start + imports)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = str((REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt").resolve())

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
}


# -------------------------------------------------------------------------------------- contention
def _busy_cpu_seconds() -> float:
    """CPU seconds spent non-idle by the whole machine (Linux /proc/stat; 0 elsewhere)."""
    try:
        vals = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


class Contention:
    """Around a phase: how many cores *other* processes kept busy (machine busy time minus ours, per second).

    This box is shared: a phase that ran next to someone else's job is flagged in the output rather than
    silently compared. Ours = this process + every descendant, polled with psutil twice a second (the Ray
    phase's workers and daemons are grandchildren that are never reaped by us, so `RUSAGE_CHILDREN` alone
    misses them and counted Ray's own work as contention).
    """

    POLL_S = 0.5

    def __enter__(self):
        import resource
        import threading

        import psutil  # a dev dependency, as for bench/prepare_1gb.py

        self._r = resource
        self.t0 = time.perf_counter()
        self.busy0 = _busy_cpu_seconds()
        self._self0 = self._self_cpu()
        self._seen: dict = {}  # (pid, create_time) -> [cpu at first sight (0 if born during the phase), last cpu]
        self._proc = psutil.Process()
        self._poll(initial=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _self_cpu(self) -> float:
        a = self._r.getrusage(self._r.RUSAGE_SELF)
        return a.ru_utime + a.ru_stime

    def _poll(self, initial: bool = False) -> None:
        import psutil

        for child in self._proc.children(recursive=True):
            try:
                with child.oneshot():
                    key = (child.pid, child.create_time())
                    t = child.cpu_times()
                    cpu = t.user + t.system
            except psutil.Error:
                continue
            if key in self._seen:
                self._seen[key][1] = cpu
            else:
                self._seen[key] = [cpu if initial else 0.0, cpu]

    def _loop(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._poll()

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._poll()
        own = self._self_cpu() - self._self0 + sum(last - first for first, last in self._seen.values())
        other = (_busy_cpu_seconds() - self.busy0) - own
        self.other_cores = max(0.0, other / wall) if wall > 0 else 0.0
        return False


# ------------------------------------------------------------------------------------------- config
def compose_job(args, run_dir: str, extra: list[str] = ()):
    """The JobConfig of our runs (b) and (c) minus launcher: model, data, tokenizer, task, optimizer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config.schema import to_job_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*common_overrides(args), "launcher=local", "compute=cpu1",
                                                         "engine=torch", f"hydra.run.dir={run_dir}", *extra])
    job = to_job_config(cfg)
    job.run_dir = run_dir
    return job


def common_overrides(args) -> list[str]:
    o = [
        "~experiment",  # no preset (the default experiment is a multi-stage pipeline): config.yaml + the groups below
        f"model={args.model}",
        "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0",
        "data=text",
        f"data.paths=[{args.data}]",
        f"tokenizer.vocab_size={args.vocab}",
        f"task.max_seq_length={args.seq}",
        f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.global_batch}",
        f"train.log_every_steps={args.log_every}",
        f"train.eval_every_steps={args.steps}",
        f"train.checkpoint_every_steps={args.steps}",
        f"train.seed={args.seed}",
    ]
    if args.lr is not None:
        o.append(f"optim.lr={args.lr}")
    if args.loader_workers:
        o.append(f"++data.loader_workers={args.loader_workers}")
    for spec in args.model_override:
        o.append(f"model.{spec}")
    o.extend(args.override)
    return o


# ---------------------------------------------------------------------------------------- our runs
def run_cli(name: str, overrides: list[str], run_dir: Path, warmup_steps: int) -> dict:
    t0_wall = time.time()
    t0 = time.perf_counter()
    with Contention() as load:
        res = subprocess.run([sys.executable, "-m", "orchestrator", *overrides, f"hydra.run.dir={run_dir}"],
                             cwd=REPO, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    summary_path = run_dir / "summary.json"
    s = json.loads(summary_path.read_text())
    # summary.json is written right after wall_time_s is taken: its mtime dates the worker's start
    worker_start_wall = summary_path.stat().st_mtime - s["wall_time_s"]
    first_step_wall = worker_start_wall + s["time_to_first_step_s"]
    steady = steady_from_metrics(run_dir / "metrics.jsonl", warmup_steps)
    return {
        "overrides": overrides,
        "tokens_per_s": steady["tokens_per_s"],
        "tokens_per_s_all_steps": s["tokens_per_s"],
        "measured_steps": steady["steps"],
        "measured_seconds": steady["seconds"],
        "window_tokens_per_s": steady["windows"],
        "median_ms_per_step": steady["split"],  # data / forward / sync / backward / step, mean over ranks
        "window_ms_per_step": steady["window_split"],  # the same per window, beside window_tokens_per_s
        "median_window_tokens_per_s": steady.get("median_window_tokens_per_s"),
        "slow_windows": steady.get("slow_windows"),
        "time_to_first_step_s": first_step_wall - t0_wall,
        "worker_time_to_first_step_s": s["time_to_first_step_s"],
        "command_wall_time_s": wall,
        "world_size": s["world_size"],
        "global_batch_size": s["global_batch_size"],
        "micro_batch_size_per_gpu": s["micro_batch_size_per_gpu"],
        "final_train_loss": s["final_train"].get("loss"),
        "own_eval_mlm_acc": s["final_eval"].get("eval_mlm_acc"),
        "export": s["export"],
        "run_dir": str(run_dir),
        "other_processes_cpu_cores": round(load.other_cores, 2),
    }


def steady_from_metrics(path: Path, warmup_steps: int) -> dict:
    """Tokens/s over the logged windows after warm-up: sum(tokens) / sum(seconds) of those windows; and the median
    over those windows of each phase's ms per step (the trainer's time_<phase>_ms)."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "tokens_per_s" in r]
    tokens = seconds = 0.0
    steps = 0
    windows = []
    window_split: list[dict] = []  # the trainer's per-window split of a step (CPU workers)
    for prev, cur in zip(recs, recs[1:]):
        if prev["step"] < warmup_steps:
            continue
        dt = cur["time"] - prev["time"]
        if dt <= 0:
            continue
        tokens += cur["tokens_per_s"] * dt
        seconds += dt
        steps += cur["step"] - prev["step"]
        windows.append(round(cur["tokens_per_s"], 1))
        phase_ms = {k[len("time_"):-len("_ms")]: v for k, v in cur.items() if k.startswith("time_") and k.endswith("_ms")}
        if phase_ms:
            window_split.append({"at_step": cur["step"], **phase_ms, **({"slowest_rank": cur["slowest_rank"]}
                                                                        if "slowest_rank" in cur else {})})
    phases = {k for row in window_split for k in row} - {"at_step", "slowest_rank"}
    split = {k: round(statistics.median(row[k] for row in window_split if k in row), 2) for k in sorted(phases)}
    out = {"windows": windows, "split": split, "window_split": window_split, **window_spread(windows)}
    if seconds == 0:  # too few windows: fall back to everything
        return {"tokens_per_s": recs[-1]["tokens_per_s"], "steps": recs[-1]["step"], "seconds": None, **out}
    return {"tokens_per_s": tokens / seconds, "steps": steps, "seconds": seconds, **out}


SLOW_WINDOW = 0.85  # a window below this fraction of its run's median window is a slow stretch


def window_spread(windows: list[float]) -> dict:
    """The run's median window (tokens/s) and its slow windows. On a shared host a run has minutes-long stretches
    where every core computes ~30% slower (bench/README.md: forward and backward slow alike, no steal time, no
    other process busy); tokens_per_s counts them, the median window does not, and the count says how many."""
    if not windows:
        return {}
    median = statistics.median(windows)
    return {"median_window_tokens_per_s": round(median, 1),
            "slow_windows": {"below_fraction_of_median": SLOW_WINDOW, "of": len(windows),
                             "count": sum(w < SLOW_WINDOW * median for w in windows)}}


def tokens_seen_by_ours(data_dir: str, n_rows: int, global_batch: int, seed: int, steps: int) -> int:
    """Exact non-padding tokens our loop trains on in `steps` steps (same StepOrder as the worker)."""
    import numpy as np

    from orchestrator.data.order import StepOrder
    from orchestrator.data.rows import sample_lengths

    d = Path(data_dir) / "train"
    samples = np.load(d / "samples.npy")
    offs = np.load(d / "row_offsets.npy")
    row_samples = np.load(d / "row_samples.npy")
    per_sample = sample_lengths(samples)
    per_row = np.add.reduceat(per_sample[row_samples], offs[:-1])
    order = StepOrder(n_rows, global_batch, seed)
    return int(sum(int(per_row[order.global_rows(s)].sum()) for s in range(steps)))


# ------------------------------------------------------------------------------------------ baseline
def text_lines(data_paths: list[str], eval_fraction: float, held_out: bool) -> list[str]:
    """Our corpus split (same hash), one line per document: what run_mlm.py's text loader would see."""
    from orchestrator.data.corpus import is_eval_document, read_text_documents, resolve_text_paths

    return [" ".join(doc) for doc in read_text_documents(resolve_text_paths(data_paths))
            if is_eval_document(doc, eval_fraction) == held_out]


def group_texts(tokenizer, lines: list[str], block: int) -> list[list[int]]:
    """run_mlm.py default: tokenize every line (with [CLS]/[SEP]), concatenate, cut full blocks, drop the rest."""
    enc = tokenizer(lines, return_special_tokens_mask=False)["input_ids"]
    flat = [t for ids in enc for t in ids]
    n = len(flat) // block * block
    return [flat[i : i + block] for i in range(0, n, block)]


def baseline_worker(cfg: dict) -> None:
    """(a), in a fresh process: HF BertForMaskedLM + DataCollatorForLanguageModeling + AdamW, dropout 0.1; fp32, or
    (abf) bf16 autocast over forward and loss, what `Trainer(bf16=True)` does on a CPU (weights and optimizer fp32)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    from orchestrator.worker.engine import lr_lambda_factory

    torch.set_num_threads(cfg["threads"])
    tok = AutoTokenizer.from_pretrained(cfg["tokenizer_dir"])
    blocks = group_texts(tok, text_lines(cfg["data_paths"], cfg["eval_fraction"], False), cfg["seq"])
    m = cfg["model"]
    config = BertConfig(
        vocab_size=len(tok), hidden_size=m["hidden_size"], num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"], intermediate_size=m["intermediate_size"],
        max_position_embeddings=m["max_position_embeddings"], pad_token_id=tok.pad_token_id,
        **({} if cfg.get("dropout") is None else
           {"hidden_dropout_prob": cfg["dropout"], "attention_probs_dropout_prob": cfg["dropout"]}),
    )  # hidden/attention dropout: the defaults (0.1) unless --baseline-dropout
    torch.manual_seed(cfg["seed"])
    model = BertForMaskedLM(config)
    model.train()
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    gen = torch.Generator().manual_seed(cfg["seed"])
    loader = torch.utils.data.DataLoader([{"input_ids": b} for b in blocks], batch_size=cfg["global_batch"],
                                         shuffle=True, drop_last=True, collate_fn=collator, generator=gen)
    o = cfg["optim"]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], fused=True)  # Trainer's default
    steps = cfg["steps"]
    sched = lr_lambda_factory(cfg["schedule"], cfg["warmup_steps"], steps)(opt)  # ours: the same function
    it = iter(loader)
    tokens_measured = 0
    t_measured = 0.0
    tokens_total = 0
    first_step = None
    windows = []
    win_tok, win_t = 0, 0.0
    losses = []
    lr_log = []
    every = cfg.get("curve_every")
    curve_exports: dict[int, str] = {}
    for step in range(steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.get("bf16", False)):
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if (step + 1) % cfg["log_every"] == 0:
            lr_log.append([step + 1, opt.param_groups[0]["lr"]])  # the lr of this step, as ours logs it
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        dt = time.perf_counter() - t0
        n_tok = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        tokens_total += n_tok
        if first_step is None:
            first_step = time.perf_counter() - _T_PROCESS
        if step >= cfg["warmup_steps_measure"]:
            tokens_measured += n_tok
            t_measured += dt
            win_tok += n_tok
            win_t += dt
            if (step + 1) % cfg["log_every"] == 0:
                windows.append(round(win_tok / win_t, 1))
                win_tok, win_t = 0, 0.0
        if every and (step + 1) % every == 0 and step + 1 < steps:  # the learning curve's exports, not timed
            curve_exports[step + 1] = f"{cfg['save_dir']}@{step + 1}"
            model.save_pretrained(curve_exports[step + 1])
    model.save_pretrained(cfg["save_dir"])
    tok.save_pretrained(cfg["save_dir"])
    res = {
        "tokens_per_s": tokens_measured / t_measured if t_measured else None,
        "measured_steps": steps - cfg["warmup_steps_measure"],
        "measured_seconds": t_measured,
        "window_tokens_per_s": windows,
        "time_to_first_step_s": first_step,
        "tokens_seen": tokens_total,
        "train_blocks": len(blocks),
        "final_train_loss": sum(losses[-5:]) / len(losses[-5:]),
        "schedule": cfg["schedule"],
        "lr_at_step": lr_log,
        "attn_implementation": model.config._attn_implementation,
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "dtype": "bfloat16 autocast" if cfg.get("bf16") else "float32",
        "export": cfg["save_dir"],
        "curve_exports": curve_exports,
    }
    Path(cfg["result"]).write_text(json.dumps(res))


def run_baseline(cfg: dict, tmp: Path, name: str = "baseline") -> dict:
    cfg = {**cfg, "result": str(tmp / f"{name}_result.json"), "save_dir": str(tmp / f"{name}_model")}
    cfg_path = tmp / f"{name}_cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with Contention() as load:
        res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(cfg_path)],
                             cwd=REPO, capture_output=True, text=True, env=ENV)
    if res.returncode != 0:
        raise SystemExit(f"baseline failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    out = json.loads(Path(cfg["result"]).read_text())
    out["command_wall_time_s"] = time.perf_counter() - t0
    out["other_processes_cpu_cores"] = round(load.other_cores, 2)
    return out


# ---------------------------------------------------------------------------------------- evaluation
def check_heldout(args, held: list[str], tokenizer_dir: str, eval_fraction: float) -> None:
    """One line and exit 2 when the held-out split gives no block of --seq tokens to score."""
    from transformers import AutoTokenizer

    blocks = group_texts(AutoTokenizer.from_pretrained(tokenizer_dir), held, args.seq) if held else []
    if not blocks:
        print(f"error: --data {args.data}: the held-out split ({len(held)} documents, data.eval_fraction="
              f"{eval_fraction} chosen by a hash of each document's text) gives no block of --seq {args.seq} "
              f"tokens to score: give a corpus with more distinct documents", file=sys.stderr)
        raise SystemExit(2)


def heldout_mlm_accuracy(model_dirs: dict[str, str], tokenizer_dir: str, lines: list[str], seq: int,
                         draws: int, seed: int, batch: int = 32) -> dict:
    """Every model on the same held-out blocks with the same 15% (80/10/10) masks: accuracy on the selected tokens
    (mlm_acc: all of them, including the 10% left unchanged, which a model gets by copying its input) and on the
    [MASK]-replaced ones only (mlm_acc_mask_only: the prediction the objective is about), each beside the
    most-frequent-token rate of the same positions."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = group_texts(tok, lines, seq)
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    torch.manual_seed(seed)
    batches = []
    for _ in range(draws):
        for i in range(0, len(blocks), batch):
            batches.append(collator([{"input_ids": b} for b in blocks[i : i + batch]]))
    counts = {}
    freq: dict = {}
    freq_mask: dict = {}
    for b in batches:
        sel = b["labels"] != -100
        for t in b["labels"][sel].tolist():
            freq[t] = freq.get(t, 0) + 1
        for t in b["labels"][sel & (b["input_ids"] == tok.mask_token_id)].tolist():
            freq_mask[t] = freq_mask.get(t, 0) + 1
    total_masked, total_mask_only = sum(freq.values()), sum(freq_mask.values())
    out = {"heldout_blocks": len(blocks), "mask_draws": draws, "masked_tokens": total_masked,
           "most_frequent_token_acc": max(freq.values()) / total_masked if total_masked else None,
           "mask_replaced_tokens": total_mask_only,
           "most_frequent_token_acc_mask_only": max(freq_mask.values()) / total_mask_only if total_mask_only else None}
    for name, d in model_dirs.items():
        model = BertForMaskedLM.from_pretrained(d, local_files_only=True)
        model.eval()
        correct = n = correct_mask = n_mask = 0
        loss_sum = 0.0
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
                sel = b["labels"] != -100
                pred = logits[sel].argmax(-1)
                correct += int((pred == b["labels"][sel]).sum())
                masked = (b["input_ids"][sel] == tok.mask_token_id)
                correct_mask += int(((pred == b["labels"][sel]) & masked).sum())
                n_mask += int(masked.sum())
                loss_sum += float(torch.nn.functional.cross_entropy(logits[sel].float(), b["labels"][sel], reduction="sum"))
                n += int(sel.sum())
        counts[name] = {"mlm_acc": correct / n, "mlm_acc_mask_only": correct_mask / max(n_mask, 1), "mlm_loss": loss_sum / n}
    out["models"] = counts
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mini", help="conf/model/<name> (mini = 4x256, small = 4x512x8 heads)")
    ap.add_argument("--model-override", action="append", default=[], help="extra model.<key>=<value>, e.g. hidden_size=384")
    ap.add_argument("--override", action="append", default=[],
                    help="extra Hydra override of the job, any key, e.g. task.packing=false (an ablation) or"
                         " schedule=cosine; (b) and (c) run all of it, (a) and (abf) take the model shape, optimizer"
                         " and schedule from it")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--vocab", type=int, default=30522, help="WordPiece vocab size asked of our tokenizer trainer")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate of every phase (default: conf/optim)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--baseline-dropout", type=float, default=None,
                    help="hidden and attention dropout of (a) and (abf) (default: BertConfig's 0.1; ours run at 0)")
    ap.add_argument("--curve-every", type=int, default=0,
                    help="(a) and (abf) also save their model every N steps, each scored on the held-out blocks: the"
                         " baseline's learning curve in one run (<phase>@<step> in heldout_eval)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="steps not measured (JIT, allocator, caches)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of (a) and (b); (c) uses 2 workers x 1")
    ap.add_argument("--bf16", default="auto", help="auto | true | false for (b) and (c)")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--phases", default="a,abf,b,c",
                    help="comma list of a (HF baseline, fp32), abf (HF baseline, bf16 autocast; skipped without native"
                         " bf16), b (local), c (ray), b32 (ours, fp32)")
    ap.add_argument("--eval-draws", type=int, default=4, help="mask draws over the held-out blocks")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cache-dir", default=None, help="token cache (default: a fresh temp dir, so data prep is timed cold)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 warm-up steps of our runs on every rank (train.profile_steps): by category, top ops")
    ap.add_argument("--baseline-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_worker:
        baseline_worker(json.loads(Path(args.baseline_worker).read_text()))
        return

    import torch

    from orchestrator.data.pretraining import prepare_pretraining_data
    from orchestrator.plan.job_plan import warmup_steps
    from orchestrator.plan.memory import flops_per_token
    from orchestrator.worker import hardware

    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    torch.set_num_threads(args.threads)
    bf16 = hardware.resolve_bf16(args.bf16, "cpu")
    result: dict = {
        "benchmark": "throughput",
        "data": args.data,
        "seq": args.seq,
        "global_batch_size": args.global_batch,
        "steps": args.steps,
        "warmup_steps_not_measured": args.warmup_steps,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "hardware": hardware.describe(),
        "ours_bf16": bf16,
        "overrides": args.override,
        "baseline_dropout": args.baseline_dropout,  # null: BertConfig's default (each HF run records its own)
    }

    with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmp_s:
        tmp = Path(tmp_s)
        cache = args.cache_dir or str(tmp / "cache")
        os.environ["BERT_ORCH_CACHE"] = cache
        ENV["BERT_ORCH_CACHE"] = cache

        # -- data preparation: cold (WordPiece training + parallel tokenising), then warm (cache hit)
        job = compose_job(args, str(tmp / "plan"))
        cold = prepare_pretraining_data(job)
        warm = prepare_pretraining_data(job)
        result["data_prep"] = {
            "cold_seconds": cold.seconds, "cold_cached": cold.cached,
            "tokens_per_s_cold": cold.tokens_per_second if not cold.cached else None,
            "warm_seconds": warm.seconds, "train_tokens": cold.train_tokens,
            "train_rows": cold.train_rows, "eval_rows": cold.eval_rows,
            "note": "cold = train WordPiece + tokenise (Rust, batched, parallel) + build samples + pack; warm = cache hit",
        }
        tok_dir, vocab = cold.tokenizer_dir, cold.vocab_size
        # the held-out blocks every phase is scored on: refused now, before any phase runs, if there are none
        held = text_lines([args.data], job.data.eval_fraction, True)
        check_heldout(args, held, tok_dir, job.data.eval_fraction)
        m = job.model
        result["model"] = {"name": m.name, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_hidden_layers,
                           "num_attention_heads": m.num_attention_heads, "intermediate_size": m.intermediate_size,
                           "vocab_size": vocab, "vocab_size_requested": args.vocab}
        result["tokenizer_dir"] = tok_dir

        # -- matmul peak in this process (same threads), for MFU
        with Contention() as load:
            peaks = {"float32": hardware.matmul_peak_flops(torch.float32)}
            if bf16:
                peaks["bfloat16"] = hardware.matmul_peak_flops(torch.bfloat16)
        peaks["other_processes_cpu_cores"] = round(load.other_cores, 2)
        result["matmul_peak"] = peaks

        warmup_lr_steps = warmup_steps(job.schedule, args.steps)  # the plan's own rule
        common = common_overrides(args) + [f"engine.bf16={str(bf16).lower()}"]
        if args.profile:  # inside the unmeasured warm-up steps, so the throughput is the profiler's free
            first, last = max(2, args.warmup_steps - 4), max(2, args.warmup_steps - 2)
            if last >= args.warmup_steps:
                raise SystemExit("--profile needs --warmup-steps >= 5: the profiled steps are not measured")
            common.append(f"train.profile_steps=[{first},{last}]")
        runs: dict = {}
        if "b" in phases:
            runs["b_local"] = run_cli("b", [*common, "launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}",
                                            "engine=torch", f"train.micro_batch_size_per_gpu={args.global_batch}"],
                                      tmp / "b", args.warmup_steps)
        if "b32" in phases:
            runs["b_local_fp32"] = run_cli("b32", [*common[:-1], "engine.bf16=false", "launcher=local", "compute=cpu1",
                                                   f"compute.cpus_per_worker={args.threads}", "engine=torch",
                                                   f"train.micro_batch_size_per_gpu={args.global_batch}"],
                                           tmp / "b32", args.warmup_steps)
        base_cfg = {
            "threads": args.threads, "tokenizer_dir": tok_dir, "data_paths": [args.data],
            "eval_fraction": job.data.eval_fraction, "seq": args.seq, "seed": args.seed,
            "global_batch": args.global_batch, "steps": args.steps, "warmup_steps": warmup_lr_steps,
            "warmup_steps_measure": args.warmup_steps, "log_every": args.log_every, "dropout": args.baseline_dropout,
            "curve_every": args.curve_every,
            "model": {"hidden_size": m.hidden_size, "num_hidden_layers": m.num_hidden_layers,
                      "num_attention_heads": m.num_attention_heads, "intermediate_size": m.intermediate_size,
                      "max_position_embeddings": m.max_position_embeddings},
            "schedule": job.schedule.name,
            "optim": {"lr": job.optim.lr, "weight_decay": job.optim.weight_decay, "beta1": job.optim.beta1,
                      "beta2": job.optim.beta2, "eps": job.optim.eps},
        }
        if "a" in phases:
            runs["a_hf_baseline"] = run_baseline(base_cfg, tmp)
        if "abf" in phases and hardware.cpu_has_native_bf16():  # AVX2-only CPUs: fp32 rows only (bf16 is emulated)
            runs["a_hf_bf16"] = run_baseline({**base_cfg, "bf16": True}, tmp, "baseline_bf16")
        if "c" in phases:
            half = max(1, args.global_batch // 2)
            runs["c_ray_zero2"] = run_cli("c", [*common, "launcher=ray", "compute=cpu2", "engine=zero2",
                                                f"train.micro_batch_size_per_gpu={half}"],
                                          tmp / "c", args.warmup_steps)
        for k in ("b_local", "b_local_fp32", "c_ray_zero2"):
            if k in runs:
                runs[k]["tokens_seen"] = tokens_seen_by_ours(cold.data_dir, cold.train_rows, args.global_batch, args.seed, args.steps)
        result["runs"] = runs
        if args.profile:  # train.profile_steps' per-rank summaries (orchestrator/worker/profiling.py), top ops cut to 12
            result["profiles"] = {
                k: {p.stem: {**(d := json.loads(p.read_text())), "top_ops": d["top_ops"][:12]}
                    for p in sorted((Path(r["run_dir"]) / "profile").glob("rank*[0-9].json"))}
                for k, r in runs.items() if k in ("b_local", "b_local_fp32", "c_ray_zero2")}

        # -- FLOPs and MFU (matmul FLOPs per real token; backward = 2x forward)
        fpt_ours = flops_per_token(m.hidden_size, m.num_hidden_layers, m.intermediate_size, args.seq, vocab,
                                   masked_fraction=job.task.mlm_probability, sparse_mlm=True, with_nsp=False,
                                   last_layer_at_loss=True)
        fpt_hf = flops_per_token(m.hidden_size, m.num_hidden_layers, m.intermediate_size, args.seq, vocab,
                                 sparse_mlm=False, with_nsp=False)
        result["flops_per_token"] = {"ours_sparse_mlm": fpt_ours, "hf_dense_mlm": fpt_hf, "ratio": fpt_hf / fpt_ours}
        mfu = {}
        peak_b = peaks["bfloat16" if bf16 else "float32"]["peak_flops"]
        if "b_local" in runs:
            achieved = runs["b_local"]["tokens_per_s"] * fpt_ours
            mfu["b_local"] = {"achieved_flops": achieved, "peak_dtype": "bfloat16" if bf16 else "float32",
                              "mfu": achieved / peak_b, "mfu_vs_fp32_peak": achieved / peaks["float32"]["peak_flops"]}
        if "b_local_fp32" in runs:
            achieved = runs["b_local_fp32"]["tokens_per_s"] * fpt_ours
            mfu["b_local_fp32"] = {"achieved_flops": achieved, "mfu": achieved / peaks["float32"]["peak_flops"]}
        if "a_hf_baseline" in runs:
            achieved = runs["a_hf_baseline"]["tokens_per_s"] * fpt_hf
            mfu["a_hf_baseline"] = {"achieved_flops": achieved, "peak_dtype": "float32", "mfu": achieved / peaks["float32"]["peak_flops"]}
        if "a_hf_bf16" in runs and "bfloat16" in peaks:
            achieved = runs["a_hf_bf16"]["tokens_per_s"] * fpt_hf
            mfu["a_hf_bf16"] = {"achieved_flops": achieved, "peak_dtype": "bfloat16", "mfu": achieved / peaks["bfloat16"]["peak_flops"]}
        result["mfu"] = mfu

        ratios = {}
        tp = {k: v["tokens_per_s"] for k, v in runs.items()}
        if "a_hf_baseline" in tp and "b_local" in tp:
            ratios["b_over_a"] = tp["b_local"] / tp["a_hf_baseline"]
        if "a_hf_baseline" in tp and "b_local_fp32" in tp:
            ratios["b_fp32_over_a"] = tp["b_local_fp32"] / tp["a_hf_baseline"]
        if "a_hf_bf16" in tp and "b_local" in tp:
            ratios["b_over_a_bf16"] = tp["b_local"] / tp["a_hf_bf16"]
        if "b_local" in tp and "c_ray_zero2" in tp:
            ratios["c_over_b"] = tp["c_ray_zero2"] / tp["b_local"]
            if runs["b_local"]["median_window_tokens_per_s"] and runs["c_ray_zero2"]["median_window_tokens_per_s"]:
                # the same outside the host's slow stretches (window_spread), which fall unevenly on the two runs
                ratios["c_over_b_median_windows"] = (runs["c_ray_zero2"]["median_window_tokens_per_s"]
                                                     / runs["b_local"]["median_window_tokens_per_s"])
        result["ratios"] = ratios
        result["tokens_per_s"] = tp
        result["time_to_first_step_s"] = {k: v["time_to_first_step_s"] for k, v in runs.items()}
        noisy = {k: v["other_processes_cpu_cores"] for k, v in runs.items() if v["other_processes_cpu_cores"] > 0.25}
        if peaks["other_processes_cpu_cores"] > 0.25:
            noisy["matmul_peak"] = peaks["other_processes_cpu_cores"]
        result["contention_warning"] = (f"other processes kept cores busy during {noisy}: numbers of those phases are "
                                        "low; re-run on a quiet machine") if noisy else None

        # -- held-out MLM accuracy of the saved models, one function, same masked blocks
        dirs = {}
        for k in ("a_hf_baseline", "a_hf_bf16"):
            if k in runs:
                dirs[k] = runs[k]["export"]
                dirs.update({f"{k}@{step}": d for step, d in runs[k].pop("curve_exports").items()})
        for k in ("b_local", "b_local_fp32", "c_ray_zero2"):
            if k in runs:
                dirs[k] = runs[k]["export"]
        if dirs:
            result["heldout_eval"] = heldout_mlm_accuracy(dirs, tok_dir, held, args.seq, args.eval_draws, args.seed)
            result["heldout_eval"]["tokens_seen"] = {k: runs[k].get("tokens_seen") for k in dirs if k in runs}
        for r in runs.values():  # the temp dirs are gone after this run
            r.pop("export", None)
            r.pop("run_dir", None)
            r.pop("overrides", None)
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"throughput_{args.model}_seq{args.seq}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
