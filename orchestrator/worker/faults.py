"""Worker stage: deterministic fault injection for the fault-tolerance tests (never set it in real jobs).

It is off unless enabled on purpose: `BERT_ORCH_FAULT` is read only when `BERT_ORCH_FAULTS_ENABLED=1` is set
too (tests/conftest.py sets it; a stray spec in a user's shell is ignored with a warning). launch/ray_train.py
passes both to the Train workers of a run started in-process; Ray Job submissions never forward them.
`BERT_ORCH_FAULT` holds `;`-separated specs:

    kill_rank=R@step=N      after optimizer step N, rank R SIGKILLs itself (a dead worker / node)
    sigterm_rank=R@step=N   after step N, rank R sends itself SIGTERM (a preemption notice)
    nan_loss_at=A,B,...     the loss of steps A, B, ... becomes NaN (rank 0, first micro batch)
    nan_loss_sticky_at=...  as nan_loss_at, but again on every re-run of the step (bad data: rollbacks loop)
    spike_loss_at=A,B,...   the loss of steps A, B, ... is multiplied by 100 (rank 0, first micro batch; once)
    slow_step=S             sleep S seconds after every step (gives tests time to act mid-run)
    straggler_rank=R@seconds=S  rank R sleeps S seconds in every forward (a slow rank the others wait for)

kill/sigterm/nan_loss_at/spike_loss_at fire once per run dir: a marker `.faults/<spec>` (holding the time it fired) is written
first, so the restarted attempt, or the steps redone after a rollback, run clean.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "BERT_ORCH_FAULT"
ENABLE_ENV = "BERT_ORCH_FAULTS_ENABLED"


class Faults:
    def __init__(self, spec: str, run_dir: Path, rank: int):
        self.run_dir, self.rank = Path(run_dir), rank
        self.kills: dict[int, tuple[int, int]] = {}  # step -> (rank, signal)
        self.nan_once: set[int] = set()
        self.nan_sticky: set[int] = set()
        self.spike_once: set[int] = set()
        self.slow = 0.0
        self.straggle = 0.0
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            key, _, val = part.partition("=")
            if key in ("kill_rank", "sigterm_rank"):
                r, _, s = val.partition("@step=")
                self.kills[int(s)] = (int(r), signal.SIGKILL if key == "kill_rank" else signal.SIGTERM)
            elif key == "nan_loss_at":
                self.nan_once |= {int(x) for x in val.split(",") if x}
            elif key == "nan_loss_sticky_at":
                self.nan_sticky |= {int(x) for x in val.split(",") if x}
            elif key == "spike_loss_at":
                self.spike_once |= {int(x) for x in val.split(",") if x}
            elif key == "slow_step":
                self.slow = float(val)
            elif key == "straggler_rank":
                r, _, secs = val.partition("@seconds=")
                self.straggle = float(secs) if int(r) == rank else 0.0
            else:
                raise ValueError(f"{ENV}: unknown fault '{part}'")

    @staticmethod
    def from_env(run_dir: Path, rank: int) -> "Faults":
        spec = os.environ.get(ENV, "")
        if spec and os.environ.get(ENABLE_ENV) != "1":
            if rank == 0:
                import logging

                logging.getLogger("orchestrator.worker").warning(
                    "%s is set but fault injection is not enabled (%s=1, tests only): ignored", ENV, ENABLE_ENV)
            spec = ""
        elif spec and rank == 0:
            import logging

            logging.getLogger("orchestrator.worker").warning("fault injection enabled: %s=%s", ENV, spec)
        return Faults(spec, run_dir, rank)

    def _fire_once(self, name: str, step: int) -> bool:
        marker = self.run_dir / ".faults" / name
        if marker.exists():
            return False
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps({"time": time.time(), "rank": self.rank, "step": step}))
        return True

    def loss_factor(self, step: int, micro: int) -> float:
        """What the loss of step `step` (1-based) is multiplied by here: NaN, 100 (a spike) or 1."""
        if self.rank != 0 or micro != 0:
            return 1.0
        if step in self.nan_sticky or (step in self.nan_once and self._fire_once(f"nan_loss_at={step}", step)):
            return float("nan")
        if step in self.spike_once and self._fire_once(f"spike_loss_at={step}", step):
            return 100.0
        return 1.0

    def in_forward(self) -> None:
        if self.straggle:
            time.sleep(self.straggle)

    def after_step(self, step: int) -> None:
        if self.slow:
            time.sleep(self.slow)
        if step in self.kills:
            rank, sig = self.kills[step]
            name = "kill_rank" if sig == signal.SIGKILL else "sigterm_rank"
            if rank == self.rank and self._fire_once(f"{name}={rank}@step={step}", step):
                os.kill(os.getpid(), sig)
