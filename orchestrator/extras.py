"""Optional parts of the install: what each extra brings, and one line naming the extra when a job needs a part
that is not installed (checked while planning, before any data work or worker).

    tracking   wandb     logger=wandb
    sweeps     optuna    hydra/sweeper=optuna_search
    ner        seqeval   task=ner (entity-level precision / recall / F1)
    retrieval  bm25s, sentence-transformers   task=embed | rerank (BM25 baseline and negatives; the export)
    serve      onnx, onnxruntime, onnxscript  bert-orch export (ONNX fp32 + dynamic int8, parity and speed)

`pip install -e '.[dev]'` (README command 2) installs every one.
"""

from __future__ import annotations

import importlib.util

from orchestrator.errors import ConfigError


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (tests), or without a spec
        return False


def require(module: str, extra: str, key: str, what: str) -> None:
    if not installed(module):
        raise ConfigError(key, f"{what} needs {module}, which is in the '{extra}' extra: "
                               f"pip install 'bert-orchestrator[{extra}]' (or pip install {module})")


def check_extras(job) -> None:
    if job.logger.name == "wandb":
        require("wandb", "tracking", "logger", "logger=wandb")
    if job.task.name == "ner":
        require("seqeval", "ner", "task", "task=ner")
    if job.task.name in ("embed", "rerank"):
        require("bm25s", "retrieval", "task", f"task={job.task.name} (the BM25 baseline and hard negatives)")
    if job.task.name == "embed":
        require("sentence_transformers", "retrieval", "task", "task=embed (its export is a sentence-transformers dir)")
