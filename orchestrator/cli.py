"""CLI stage: the Hydra app — parse and compose, hand the config to the driver, print errors in one line."""

from __future__ import annotations

import os
import sys
from typing import Any

from orchestrator.driver import CONF_DIR, train
from orchestrator.errors import ConfigError, OrchestratorError


def hydra_entry(cfg) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        passed = list(hc.overrides.task)
        result = train(cfg, run_dir=run_dir, interactive=sys.stderr.isatty(), passed=passed)
        if hc.mode != RunMode.MULTIRUN and result.get("status") not in ("planned", None):
            from orchestrator.report import report_or_warn

            report_or_warn(result.get("run_dir") or run_dir)
        return result
    except OrchestratorError as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep reports the failed member and goes on
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def check_dir_args(argv: list[str], dir_keys: tuple[str, ...] = ("hydra.run.dir", "runs_root")) -> None:
    """Hydra creates the run dir before our code runs, so a run dir given on the command line that cannot be
    created is refused here with one line naming the key, not with Hydra's traceback."""
    from orchestrator.config.schema import check_run_name
    from orchestrator.plan.job_plan import check_run_dir

    if "-m" in argv or "--multirun" in argv:
        return  # members' dirs are made by the sweep launcher, under hydra.sweep.dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        key, eq, raw = arg.lstrip("+").partition("=")
        if not eq or key not in (*dir_keys, "run_name") or not raw or "${" in raw:
            continue
        try:
            value = parser.parse_override(arg).value()  # Hydra's own unquoting: '/a b/c' is /a b/c
        except Exception as exc:  # a malformed override: Hydra itself will name it
            print(f"error: cannot parse override '{arg}': {str(exc).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        if not isinstance(value, str):
            continue
        try:
            if key == "run_name":
                check_run_name(value)
            else:
                check_run_dir(value)
        except ConfigError as exc:
            print(f"error: {str(exc).replace('run_dir', key, 1)}", file=sys.stderr)
            sys.exit(2)


def app_help() -> str:
    """`bert-orch --help`: the groups and their options, then every key with its default and meaning."""
    from pathlib import Path

    from orchestrator.config.keyhelp import key_lines
    from orchestrator.config.schema import JobConfig

    groups = sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir())
    return "\n".join([
        "bert-orch: BERT pretraining and fine-tuning jobs from Hydra configs (DeepSpeed ZeRO workers on Ray, or one",
        "local process). python -m orchestrator is the same.",
        "",
        "usage: bert-orch [group=option ...] [key=value ...]      one job or pipeline (default: experiment=quickstart)",
        "       bert-orch -m key=a,b ...                            a sweep: every member a Ray Job",
        "       bert-orch report RUN_DIR | PIPELINE_DIR | SWEEP_DIR  plots and an HTML page",
        "       bert-orch push RUN_DIR REPO_ID [--private]          the export to the Hugging Face Hub",
        "       bert-orch export RUN_DIR [--no-int8] [--provider P]  ONNX fp32 + int8, parity and speed (serving.json)",
        "       bert-orch-submit, bert-orch-prepare, bert-orch-doctor (each has --help); --hydra-help: Hydra's flags",
        "",
        "groups (group=option):",
        *(f"  {g.name}: {', '.join(sorted(p.stem for p in g.glob('*.yaml')))}" for g in groups),
        "",
        "keys (the schema's default, which the groups above set for most keys; then what the key means):",
        *key_lines(JobConfig),
    ])


def main() -> None:
    import hydra

    from orchestrator.config.schema import register_resolvers

    if sys.argv[1:] in (["--help"], ["-h"]):
        print(app_help())
        return
    if sys.argv[1:2] == ["report"]:  # bert-orch report RUN_DIR | PIPELINE_DIR | SWEEP_DIR
        from orchestrator.report import main as report_main

        return report_main(sys.argv[2:])
    if sys.argv[1:2] == ["push"]:  # bert-orch push RUN_DIR REPO_ID [--private]
        from orchestrator.push import main as push_main

        return push_main(sys.argv[2:])
    if sys.argv[1:2] == ["export"]:  # bert-orch export RUN_DIR [--int8/--no-int8] [--batch 32] [--repeats N]
        from orchestrator.serve.onnx_export import main as export_main

        return export_main(sys.argv[2:])

    register_resolvers()  # the default run_name, which Hydra resolves for hydra.run.dir before our code runs
    check_dir_args(sys.argv[1:])
    # Hub ids in train.init_from / tokenizer.path are fetched while planning when online (offline when
    # HF_HUB_OFFLINE is set); workers are always offline (launch/ray_train.py), they read the plan's local paths
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(hydra_entry)
    app()


if __name__ == "__main__":
    main()
