"""CLI stage: the corpus preparation job — compose conf/prepare.yaml -> validate -> prepare_corpus -> stats.

    python -m orchestrator.prepare 'sources=[corpus/*.jsonl]' output_dir=data/wiki launcher=ray num_workers=8
    ray job submit --address http://head:8265 -- python -m orchestrator.prepare ...   (joins the job's cluster)

Re-running the same command resumes a killed preparation; train with data=prepared data.prepared_dir=<output_dir>.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from orchestrator.driver import CONF_DIR
from orchestrator.errors import OrchestratorError


def run_prepare(cfg: Any, echo=print) -> dict:
    """Compose-free entry (tests and benches call this): validate the config, prepare or resume, return stats."""
    from orchestrator.config.prepare_schema import PrepareConfig, to_prepare_config
    from orchestrator.data.prepare_job import prepare_corpus

    pcfg = cfg if isinstance(cfg, PrepareConfig) else to_prepare_config(cfg)
    return prepare_corpus(pcfg, echo=echo)


def hydra_entry(cfg) -> Any:
    try:
        return run_prepare(cfg)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def prepare_help() -> str:
    from orchestrator.config.keyhelp import key_lines
    from orchestrator.config.prepare_schema import PrepareConfig

    return "\n".join([
        "bert-orch-prepare: raw corpora -> normalised, filtered, deduplicated documents -> WordPiece -> token shards",
        "with a manifest (a Ray Data job, or one process with launcher=local). The same command again resumes.",
        "",
        "usage: bert-orch-prepare 'sources=[corpus/*.txt]' output_dir=data/wiki [key=value ...]",
        "       (python -m orchestrator.prepare ... is the same)",
        "",
        "keys (default, then meaning):",
        *key_lines(PrepareConfig),
        "",
        "launcher: ray (default) | local; launcher.address=... joins a running cluster.",
    ])


def main() -> None:
    import hydra

    from orchestrator.cli import check_dir_args

    if any(a in ("-h", "--help") for a in sys.argv[1:]):  # its own keys, not the training groups Hydra would list
        print(prepare_help())
        return
    check_dir_args(sys.argv[1:], dir_keys=("output_dir", "hydra.run.dir"))  # Hydra makes its log dir there first
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")(hydra_entry)
    app()


if __name__ == "__main__":
    main()
