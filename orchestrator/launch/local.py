"""Launch stage: one process, no Ray — the same worker code at world size 1 (DeepSpeed or plain torch)."""

from __future__ import annotations

from typing import Any

from orchestrator.plan.job_plan import JobPlan


def launch_local(plan: JobPlan, interactive: bool = True) -> dict[str, Any]:
    from orchestrator.worker.entry import local_run

    return local_run(plan.to_dict(), interactive)
