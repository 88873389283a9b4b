"""Profile our worker loop (launcher=local, engine=torch): where a training step's time goes.

Run (from the repo root):
    .venv/bin/python bench/profile_worker.py --model mini --steps 30            # ours
    .venv/bin/python bench/profile_worker.py --model mini --steps 10 --baseline # the HF baseline of bench/throughput.py
Prints one JSON object (also written to bench/results/profile_<model>[_baseline].json) with
  - split: mean seconds per step in data (next batch: collate + masking), forward, backward, optimizer
    (clip + AdamW + scheduler), timed with perf_counter over --steps steps after --warmup steps, no profiler;
  - top_ops: torch.profiler's table of the ops with the most self CPU time over --profile-steps steps;
  - categories: those self times summed into matmul / attention / norm+activation / optimizer / ...
The model, data, engine and batches are built exactly as orchestrator/worker/trainer.py builds them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEFAULT_DATA = str((REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt").resolve())

from orchestrator.worker.profiling import summarize  # noqa: E402  (the trainer's own categories)


def build_ours(args, run_dir: str):
    """Plan, data, model and engine exactly as the loop builds them; returns (engine, batch iterator, plan)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.driver import make_plan
    from orchestrator.worker import hardware
    from orchestrator.worker.dist import Dist
    from orchestrator.worker.engine import build_engine
    from orchestrator.worker.trainer import StepBatches, make_task

    bf16 = hardware.resolve_bf16(args.bf16, "cpu")
    overrides = [
        "~experiment",
        f"model={args.model}", "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0",
        "data=text", f"data.paths=[{args.data}]", f"tokenizer.vocab_size={args.vocab}",
        f"task.max_seq_length={args.seq}", f"train.max_steps={args.warmup + args.steps + args.profile_steps + 2}",
        f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size_per_gpu={args.global_batch}",
        "launcher=local", "compute=cpu1", f"compute.cpus_per_worker={args.threads}", "engine=torch",
        f"engine.bf16={str(bf16).lower()}", f"engine.compile={str(args.compile).lower()}", f"hydra.run.dir={run_dir}",
    ]
    if args.loader_workers:
        overrides.append(f"++data.loader_workers={args.loader_workers}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    plan, _ = make_plan(cfg, run_dir=run_dir)
    job = plan.job
    torch.set_num_threads(max(1, job.compute.cpus_per_worker))
    d = Dist(0, 1, 0)
    task = make_task(plan, d)  # as orchestrator/worker/trainer.py: task -> source -> order -> model -> engine
    source = task.train_source()
    order = source.step_order(plan.global_batch_size, job.train.seed)
    model = task.build_model()
    if job.engine.compile:
        model = torch.compile(model)
    device = torch.device("cpu")
    engine = build_engine(model, plan, device)
    loader = torch.utils.data.DataLoader(
        StepBatches(source, order, plan, d, 0, plan.grad_accum_steps), batch_size=None, shuffle=False,
        num_workers=job.data.loader_workers, prefetch_factor=4 if job.data.loader_workers > 0 else None)
    batches = iter(loader)
    dataset = plan.dataset

    def data():
        b = next(batches)
        return b, int(b["n_tokens"])

    def forward(b):
        return engine.forward(**task.model_inputs(b, device))

    def backward(out):
        engine.backward(out["loss"])

    def optimizer():
        engine.step()

    info = {"bf16": bf16, "compile": job.engine.compile, "vocab_size": dataset["vocab_size"], "threads": job.compute.cpus_per_worker,
            "loader_workers": job.data.loader_workers}
    return data, forward, backward, optimizer, info


def build_baseline(args, run_dir: str):
    """The HF baseline of bench/throughput.py (a), same tokenizer: BertForMaskedLM fp32, dropout 0.1, collator."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    from orchestrator.driver import make_plan

    sys.path.insert(0, str(REPO / "bench"))
    from throughput import group_texts, text_lines

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "~experiment", f"model={args.model}", "data=text", f"data.paths=[{args.data}]", f"tokenizer.vocab_size={args.vocab}",
            f"task.max_seq_length={args.seq}", "launcher=local", "compute=cpu1", "engine=torch", f"hydra.run.dir={run_dir}"])
    plan, _ = make_plan(cfg, run_dir=run_dir)
    job = plan.job
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(plan.dataset["tokenizer_dir"])
    blocks = group_texts(tok, text_lines([args.data], job.data.eval_fraction, False), args.seq)
    m = job.model
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                                       num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
                                       pad_token_id=tok.pad_token_id))
    model.train()
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    loader = torch.utils.data.DataLoader([{"input_ids": b} for b in blocks], batch_size=args.global_batch, shuffle=True,
                                         drop_last=True, collate_fn=collator)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(loader)

    def data():
        nonlocal it
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        return b, int(b["input_ids"].numel())

    def forward(b):
        return {"loss": model(**b).loss}

    def backward(out):
        out["loss"].backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return data, forward, backward, optimizer, {"bf16": False, "vocab_size": len(tok), "threads": args.threads,
                                               "attn_implementation": model.config._attn_implementation}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="steps timed for the split (no profiler)")
    ap.add_argument("--profile-steps", type=int, default=5, help="steps under torch.profiler")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--baseline", action="store_true", help="profile the HF baseline loop instead of ours")
    ap.add_argument("--trace", default=None, help="also write a chrome trace here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile, record_function

    with tempfile.TemporaryDirectory(prefix="bench_prof_") as tmp:
        build = build_baseline if args.baseline else build_ours
        data, forward, backward, optimizer, info = build(args, str(Path(tmp) / "run"))

        def step(timer=None):
            t0 = time.perf_counter()
            with record_function("## data"):
                b, n_tok = data()
            t1 = time.perf_counter()
            with record_function("## forward"):
                out = forward(b)
            t2 = time.perf_counter()
            with record_function("## backward"):
                backward(out)
            t3 = time.perf_counter()
            with record_function("## optimizer"):
                optimizer()
            t4 = time.perf_counter()
            if timer is not None:
                timer.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, n_tok))

        for _ in range(args.warmup):
            step()
        timer: list = []
        for _ in range(args.steps):
            step(timer)
        import numpy as np

        t = np.asarray(timer)
        total = float(t[:, :4].sum())
        split = {name: {"s_per_step": float(t[:, i].mean()), "fraction": float(t[:, i].sum() / total)}
                 for i, name in enumerate(("data", "forward", "backward", "optimizer"))}
        tokens_per_s = float(t[:, 4].sum() / total)

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(args.profile_steps):
                step()
        if args.trace:
            prof.export_chrome_trace(args.trace)
        summary = summarize(prof.key_averages(), args.profile_steps, args.top)
        categories, top = summary["categories"], summary["top_ops"]
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)

    result = {
        "benchmark": "profile_worker",
        "which": "hf_baseline" if args.baseline else "ours_local_torch",
        "model": args.model, "seq": args.seq, "global_batch_size": args.global_batch, **info,
        "timed_steps": args.steps, "tokens_per_s_unprofiled": tokens_per_s,
        "split": split, "categories": categories, "top_ops": top,
    }
    text = json.dumps(result, indent=2)
    print(table, file=sys.stderr)
    print(text)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"profile_{args.model}{'_baseline' if args.baseline else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
