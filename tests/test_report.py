"""`bert-orch report`: PNG plots and one HTML page for a run, a pipeline and a sweep (the pages of real runs and
sweeps are opened in test_ray_train.py and test_sweep.py too)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, assert_page_links_valid_pngs
from orchestrator.launch.sweep_summary import MemberResult, write_summary
from orchestrator.report import write_report


def _run_dir(root: Path, name: str, eval_key: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    lines = [{"step": s, "loss": 5.0 / s, "mlm_acc": 0.1 * s, "lr": 1e-3, "tokens_per_s": 1000.0 + s,
              "time_data_ms": 0.1, "time_forward_ms": 30.0 + s, "time_sync_ms": 2.0, "time_backward_ms": 60.0,
              "time_step_ms": 5.0} for s in range(1, 7)]
    lines += [{"step": 3, eval_key: 0.3, "eval_loss": 2.0}, {"step": 6, eval_key: 0.6, "eval_loss": 1.0}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')  # cut line
    (d / "summary.json").write_text(json.dumps({"status": "completed", "steps": 6, "final_eval": {eval_key: 0.6}}))
    (d / "plan.json").write_text(json.dumps({"config": {"model": {"name": "tiny", "num_hidden_layers": 2,
                                             "hidden_size": 128}, "task": {"name": "pretrain"}, "launcher": {"name": "local"}},
                                             "world_size": 1, "global_batch_size": 8, "total_steps": 6}))
    return d


def test_a_run_report_plots_loss_accuracy_evaluation_lr_throughput_and_step_time(tmp_path):
    page = write_report(_run_dir(tmp_path, "run", "eval_mlm_acc"))
    links = assert_page_links_valid_pngs(page)
    assert {"loss.png", "train_accuracy.png", "eval.png", "eval_loss.png", "lr.png", "throughput.png",
            "step_time.png"} == set(links)
    assert "mlm_acc" in page.read_text() and "tiny (2 layers x 128 hidden)" in page.read_text()


def test_a_pipeline_report_has_each_stage_and_the_comparison(tmp_path):
    root = tmp_path / "pipe"
    for name in ("pretrain", "finetune", "finetune_random_init"):
        _run_dir(root, name, "eval_accuracy")
    (root / "summary.json").write_text(json.dumps({"pipeline": True, "compare": {
        "finetune": {"eval_accuracy": 0.87}, "finetune_random_init": {"eval_accuracy": 0.29}}}))
    page = write_report(root)
    links = assert_page_links_valid_pngs(page)
    assert {"pretrain_loss.png", "finetune_loss.png", "finetune_random_init_loss.png"} <= set(links)
    assert re.search(r"<th>finetune</th><td>0\.87</td>.*<th>finetune_random_init</th><td>0\.29</td>", page.read_text())


def test_a_sweep_report_plots_the_metric_against_each_swept_parameter(tmp_path):
    rows = [MemberResult(i, ["debug=smoke", f"optim.lr={lr}", f"engine.zero_stage={z}"], str(tmp_path / str(i)),
                         status="succeeded", metric=m)
            for i, (lr, z, m) in enumerate([(1e-4, 1, 0.2), (1e-3, 1, 0.4), (1e-4, 2, 0.25), (1e-3, 2, 0.45)])]
    rows.append(MemberResult(4, ["debug=smoke", "optim.lr=1e-3", "engine.zero_stage=4"], str(tmp_path / "4"),
                             status="failed", error="config key 'engine.zero_stage': 4 is not one of 0, 1, 2, 3"))
    write_summary(tmp_path, rows, "final_eval.eval_mlm_acc")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    page = tmp_path / "report" / "index.html"
    assert out.stdout.strip() == f"report: {page}"
    links = assert_page_links_valid_pngs(page)
    assert set(links) == {"sweep_optim.lr.png", "sweep_engine.zero_stage.png"}, "debug=smoke is not swept"
    assert "is not one of 0, 1, 2, 3" in page.read_text()


def test_report_of_a_dir_without_results_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(tmp_path) in out.stderr, out.stderr
    assert not any(tmp_path.iterdir()), "nothing written"
