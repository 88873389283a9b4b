"""Plan stage: the files a job reads exist and hold what the job needs, checked when planning (plan_only too),
before any worker starts. No torch: planning stays light."""

from __future__ import annotations

import os
import re
from pathlib import Path

from orchestrator.config.schema import FINETUNE_TASKS, RETRIEVAL_TASKS
from orchestrator.errors import ConfigError, DataError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HUB_FILES = {  # what each use of a Hub repo downloads (never the other frameworks' weights)
    "train.init_from": ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin",
                        "tokenizer*", "vocab.txt", "special_tokens_map.json", "merges.txt", "*.model"],
    "tokenizer.path": ["tokenizer*", "vocab.txt", "special_tokens_map.json", "merges.txt", "*.model", "config.json"],
}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (read now, not at its import: tests and users set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_snapshot(value: str, key: str) -> Path:
    """`value` is not a local path: as a Hugging Face Hub id (`org/name`), its files in the local Hub cache
    (downloaded once; offline when HF_HUB_OFFLINE is set). The plan carries the local path, so workers never
    reach for the Hub."""
    if not _HUB_ID.fullmatch(value):
        raise ConfigError(key, f"'{value}' is neither a local directory nor a Hugging Face Hub id (org/name)")
    if hub_offline():
        raise ConfigError(key, f"'{value}' is not a local directory, and as a Hugging Face Hub id it needs the"
                               " network: HF_HUB_OFFLINE is set (unset it, or give a local directory)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(value, allow_patterns=_HUB_FILES[key]))
    except Exception as exc:  # noqa: BLE001 - not found, gated, no network: one line naming the key
        raise ConfigError(key, f"cannot download '{value}' from the Hugging Face Hub: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def resolve_hub_ids(job) -> None:
    """init_from and tokenizer.path given as Hub ids become the local snapshot dirs (in the job, so in the plan)."""
    if job.train.init_from and not Path(job.train.init_from).expanduser().exists():
        job.train.init_from = str(hub_snapshot(job.train.init_from, "train.init_from"))
    if job.tokenizer.source == "dir" and job.tokenizer.path and not Path(job.tokenizer.path).expanduser().exists():
        job.tokenizer.path = str(hub_snapshot(job.tokenizer.path, "tokenizer.path"))


def resolve_init_dir(init_from: str) -> Path:
    """A run dir (its export/) or any Hugging Face BERT directory holding config.json and weights (a Hub id has
    been replaced by its local snapshot by then: resolve_hub_ids)."""
    p = Path(init_from).expanduser()
    src = p / "export" if (p / "export" / "config.json").is_file() else p
    if not (src / "config.json").is_file():
        raise ConfigError("train.init_from", f"'{init_from}' holds no model (config.json) and no export/ dir")
    if not any((src / w).is_file() for w in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ConfigError("train.init_from", f"'{src}' has config.json but no weights (model.safetensors / pytorch_model.bin)")
    return src


def _check_init_family(src: Path, family: str) -> None:
    import json

    from orchestrator.model.families import BY_MODEL_TYPE

    try:
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise DataError(str(src / "config.json"), f"cannot read: {type(exc).__name__}")
    fam = BY_MODEL_TYPE.get(model_type)
    if fam is None or fam.name != family:
        raise ConfigError("model.family", f"is {family} but train.init_from '{src}' holds a"
                                          f" {fam.name if fam else repr(model_type)} model")


def check_inputs(job) -> None:
    """The optional packages the job needs, then init_from and the fine-tuning files: present and readable (their
    contents are checked when prepared)."""
    from orchestrator.extras import check_extras

    check_extras(job)
    resolve_hub_ids(job)
    if job.train.init_from:
        src = resolve_init_dir(job.train.init_from)
        if job.task.name == "pretrain":  # fine-tuning takes the checkpoint's family and shape (driver)
            _check_init_family(src, job.model.family)
    t = job.task
    if t.name in FINETUNE_TASKS and t.synthetic is None:
        for key in ("train_file", "eval_file"):
            path = Path(getattr(t, key)).expanduser()
            if t.name in RETRIEVAL_TASKS and key == "eval_file":
                if not path.is_dir():
                    raise DataError(str(path), "task.eval_file: not a BEIR dir (corpus.jsonl, queries.jsonl,"
                                               " qrels/test.tsv)")
                continue
            if t.name == "classify" and path.is_dir():  # a datasets.save_to_disk dir
                continue
            if not path.is_file():
                raise DataError(str(path), f"task.{key}: {'no such file' if not path.exists() else 'not a file'}")
