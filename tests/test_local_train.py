"""Integration on the CPU with the local launcher: learning, export, kill-and-resume, real text, W&B offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, compose, progress_steps, read_jsonl
from orchestrator.driver import train

LEARN = [
    "launcher=local", "compute=cpu1", "engine=torch", "data.synthetic_documents=1500",
    "task.max_seq_length=64", "optim.lr=3e-3", "train.max_steps=400", "train.global_batch_size=32",
    "train.micro_batch_size_per_gpu=16", "train.eval_every_steps=200", "train.checkpoint_every_steps=200",
    "train.log_every_steps=5",
]


pytestmark = pytest.mark.slow  # every test here trains a real model (DeepSpeed or torch, subprocesses)

@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("learn") / "run"
    summary = train(compose(LEARN), run_dir=str(run_dir), interactive=False)
    return run_dir, summary


def test_loss_falls_and_accuracy_beats_most_frequent_baseline(learned_run):
    run_dir, summary = learned_run
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert recs[-1]["loss"] < 0.75 * recs[0]["loss"]
    ev = summary["final_eval"]
    assert ev["eval_mlm_acc"] > ev["eval_baseline_most_frequent_acc"] + 0.10, ev
    assert summary["status"] == "completed" and summary["steps"] == 400
    for r in recs:
        assert {"loss", "mlm_acc", "lr", "grad_norm", "tokens_per_s", "consumed_samples"} <= r.keys()


def test_run_dir_is_self_describing(learned_run):
    run_dir, summary = learned_run
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["global_batch_size"] == 32 and plan["total_steps"] == 400
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000200", "step_00000400"]
    state = json.loads((run_dir / "checkpoints" / "step_00000400" / "trainer_state.json").read_text())
    assert state["consumed_samples"] == 400 * 32 and state["world_size"] == 1


def test_export_reloads_with_transformers_and_matches_checkpoint(learned_run):
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, BertForPreTraining

    run_dir, _ = learned_run
    export = run_dir / "export"
    tok = AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    mlm = BertForMaskedLM.from_pretrained(str(export), local_files_only=True).eval()
    state = torch.load(run_dir / "checkpoints" / "step_00000400" / "engine_state.pt", weights_only=False)["model"]
    ref = BertForPreTraining.from_pretrained(str(export), local_files_only=True).eval()
    ckpt_weights = {k[len("hf."):]: v for k, v in state.items() if k.startswith("hf.")}
    ref.load_state_dict(ckpt_weights)
    enc = tok("the dog barks when [MASK] comes home .", return_tensors="pt")
    with torch.no_grad():
        a = mlm(**enc).logits
        b = ref(**enc).prediction_logits
    torch.testing.assert_close(a, b)
    assert tok.mask_token == "[MASK]" and tok.vocab_size > 100


def _cli(args, run_dir: Path, stdout=subprocess.PIPE, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw,
    )


RESUME = [
    "experiment=quickstart_pretrain", "launcher=local", "compute=cpu1", "engine=zero2", "data.synthetic_documents=600", "task.max_seq_length=64",
    "train.max_steps=40", "train.global_batch_size=16", "train.micro_batch_size_per_gpu=8",
    "train.checkpoint_every_steps=10", "train.eval_every_steps=20", "train.log_every_steps=1", "train.keep_last=5",
]


def test_sigkill_mid_run_then_same_command_resumes_to_same_result(tmp_path):
    """DeepSpeed engine at world size 1: kill -9 after a checkpoint, rerun, compare with an uninterrupted run.
    The uninterrupted run JIT-builds no C++ op (DeepSpeed's shm all-reduce op serves inference only)."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ops = tmp_path / "torch_extensions"
    log = tmp_path / "ref.log"
    with log.open("w") as fh:  # output to a file, as under nohup
        ref = _cli(RESUME, ref_dir, stdout=fh, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ops)})
        ref.wait(timeout=600)
    out = log.read_text()
    assert ref.returncode == 0, out[-3000:]
    assert not ops.exists() or not any(ops.iterdir()), f"a CPU job JIT-built {sorted(p.name for p in ops.iterdir())}"
    assert progress_steps(out, 40) == list(range(1, 41)), "output to a file: one progress line per log step"

    proc = _cli(RESUME, run_dir)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "step_00000020").is_dir():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl"))
    assert killed_at < 40

    again = _cli(RESUME, run_dir)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000020") or summary["resumed_from"].endswith("step_00000030")
    assert summary["steps"] == 40
    for k, v in ref_summary["final_eval"].items():
        assert summary["final_eval"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    # metrics.jsonl holds each step once, and the curve equals the uninterrupted one
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 41))
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    ref_losses = [r["loss"] for r in read_jsonl(ref_dir / "metrics.jsonl") if "loss" in r]
    assert losses == pytest.approx(ref_losses, rel=1e-4)


