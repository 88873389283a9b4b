"""Config stage: the schema of the corpus preparation job (conf/prepare.yaml); unknown keys and wrong types refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

FORMATS = ("auto", "text", "jsonl", "parquet")
ON_BAD = ("skip", "error")
PREPARE_LAUNCHERS = ("local", "ray")


@dataclass
class PrepareTokenizerConfig:
    source: str = "train"
    """train (WordPiece on a sample of the filtered corpus) | dir (reuse the vocabulary in path)."""
    path: Optional[str] = None
    """For source=dir: a directory holding tokenizer.json and/or vocab.txt."""
    vocab_size: int = 30522
    """Vocabulary size to train."""
    min_frequency: int = 2
    """Minimum pair frequency for a WordPiece merge."""
    lowercase: bool = True
    """Lowercase and strip accents (uncased BERT)."""
    sample_documents: int = 50000
    """Documents the vocabulary is trained on: the first ones of every input block, spread over the corpus."""


@dataclass
class PrepareLauncherConfig:
    name: str = "ray"
    """local (one process, blocks in order) | ray (Ray Data actor pool on the cluster's CPUs)."""
    address: Optional[str] = None
    """Ray cluster to join; null = RAY_ADDRESS if set, else start a local Ray instance."""
    max_failures: int = 2
    """Shared with training's launcher group; Ray Data restarts failed block actors and retries their blocks itself."""
    num_cpus: Optional[int] = None
    """CPUs of a locally started Ray instance (null = num_workers)."""
    object_store_memory_mb: int = 256
    """Object store of a locally started Ray (only stats and block descriptors travel through it)."""


@dataclass
class PrepareConfig:
    sources: List[str] = field(default_factory=list)
    """Files, directories, globs or URLs (s3://, gs://, hdfs://, file://; fsspec for others) of raw corpora."""
    format: str = "auto"
    """auto (by extension: .jsonl/.json -> jsonl, .parquet -> parquet, else text) | text | jsonl | parquet."""
    text_field: str = "text"
    """jsonl / parquet: the field holding a document's text."""
    min_chars: int = 20
    """Documents shorter than this (after normalisation) are dropped."""
    dedup: bool = True
    """Drop exact duplicate documents (64-bit hash of the normalised text), keeping the first in corpus order."""
    on_invalid_utf8: str = "error"
    """error (refuse, naming file, line and byte offset) | skip (drop the line, count it, list the first ones)."""
    on_bad_record: str = "error"
    """jsonl lines that are not JSON objects or lack text_field: error | skip."""
    max_document_chars: int = 1000000
    """A longer document is cut into pieces of this size (keeps a worker's memory bounded)."""
    tokenizer: PrepareTokenizerConfig = field(default_factory=PrepareTokenizerConfig)
    """The WordPiece vocabulary: trained on a sample or reused."""
    output_dir: str = "???"
    """Where the prepared dataset goes: manifest.json, tokenizer/, train/ and eval/ shards, work/ (resume state)."""
    shard_bytes: int = 32 * 2**20
    """Input bytes per block; each block becomes one shard per split (~shard_bytes/4 tokens for English)."""
    max_seq_length: int = 128
    """Tokens per training row including [CLS]/[SEP]; training refuses a different task.max_seq_length."""
    nsp: bool = False
    """Build NSP pairs (A/B, random next from the same shard) instead of document-sentence samples."""
    short_seq_prob: float = 0.1
    """Probability of a shorter target length when building samples (BERT's create_pretraining_data)."""
    packing: bool = True
    """Pack several short samples into one row (training refuses a different task.packing)."""
    seed: int = 42
    """Seed of sample building (short targets, NSP partners) and of nothing else: shards are deterministic."""
    eval_fraction: float = 0.05
    """Fraction of documents held out for evaluation (by a hash of the document, as data.eval_fraction)."""
    shuffle_window_shards: int = 4
    """Training order: shards are shuffled per epoch, then rows shuffled within windows of this many shards."""
    launcher: PrepareLauncherConfig = field(default_factory=PrepareLauncherConfig)
    """Where the blocks are processed."""
    num_workers: int = 2
    """Parallel block workers (Ray Data actors, one CPU each); local runs them one after another."""
    verify_existing: bool = True
    """On a re-run, check the checksum of every finished shard before skipping its block."""
    dedup_partition_docs: int = 4000000
    """Hashes held in memory at once by the dedup pass (the pass runs once per partition of the hash space)."""
    keep_normalised_text: bool = True
    """Pass 1 keeps each block's normalised text under output_dir/work/ for pass 2, which then reads no source
    again (faster); a block's copy is deleted once its shards are written. Until then it takes up to the corpus's
    normalised text on disk (several times the size of compressed Parquet sources): false makes pass 2 read and
    normalise the sources again instead. Same shards either way."""


def to_prepare_config(cfg: Any) -> PrepareConfig:
    """Validate a composed DictConfig (or dict) against PrepareConfig; raises ConfigError naming the dotted key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.errors import ConfigError

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PrepareConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(key, str(e).splitlines()[0]) from None
    assert isinstance(obj, PrepareConfig)
    validate_prepare_config(obj)
    return obj


def validate_prepare_config(c: PrepareConfig) -> None:
    """Semantic checks; every error names its key."""
    from orchestrator.errors import ConfigError

    def choice(key: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(key, f"'{value}' is not one of {', '.join(options)}")

    choice("format", c.format, FORMATS)
    choice("on_invalid_utf8", c.on_invalid_utf8, ON_BAD)
    choice("on_bad_record", c.on_bad_record, ON_BAD)
    choice("tokenizer.source", c.tokenizer.source, ("train", "dir"))
    choice("launcher.name", c.launcher.name, PREPARE_LAUNCHERS)
    if not c.sources:
        raise ConfigError("sources", "give at least one file, directory, glob or URL")
    if not c.output_dir or c.output_dir == "???":
        raise ConfigError("output_dir", "set where the prepared dataset goes")
    if c.tokenizer.source == "dir" and not c.tokenizer.path:
        raise ConfigError("tokenizer.path", "tokenizer.source=dir needs a directory")
    if c.tokenizer.source == "train" and c.tokenizer.vocab_size < 64:
        raise ConfigError("tokenizer.vocab_size", f"must be >= 64, got {c.tokenizer.vocab_size}")
    if c.tokenizer.sample_documents < 1:
        raise ConfigError("tokenizer.sample_documents", f"must be >= 1, got {c.tokenizer.sample_documents}")
    if c.min_chars < 0:
        raise ConfigError("min_chars", f"must be >= 0, got {c.min_chars}")
    if c.max_document_chars < 1000:
        raise ConfigError("max_document_chars", f"must be >= 1000, got {c.max_document_chars}")
    if c.shard_bytes < 4096:
        raise ConfigError("shard_bytes", f"must be >= 4096, got {c.shard_bytes}")
    if c.max_seq_length < 8:
        raise ConfigError("max_seq_length", f"{c.max_seq_length} is too short for [CLS] A [SEP] B [SEP] samples")
    if not 0.0 <= c.short_seq_prob < 1.0:
        raise ConfigError("short_seq_prob", f"must lie in [0, 1), got {c.short_seq_prob}")
    if not 0.0 <= c.eval_fraction < 1.0:
        raise ConfigError("eval_fraction", f"must lie in [0, 1), got {c.eval_fraction}")
    if c.num_workers < 1:
        raise ConfigError("num_workers", f"must be >= 1, got {c.num_workers}")
    if c.shuffle_window_shards < 1:
        raise ConfigError("shuffle_window_shards", f"must be >= 1, got {c.shuffle_window_shards}")
    if c.dedup_partition_docs < 1000:
        raise ConfigError("dedup_partition_docs", f"must be >= 1000, got {c.dedup_partition_docs}")
