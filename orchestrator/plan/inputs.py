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


def resolve_init_dir(init_from: str, key: str = "train.init_from") -> Path:
    """A run dir (its export/) or any Hugging Face BERT directory holding config.json and weights (a Hub id has
    been replaced by its local snapshot by then: resolve_hub_ids)."""
    p = Path(init_from).expanduser()
    src = p / "export" if (p / "export" / "config.json").is_file() else p
    if not (src / "config.json").is_file():
        raise ConfigError(key, f"'{init_from}' holds no model (config.json) and no export/ dir")
    if not any((src / w).is_file() for w in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ConfigError(key, f"'{src}' has config.json but no weights (model.safetensors / pytorch_model.bin)")
    return src


def apply_distill_teacher(job) -> None:
    """task.distill_from: the student takes the teacher's family and shape, with task.distill_layers (null = half)
    layers, and reads the teacher's tokenizer; a tokenizer given with another vocabulary is refused."""
    import json

    from orchestrator.data.tokenizer import load_tokenizer_dir
    from orchestrator.model.families import shape_from_config

    t = job.task
    src = resolve_init_dir(t.distill_from, "task.distill_from")
    cfg = json.loads((src / "config.json").read_text())
    arch = (cfg.get("architectures") or [""])[0]
    if arch and not (arch.endswith("ForMaskedLM") or arch in ("BertForPreTraining", "AlbertForPreTraining")):
        raise ConfigError("task.distill_from", f"'{src}' is a {arch}, without a masked-LM head to give soft targets"
                                               " (a pretraining run's export, or a ...ForMaskedLM dir)")
    layers = t.distill_layers or max(1, cfg["num_hidden_layers"] // 2)
    if layers >= cfg["num_hidden_layers"]:
        raise ConfigError("task.distill_layers", f"{layers} is not fewer than the teacher's {cfg['num_hidden_layers']}")
    shape_from_config(job.model, cfg, str(src), "task.distill_from")
    job.model.name, job.model.num_hidden_layers = f"student of {src}", layers
    teacher_tok = str(src)
    if job.tokenizer.source == "train":
        job.tokenizer.source, job.tokenizer.path = "dir", teacher_tok
        load_tokenizer_dir(teacher_tok)  # the teacher's export holds its tokenizer; refused in one line if not
        return
    mine = load_tokenizer_dir(job.tokenizer.path).get_vocab()
    try:
        from orchestrator.data.tokenizer import open_tokenizer

        theirs = open_tokenizer(src).get_vocab()
    except Exception:  # a model dir without tokenizer files: its vocabulary size is what can be checked
        theirs = None
    if (theirs is not None and mine != theirs) or (theirs is None and len(mine) != cfg["vocab_size"]):
        n = len(theirs) if theirs is not None else cfg["vocab_size"]
        raise ConfigError("tokenizer.path", f"'{job.tokenizer.path}' ({len(mine)} tokens) is not the vocabulary of the"
                                            f" teacher task.distill_from '{src}' ({n} tokens): the student learns the"
                                            " teacher's distribution over its tokens, so it must read the same ones")


def _check_init_family(src: Path, family: str) -> None:
    import json

    from orchestrator.model.families import BY_MODEL_TYPE

    try:
        model_type = json.loads((src / "config.json").read_text()).get("model_type", "bert")  # old BERT dirs lack it
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
    if job.task.distill_from:
        apply_distill_teacher(job)
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