WIKITEXT = SHARED_DATA / "wikitext-2" / "valid.txt"


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="../shared/data/wikitext-2/valid.txt is absent")
def test_pretrain_on_wikitext_with_fresh_wordpiece(tmp_path):
    cfg = compose([
        "launcher=local", "compute=cpu1", "engine=torch", "data=text", f"data.paths=[{WIKITEXT}]",
        "tokenizer.vocab_size=3000", "task.max_seq_length=128", "train.max_steps=40", "train.global_batch_size=16",
        "train.micro_batch_size_per_gpu=16", "train.eval_every_steps=40", "train.log_every_steps=5",
        "train.checkpoint_every_steps=40", "optim.lr=1e-3", "data.eval_max_samples=64",
    ])
    summary = train(cfg, run_dir=str(tmp_path / "wt"), interactive=False)
    assert summary["status"] == "completed"
    plan = json.loads((tmp_path / "wt" / "plan.json").read_text())
    vocab = plan["dataset"]["vocab_size"]
    assert 2000 < vocab <= 3000, "a WordPiece vocabulary of the requested size was trained on the corpus"
    recs = [r for r in read_jsonl(tmp_path / "wt" / "metrics.jsonl") if "loss" in r]
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
    assert summary["final_eval"]["eval_rows"] > 0


def test_wandb_offline_run_is_continued_on_resume_and_keep_last_rotates(tmp_path):
    base = ["launcher=local", "compute=cpu1", "engine=torch", "logger=wandb", "debug=smoke",
            "train.checkpoint_every_steps=5", "train.keep_last=2"]
    run_dir = tmp_path / "wb"

    def ckpts():
        return sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    s1 = train(compose(base + ["train.max_steps=10"]), run_dir=str(run_dir), interactive=False)
    assert ckpts() == ["step_00000005", "step_00000010"]
    s2 = train(compose(base + ["train.max_steps=20"]), run_dir=str(run_dir), interactive=False)
    assert ckpts() == ["step_00000015", "step_00000020"], "keep_last=2 rotates the older ones away"
    assert s1["wandb_run_id"] == s2["wandb_run_id"]
    assert s2["resumed_from"].endswith("step_00000010")
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{s1['wandb_run_id']}"))
    assert len(offline) == 2, "each start writes an offline segment of the same run id (wandb sync joins them)"
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [5, 10, 15, 20]
    card = (run_dir / "export" / "README.md").read_text()  # the model card: what, on what, how long, how to load
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: fill-mask\n") and "20 optimizer steps" in card
    assert f"| eval_mlm_acc | {s2['final_eval']['eval_mlm_acc']:.4f} |" in card and "AutoModelForMaskedLM" in card
    plan = json.loads((run_dir / "plan.json").read_text())
    artifact = f"{plan['config']['run_name']}-model".encode()
    logged = [p for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb") if artifact in p.read_bytes()]
    assert len(logged) == 2, "each start logs the export as a W&B model artifact"


def test_checkpoint_beyond_planned_steps_is_refused_before_launch(learned_run):
    from orchestrator.driver import make_plan
    from orchestrator.errors import ConfigError

    run_dir, _ = learned_run
    with pytest.raises(ConfigError) as ei:
        make_plan(compose([*LEARN, "train.max_steps=100"]), run_dir=str(run_dir), prepare=False)
    assert "train.max_steps" in str(ei.value) and "step 400" in str(ei.value)


def test_empty_held_out_split_is_reported_not_a_crash(tmp_path):
    """A repetitive corpus can leave no document in the held-out split: the job still trains and says so."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(["the cat sat on the mat . a dog ran ."] * 50) + "\n")
    summary = train(compose(["launcher=local", "compute=cpu1", "engine=torch", "data=text", f"data.paths=[{corpus}]",
                             "tokenizer.vocab_size=100", "train.max_steps=4", "train.global_batch_size=4",
                             "train.micro_batch_size_per_gpu=4", "task.max_seq_length=16"]),
                    run_dir=str(tmp_path / "r"), interactive=False)
    assert summary["status"] == "completed" and summary["final_eval"] == {"eval_rows": 0}
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert any("held-out split" in n for n in plan["notes"])
