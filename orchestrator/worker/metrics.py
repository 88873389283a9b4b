"""Worker stage: metrics sinks on rank 0 — metrics.jsonl, W&B (resumable run id), a progress bar."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from orchestrator.io import write_text_atomic

# The tasks' training accuracies, as their train_record()s name them (progress lines and reports show them)
TRAIN_ACCURACIES = ("mlm_acc", "nsp_acc", "sop_acc", "rtd_acc", "train_acc")


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the JSON lines whose step is <= max_step (atomic rewrite); lines cut by a crash are dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= max_step:
            kept.append(line)
    write_text_atomic(path, "".join(k + "\n" for k in kept))


class MetricsJsonl:
    """Append-only JSON lines; on resume, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        truncate_jsonl(path, resume_step)
        self.fh = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self.fh.close()


class WandbSink:
    """One W&B run per job, from rank 0; its id lives in the run dir so a resumed job continues it."""

    def __init__(self, run_dir: Path, logger_cfg, plan_dict: dict[str, Any], run_name: str):
        import wandb

        id_file = run_dir / "wandb_run_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
        kwargs: dict[str, Any] = dict(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=logger_cfg.group,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=plan_dict,
            tags=list(logger_cfg.tags) or None,
        )
        mode = logger_cfg.mode or os.environ.get("WANDB_MODE")
        if mode:
            kwargs["mode"] = mode
        self.run = wandb.init(**kwargs)
        self.run_id = run_id

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v

    def log_model(self, export_dir: Path, task: str) -> None:
        """The export (weights, tokenizer, model card) as a W&B model artifact of this run."""
        import wandb

        art = wandb.Artifact(f"{self.run.name or self.run_id}-model".replace("/", "_"), type="model",
                             metadata={"task": task}, description=f"bert-orchestrator export ({task})")
        art.add_dir(str(export_dir))
        self.run.log_artifact(art, aliases=["latest"])

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class TensorBoardSink:
    """Every metrics record as TensorBoard scalars (train/<key>, eval/<key>) under <run dir>/tensorboard, written
    with tensorboardX (Ray's own dependency; `tensorboard --logdir runs/` reads it). A run resumed or rolled back to
    step N starts with a purge at N + 1, so TensorBoard drops the events of the steps it redoes (as metrics.jsonl
    drops their lines)."""

    def __init__(self, run_dir: Path, start_step: int):
        from tensorboardX import SummaryWriter

        # one event file per start (its name holds the start step: files opened in the same second do not collide)
        self.writer = SummaryWriter(logdir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None,
                                    filename_suffix=f".from_step_{start_step}")

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        for k, v in record.items():
            if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                continue
            self.writer.add_scalar(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(record: dict[str, Any], total: int, initial: int, elapsed: float) -> str:
    """One line per log step: step/total, loss, the task's accuracy, lr, tokens/s, elapsed and ETA (from this
    start's pace: steps done since the resume point over the time they took)."""
    step = record["step"]
    done = step - initial
    eta = elapsed / done * (total - step) if done > 0 else float("nan")
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    parts += [f"{k} {record[k]:.3f}" for k in TRAIN_ACCURACIES if record.get(k) is not None]
    parts += [f"lr {record['lr']:.2e}", f"{record.get('tokens_per_s', 0):,.0f} tok/s", f"elapsed {_clock(elapsed)}",
              f"eta {_clock(eta) if eta == eta else '?'}"]
    return "  ".join(parts)


class Progress:
    """Rank 0's view of a run: a tqdm bar on a terminal; elsewhere (Ray job logs, files, CI) one line per log
    step with step/total, loss, accuracy, lr, tokens/s, elapsed and ETA. Other ranks print nothing."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool = False, label: str = ""):
        self.total, self.initial, self.enabled, self.label = total, initial, enabled, label
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{record['loss']:.3f}" if record.get("loss") is not None else "-"},
                                 refresh=False)
        elif self.enabled:
            line = progress_line(record, self.total, self.initial, time.perf_counter() - self.t0)
            # not print(): Ray Train patches it to also log each line, which prints it twice
            sys.stdout.write(f"{self.label}{line}\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
