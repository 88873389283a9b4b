"""Plan stage: the files a job reads exist and hold what the job needs, checked when planning (plan_only too),
before any worker starts. No torch: planning stays light."""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import ConfigError, DataError


def resolve_init_dir(init_from: str) -> Path:
    """A run dir (its export/) or any Hugging Face BERT directory holding config.json and weights."""
    p = Path(init_from).expanduser()
    src = p / "export" if (p / "export" / "config.json").is_file() else p
    if not (src / "config.json").is_file():
        raise ConfigError("train.init_from", f"'{init_from}' holds no model (config.json) and no export/ dir")
    if not any((src / w).is_file() for w in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ConfigError("train.init_from", f"'{src}' has config.json but no weights (model.safetensors / pytorch_model.bin)")
    return src


def check_inputs(job) -> None:
    """The optional packages the job needs, then init_from and the fine-tuning files: present and readable (their
    contents are checked when prepared)."""
    from orchestrator.extras import check_extras

    check_extras(job)
    if job.train.init_from:
        resolve_init_dir(job.train.init_from)
    t = job.task
    if t.name in ("classify", "ner", "qa") and t.synthetic is None:
        for key in ("train_file", "eval_file"):
            path = Path(getattr(t, key)).expanduser()
            if t.name == "classify" and path.is_dir():  # a datasets.save_to_disk dir
                continue
            if not path.is_file():
                raise DataError(str(path), f"task.{key}: {'no such file' if not path.exists() else 'not a file'}")
