"""Serving stage: what a finished run dir holds for export — its task (summary.json's "task", else plan.json's
config.task.name, else the export's own files), the torch module that is exported (the task's outputs; for embed
the pooled sentence embedding), and the held-out rows it is measured on (data/features.json "eval", or rows given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from orchestrator.errors import DataError

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TASKS = ("classify", "ner", "qa", "embed", "rerank")
# task -> (architecture in export/config.json, transformers Auto class, output names of the ONNX graph)
HEADS = {
    "classify": ("BertForSequenceClassification", "AutoModelForSequenceClassification", ("logits",)),
    "rerank": ("BertForSequenceClassification", "AutoModelForSequenceClassification", ("logits",)),
    "ner": ("BertForTokenClassification", "AutoModelForTokenClassification", ("logits",)),
    "qa": ("BertForQuestionAnswering", "AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
    "embed": ("BertModel", "AutoModel", ("sentence_embedding",)),
}
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "lasttoken")
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                   "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_lasttoken": "lasttoken",
                   "pooling_mode_weightedmean_tokens": "weightedmean"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(str(path), f"cannot read: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")


def export_dir_of(run_dir: str | Path) -> Path:
    """RUN_DIR/export of a finished run (summary.json status completed), or one line saying what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(str(run_dir), "is not a directory (give a finished run dir)")
    summary = read_json(run / "summary.json") if (run / "summary.json").is_file() else None
    if isinstance(summary, dict) and summary.get("pipeline"):
        stages = ", ".join(str(run / s) for s in summary.get("stages") or {})
        raise DataError(str(run_dir), f"is a pipeline dir: export one of its stages' run dirs ({stages})")
    export = run / "export"
    if not (export / "config.json").is_file():
        raise DataError(str(export), "holds no config.json: not a finished run's export/ (a finished run writes one)")
    status = summary.get("status") if isinstance(summary, dict) else None
    if status != "completed":
        raise DataError(str(run / "summary.json"), f"is not a finished run's (status: {status or 'missing'})")
    return export


def _num_labels(cfg: dict) -> int:
    return int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)


def infer_task(export: Path) -> str:
    """The task from the export's files: a sentence-transformers dir is embed; a one-score classifier is rerank."""
    if (export / "modules.json").is_file():
        return "embed"
    cfg = read_json(export / "config.json")
    arch = (cfg.get("architectures") or [""])[0]
    if arch == "BertForSequenceClassification":
        return "rerank" if _num_labels(cfg) == 1 else "classify"
    task = next((t for t, (a, _, _) in HEADS.items() if a == arch), None)
    if task is None:
        raise DataError(str(export / "config.json"), f"architecture {arch or 'missing'!r} has no ONNX export here"
                                                     f" (known: {', '.join(sorted({h[0] for h in HEADS.values()}))})")
    return task


def run_task(run_dir: Path, export: Path, override: Optional[str] = None) -> str:
    """--task, else the task the run recorded (summary.json, plan.json), else what the export's files say."""
    if override:
        if override not in TASKS:
            raise DataError(str(run_dir), f"--task {override!r} is not one of {', '.join(TASKS)}")
        task = override
    else:
        summary = read_json(run_dir / "summary.json")
        plan = read_json(run_dir / "plan.json") if (run_dir / "plan.json").is_file() else {}
        recorded = summary.get("task") or (((plan.get("config") or {}).get("task") or {}).get("name"))
        task = recorded if recorded in TASKS else infer_task(export)
    cfg = read_json(export / "config.json")
    if cfg.get("model_type", "bert") != "bert":
        raise DataError(str(export / "config.json"), f"is a {cfg['model_type']} model: the ONNX export covers the bert"
                                                     " family (the others export as Hugging Face dirs only)")
    arch = (cfg.get("architectures") or [""])[0]
    if task != "embed" and arch != HEADS[task][0]:
        raise DataError(str(export / "config.json"), f"task {task} needs a {HEADS[task][0]}, the export is a {arch!r}")
    if task == "embed" and not (export / "modules.json").is_file():
        raise DataError(str(export), "task embed needs a sentence-transformers dir (modules.json, 1_Pooling/)")
    return task


def pooling_of(export: Path) -> tuple[tuple[str, ...], bool]:
    """(pooling modes, normalize) of a sentence-transformers dir, from modules.json and its Pooling config."""
    modules = read_json(export / "modules.json")
    pool = next((m for m in modules if m.get("type", "").lower().endswith("pooling")), None)
    if pool is None:
        raise DataError(str(export / "modules.json"), "has no Pooling module")
    cfg = read_json(export / pool.get("path", "1_Pooling") / "config.json")
    mode = cfg.get("pooling_mode") or [v for k, v in _LEGACY_POOLING.items() if cfg.get(k)]
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if not modes or bad:
        raise DataError(str(export / pool.get("path", "1_Pooling") / "config.json"),
                        f"pooling {bad or 'none'} has no ONNX export here (known: {', '.join(POOLING_MODES)})")
    normalize = any(m.get("type", "").lower().endswith("normalize") for m in modules)
    return modes, normalize


def _check_row(row: Any, i: int, where: str, max_len: int) -> dict[str, Any]:
    if not isinstance(row, dict) or not row.get("input_ids"):
        raise DataError(where, f"eval row {i} has no input_ids")
    n = len(row["input_ids"])
    if n > max_len:
        raise DataError(where, f"eval row {i} has {n} tokens, more than the model's {max_len} positions")
    out = dict(row)
    out.setdefault("attention_mask", [1] * n)
    out.setdefault("token_type_ids", [0] * n)
    if any(len(out[k]) != n for k in INPUTS):
        raise DataError(where, f"eval row {i}: input_ids, attention_mask and token_type_ids differ in length")
    return out


def eval_rows(run_dir: Path, max_len: int, rows: Optional[Sequence[dict]] = None) -> tuple[list[dict], dict, str]:
    """(rows, eval_extra, where they came from): the rows given, else data/features.json's "eval" rows."""
    path = run_dir / "data" / "features.json"
    extra: dict[str, Any] = {}
    where = "rows given"
    if rows is None:
        if not path.is_file():
            raise DataError(str(path), "is missing: no eval rows to measure on (pass rows, or --eval-rows FILE)")
        from orchestrator.data.finetune_prep import load_features

        feats = load_features(str(path.parent))
        rows, extra, where = feats.get("eval") or [], feats.get("eval_extra") or {}, str(path)
        if not rows or not isinstance(rows[0], dict) or "input_ids" not in rows[0]:
            raise DataError(str(path), "has no 'eval' rows with input_ids (pass rows, or --eval-rows FILE)")
    checked = [_check_row(r, i, where, max_len) for i, r in enumerate(rows)]
    if not checked:
        raise DataError(where, "no eval rows")
    return checked, extra, where


def read_rows_file(path: str) -> list[dict]:
    """--eval-rows: a JSON list of rows or JSON Lines, each {input_ids, [attention_mask, token_type_ids, labels,
    group]}."""
    p = Path(path)
    try:
        text = p.read_text()
        stripped = text.lstrip()
        if stripped.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read eval rows: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
