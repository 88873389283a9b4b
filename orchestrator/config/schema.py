"""Config stage: one dataclass per conf/ group; composing YAML onto these refuses unknown keys and wrong types.

Every field's own constraint (choices, range) is declared beside it with `rule(...)`; what involves several
fields is the group's `check(job)`. `check_job` walks both, and refuses NaN and infinity in any float, so the
plan never sees a value no field admits. Each refusal names the dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, List, Optional, Union

from orchestrator.errors import ConfigError

TASKS = ("pretrain", "classify", "ner", "qa", "embed", "rerank")
FINETUNE_TASKS = ("classify", "ner", "qa", "embed", "rerank")
RETRIEVAL_TASKS = ("embed", "rerank")
SYNTHETIC_TASKS = {"category": ("classify",), "sentiment": ("classify",), "pair": ("classify",), "ner": ("ner",),
                   "squad": ("qa",), "squad_v2": ("qa",), "retrieval": RETRIEVAL_TASKS}
MASKING_UNITS = ("token", "whole_word", "span")
LAUNCHERS = ("local", "ray")
LOGGERS = ("none", "wandb")
OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("linear", "cosine", "constant")
ENGINES = ("deepspeed", "torch")
ATTENTION_KERNELS = ("auto", "default", "flash", "efficient", "math", "cudnn", "manual")
PLACEMENTS = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
GPU_NUMA_MODES = ("none", "node", "socket", "exclusive", "core-complex")  # worker/affinity.py

Choices = Union[tuple, Callable[[], tuple]]


def rule(default: Any, *, choices: Optional[Choices] = None, ge: Optional[float] = None, gt: Optional[float] = None,
         le: Optional[float] = None, lt: Optional[float] = None, why: str = "") -> Any:
    """A field's default and what values it admits (null always passes: it means "derive" or "off")."""
    return field(default=default, metadata={"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "why": why})


def _families() -> tuple:
    from orchestrator.model.families import FAMILIES

    return FAMILIES


def _network_profiles() -> tuple:
    from orchestrator.cluster.network import NETWORK_PROFILES

    return NETWORK_PROFILES


def _check_value(key: str, value: Any, meta: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")
    choices = meta.get("choices")
    if choices is not None:
        options = choices() if callable(choices) else choices
        if value not in options:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, options))}")
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta["gt"]) if meta.get("gt") is not None else None
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta["lt"]) if meta.get("lt") is not None else None
    ok = ((lo is None or (value >= lo[1] if lo[0] == "[" else value > lo[1]))
          and (hi is None or (value <= hi[1] if hi[0] == "]" else value < hi[1])))
    if not ok:
        if lo and hi:
            want = f"must lie in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
        else:
            want = f"must be {'>=' if lo[0] == '[' else '>'} {lo[1]:g}" if lo else f"must be {'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
        raise ConfigError(key, f"{want}, got {value}" + (f" ({meta['why']})" if meta.get("why") else ""))


def check_run_name(name: str) -> None:
    """A run name is one path component: the run dir must stay inside runs_root."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError("run_name", f"{name!r} must be a single directory name inside runs_root (no '/', '..')")


def _walk(obj: Any, prefix: str = ""):
    """Yield ("value", key, value, metadata) for every leaf of a config dataclass (nested groups and stage lists
    included) and ("group", obj) for every group, itself last."""
    for f in fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if is_dataclass(value):
            yield from _walk(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    yield from _walk(item, f"{key}[{i}].")
                else:
                    yield "value", f"{key}[{i}]", item, {}
        else:
            yield "value", key, value, f.metadata
    yield "group", obj


def check_job(job: "JobConfig") -> None:
    """Every field's rule first (so no group check sees a value its field refuses), then every group's
    cross-field `check(job)`. Raises ConfigError naming the key."""
    groups = []
    for kind, *rest in _walk(job):
        if kind == "group":
            groups.append(rest[0])
        elif rest[1] is not None:
            _check_value(*rest)
    for g in groups:
        if hasattr(g, "check"):
            g.check(job)


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Preset name (tiny, mini, small, base, large); informational, the sizes below rule."""
    family: str = rule("bert", choices=_families)
    """Architecture, through its Hugging Face classes: bert | roberta | albert | deberta_v2 (DeBERTa-v3 shape) |
    modernbert | electra; the sizes below apply to any of them."""
    embedding_size: Optional[int] = rule(None, ge=1)
    """albert, electra: factorised embedding width (null = 128 for albert, hidden_size for electra)."""
    hidden_size: int = rule(128, ge=1)
    """Width of every transformer layer."""
    num_hidden_layers: int = rule(2, ge=1)
    """Number of transformer layers."""
    num_attention_heads: int = rule(2, ge=1)
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = rule(512, ge=1)
    """Width of the feed-forward block (4x hidden in the published BERT sizes)."""
    max_position_embeddings: int = rule(512, ge=1)
    """Learned absolute positions; the longest sequence the model accepts."""
    type_vocab_size: int = rule(2, ge=1)
    """Segment (token type) embeddings: 2 for sentence A/B."""
    hidden_dropout_prob: float = rule(0.1, ge=0.0, lt=1.0)
    """Dropout on hidden states (0 in the pretraining presets, as cramming measured)."""
    attention_probs_dropout_prob: float = rule(0.1, ge=0.0, lt=1.0)
    """Dropout on attention probabilities."""
    hidden_act: str = "gelu"
    """Activation of the feed-forward block."""
    layer_norm_eps: float = rule(1e-12, gt=0.0)
    """LayerNorm epsilon, as in the original BERT."""
    initializer_range: float = rule(0.02, gt=0.0)
    """Std of the truncated normal used to initialise weights."""

    def check(self, job: "JobConfig") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.num_attention_heads",
                              f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
        if self.embedding_size is not None and self.family not in ("albert", "electra"):
            raise ConfigError("model.embedding_size", f"only albert and electra factorise embeddings, not {self.family}")
        if job.task.sop and self.family != "albert":
            raise ConfigError("task.sop", f"sentence-order prediction is ALBERT's head (model.family=albert), not"
                                          f" {self.family}'s")
        if job.task.nsp and self.family != "bert":
            why = {"roberta": "RoBERTa dropped next-sentence prediction",
                   "albert": "ALBERT replaced it by sentence-order prediction"}.get(self.family, f"{self.family} has no"
                                                                                         " next-sentence head")
            raise ConfigError("task.nsp", f"next-sentence prediction is BERT's; {why} (model.family={self.family})")


@dataclass
class TaskConfig:
    name: str = rule("pretrain", choices=TASKS)
    """Task: pretrain (MLM, optional NSP) | classify | ner | qa | embed (bi-encoder) | rerank (cross-encoder)."""
    max_seq_length: int = rule(128, ge=8, why="too short for [CLS] A [SEP] B [SEP] samples")
    """Tokens per sample including [CLS]/[SEP]; at most model.max_position_embeddings."""
    mlm_probability: float = rule(0.15, gt=0.0, lt=1.0)
    """Fraction of tokens selected for prediction."""
    mask_replace_prob: float = rule(0.8, ge=0.0, le=1.0)
    """Of the selected tokens, fraction replaced by [MASK]."""
    random_replace_prob: float = rule(0.1, ge=0.0, le=1.0)
    """Of the selected tokens, fraction replaced by a random token (the rest stay unchanged)."""
    masking: str = rule("token", choices=MASKING_UNITS)
    """Masking unit: token | whole_word | span (SpanBERT geometric spans of whole words)."""
    span_geometric_p: float = rule(0.2, gt=0.0, le=1.0)
    """Span masking: parameter of the geometric span-length distribution (SpanBERT: 0.2)."""
    span_max_length: int = rule(10, ge=1)
    """Span masking: longest span in words (SpanBERT: 10)."""
    sbo: bool = False
    """SpanBERT's span-boundary objective (needs masking=span): each masked token is also predicted from the two
    tokens bordering its span and its position in the span; loss = MLM + SBO. A pretraining-only head: the export
    is the family's masked LM, as SpanBERT's release."""
    nsp: bool = False
    """Next-sentence prediction; off = RoBERTa-style full-sentence samples."""
    sop: bool = False
    """Sentence-order prediction (ALBERT, model.family=albert): two consecutive segments of one document, swapped
    half the time; the head predicts whether they are in order."""
    short_seq_prob: float = rule(0.1, ge=0.0, lt=1.0)
    """Probability of a shorter target length when building samples (BERT's create_pretraining_data)."""
    packing: bool = True
    """Pack several short samples into one row, with position/segment resets and block-diagonal attention."""
    objective: str = rule("mlm", choices=("mlm", "rtd"))
    """Pretraining objective: mlm | rtd (replaced-token detection, ELECTRA / DeBERTa-v3: a small generator fills the
    masks, the model says which tokens were replaced)."""
    rtd_generator_layers: Optional[int] = rule(None, ge=1)
    """RTD: the generator's layers (null = half the model's, as DeBERTa-v3); same family and width."""
    rtd_weight: float = rule(50.0, gt=0.0)
    """RTD: weight of the discriminator's loss against the generator's MLM loss (ELECTRA: 50)."""
    distill_from: Optional[str] = None
    """Pretraining as distillation (task=distill): the teacher, a run dir or a Hugging Face dir of a masked-LM model.
    The student takes the teacher's family, shape and tokenizer with fewer layers, initialised from the teacher's."""
    distill_layers: Optional[int] = rule(None, ge=1)
    """Distillation: the student's layers (null = half the teacher's), copied from every other teacher layer."""
    distill_temperature: float = rule(2.0, gt=0.0)
    """Distillation: softmax temperature of the soft targets (DistilBERT: 2)."""
    distill_alpha_kl: float = rule(5.0, ge=0.0)
    """Distillation: weight of the KL divergence to the teacher's soft targets at the masked positions."""
    distill_alpha_mlm: float = rule(2.0, ge=0.0)
    """Distillation: weight of the student's own MLM loss."""
    distill_alpha_cos: float = rule(1.0, ge=0.0)
    """Distillation: weight of the cosine loss between student and teacher last hidden states (real tokens)."""
    # ---- fine-tuning (classify, ner, qa) ----
    train_file: Optional[str] = None
    """Fine-tuning: labelled training file (tsv/csv/jsonl/parquet or a datasets dir, CoNLL, SQuAD JSON; embed and
    rerank: a pairs file, tsv or jsonl, query / positive / negative* columns)."""
    eval_file: Optional[str] = None
    """Fine-tuning: labelled evaluation file, same format (embed and rerank: a BEIR dir, corpus.jsonl, queries.jsonl
    and qrels/test.tsv)."""
    synthetic: Optional[str] = rule(None, choices=tuple(SYNTHETIC_TASKS))
    """Fine-tuning on generated data instead of files: category | sentiment | pair | ner | squad | squad_v2 |
    retrieval (embed, rerank)."""
    synthetic_train: int = rule(400, ge=1)
    """Generated training examples (paragraphs for squad)."""
    synthetic_eval: int = rule(400, ge=1)
    """Generated evaluation examples."""
    text_column: str = "sentence"
    """Classification: column (or jsonl field) of the first text."""
    text_pair_column: Optional[str] = None
    """Classification: column of the second text of a pair (null = single sentences)."""
    label_column: str = "label"
    """Classification: column of the label (strings or integers)."""
    file_format: Optional[str] = rule(None, choices=("tsv", "csv", "jsonl", "parquet", "datasets"))
    """Classification: tsv | csv | jsonl | parquet | datasets (a datasets.save_to_disk dir); null = from the suffix
    (a directory is a datasets dir)."""
    header: bool = True
    """Classification tsv/csv: the first row names the columns; false = no header row, columns are named by their
    0-based index (task.text_column=0 task.label_column=1)."""
    token_column: int = 0
    """NER: column of the token in CoNLL lines."""
    tag_column: int = -1
    """NER: column of the BIO/IOB2 tag."""
    doc_stride: int = rule(128, ge=0)
    """QA: tokens shared by consecutive windows of a long context."""
    max_query_length: int = rule(64, ge=1)
    """QA: question tokens kept."""
    n_best_size: int = rule(20, ge=1)
    """QA: start/end candidates considered per window."""
    max_answer_length: int = rule(30, ge=1)
    """QA: longest answer in tokens."""
    version_2: bool = False
    """QA: SQuAD v2.0 (questions may have no answer)."""
    null_score_diff_threshold: float = 0.0
    """QA v2: predict no answer when the null score beats the best span by more than this."""
    query_column: str = "query"
    """Embed / rerank pairs file: column (or jsonl field) of the query."""
    positive_column: str = "positive"
    """Embed / rerank pairs file: column of the relevant passage."""
    negative_prefix: str = "negative"
    """Embed / rerank pairs file: columns whose name starts with this hold hard negatives (jsonl: or a list)."""
    hard_negatives: int = rule(0, ge=0)
    """Embed / rerank: hard negatives per query in training: the file's first, then mined with BM25 among the
    other queries' positives."""
    pooling: str = rule("mean", choices=("mean", "cls"))
    """Embed: sentence embedding = mean of the token states | the [CLS] state."""
    similarity_scale: float = rule(20.0, gt=0.0)
    """Embed: cosine similarities x scale are the logits of the in-batch ranking loss (sentence-transformers: 20)."""
    gather_negatives: bool = True
    """Embed: every worker's passages are negatives for every query (in-batch negatives grow with the world size)."""
    rerank_loss: str = rule("listwise", choices=("listwise", "pointwise"))
    """Rerank: listwise = softmax over (positive, negatives) of a query | pointwise = binary cross-entropy per pair."""
    rerank_top_k: int = rule(20, ge=1)
    """Rerank evaluation: passages retrieved by BM25 per query, then reranked."""
    main_metric: Optional[str] = None
    """Metric that picks the best checkpoint (null: accuracy / f1 / f1 / ndcg_at_10 / ndcg_at_10 for classify / ner /
    qa / embed / rerank)."""

    def check(self, job: "JobConfig") -> None:
        if self.max_seq_length > job.model.max_position_embeddings:
            raise ConfigError("task.max_seq_length", f"{self.max_seq_length} exceeds model.max_position_embeddings"
                                                     f" {job.model.max_position_embeddings}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9:
            raise ConfigError("task.random_replace_prob", "mask_replace_prob + random_replace_prob exceeds 1")
        if self.objective == "rtd":
            for key in ("nsp", "sop", "distill_from"):
                if getattr(self, key):
                    raise ConfigError(f"task.{key}", "replaced-token detection (task.objective=rtd) has no sentence-pair"
                                                     " head and is not a distillation")
            if self.rtd_generator_layers is not None and self.rtd_generator_layers >= job.model.num_hidden_layers:
                raise ConfigError("task.rtd_generator_layers", f"{self.rtd_generator_layers} is not smaller than the"
                                                               f" model's {job.model.num_hidden_layers} layers")
        if self.sbo and self.masking != "span":
            raise ConfigError("task.sbo", f"the span-boundary objective predicts masked spans from their borders: it needs"
                                          f" task.masking=span, not {self.masking}")
        if self.sbo and (self.objective == "rtd" or self.distill_from is not None):
            raise ConfigError("task.sbo", "the span-boundary objective is a masked-LM pretraining head; replaced-token"
                                          " detection and distillation do not train one")
        if self.nsp and self.sop:
            raise ConfigError("task.sop", "a sample pair is either next-sentence (task.nsp) or sentence-order (task.sop)")
        if self.sop and job.data.source == "prepared":
            raise ConfigError("task.sop", "prepared shards carry next-sentence pairs; sentence-order pairs are built from"
                                          " data=text or data=synthetic")
        if self.distill_from is not None:
            if self.name != "pretrain":
                raise ConfigError("task.distill_from", f"distillation is a pretraining job (task=distill), not {self.name};"
                                                       " fine-tune the student afterwards with train.init_from")
            for key in ("nsp", "sop"):
                if getattr(self, key):
                    raise ConfigError(f"task.{key}", "distillation trains the masked LM only (DistilBERT drops NSP)")
            if job.train.init_from:
                raise ConfigError("train.init_from", "a distilled student starts from its teacher (task.distill_from)")
        if self.name not in FINETUNE_TASKS:
            return
        if self.synthetic is not None and self.name not in SYNTHETIC_TASKS[self.synthetic]:
            raise ConfigError("task.synthetic", f"'{self.synthetic}' data is for task="
                                                f"{' | '.join(SYNTHETIC_TASKS[self.synthetic])}, not {self.name}")
        for key in ("train_file", "eval_file") if self.synthetic is None else ():
            if not getattr(self, key):
                raise ConfigError(f"task.{key}", f"task={self.name} needs a {key.replace('_', ' ')} (or task.synthetic)")
        if self.name == "rerank" and self.hard_negatives < 1:
            raise ConfigError("task.hard_negatives", "task=rerank ranks a positive against negatives: give at least 1")
        if self.name in RETRIEVAL_TASKS and self.max_query_length >= self.max_seq_length:
            raise ConfigError("task.max_query_length", f"{self.max_query_length} leaves no room for the passage in"
                                                       f" task.max_seq_length {self.max_seq_length}")
        if self.name == "qa" and not self.doc_stride < self.max_seq_length - self.max_query_length - 3:
            raise ConfigError("task.doc_stride",
                              f"must lie in [0, max_seq_length - max_query_length - 3), got {self.doc_stride}")


@dataclass
class DataConfig:
    source: str = rule("synthetic", choices=("synthetic", "text", "prepared"))
    """synthetic (embedded grammar corpus) | text (raw files: documents separated by blank lines)."""
    paths: List[str] = field(default_factory=list)
    """For source=text: files, globs or directories of .txt files."""
    synthetic_documents: int = rule(3000, ge=0)
    """For source=synthetic: number of generated documents."""
    synthetic_seed: int = 1234
    """For source=synthetic: seed of the grammar sampler (the corpus is a pure function of it)."""
    eval_fraction: float = rule(0.05, ge=0.0, lt=1.0)
    """Fraction of documents held out for evaluation (chosen by a hash of the document)."""
    eval_max_samples: int = rule(512, ge=1)
    """Cap on held-out samples evaluated each time (keeps evaluation cheap)."""
    cache_dir: str = "~/.cache/bert-orchestrator"
    """Where trained vocabularies and tokenised corpora are cached (shared storage on multi-node clusters)."""
    num_proc: int = rule(2, ge=1)
    """Threads used to tokenise the corpus (the tokenizers library parallelises in Rust)."""
    loader_workers: int = rule(0, ge=0)
    """DataLoader worker processes per training worker that prefetch batches (0 = in the training process)."""
    prepared_dir: Optional[str] = None
    """For source=prepared: a dataset written by `python -m orchestrator.prepare` (manifest.json + Arrow shards)."""

    def check(self, job: "JobConfig") -> None:
        if self.source == "text" and not self.paths and job.task.name == "pretrain":
            raise ConfigError("data.paths", "data.source=text needs at least one file, glob or directory")
        if self.source == "synthetic" and self.synthetic_documents < 10:
            raise ConfigError("data.synthetic_documents", f"need at least 10 documents, got {self.synthetic_documents}")


@dataclass
class TokenizerConfig:
    source: str = rule("train", choices=("train", "dir"))
    """train (a vocabulary trained on the training corpus, cached) | dir (load from path)."""
    kind: str = rule("wordpiece", choices=("wordpiece", "bpe"))
    """source=train: wordpiece (BERT's) | bpe (RoBERTa's byte-level BPE, <s> </s> <pad> <unk> <mask>)."""
    path: Optional[str] = None
    """For source=dir: a directory holding vocab.txt or tokenizer.json."""
    vocab_size: int = rule(4096, ge=0)
    """Vocabulary size to train."""
    min_frequency: int = rule(2, ge=1)
    """Minimum pair frequency for a WordPiece merge."""
    lowercase: bool = True
    """Lowercase and strip accents (uncased BERT)."""

    def check(self, job: "JobConfig") -> None:
        if self.source == "dir" and not self.path:
            raise ConfigError("tokenizer.path", "tokenizer.source=dir needs a directory")
        if self.source == "train" and self.vocab_size < 64:
            raise ConfigError("tokenizer.vocab_size", f"must be >= 64, got {self.vocab_size}")


@dataclass
class OptimConfig:
    name: str = rule("adamw", choices=OPTIMIZERS)
    """adamw | lamb."""
    lr: float = rule(1e-3, gt=0.0)
    """Peak learning rate (after warmup)."""
    weight_decay: float = rule(0.01, ge=0.0)
    """Decoupled weight decay; not applied to biases and LayerNorm."""
    beta1: float = rule(0.9, ge=0.0, lt=1.0)
    """First-moment decay."""
    beta2: float = rule(0.999, ge=0.0, lt=1.0)
    """Second-moment decay."""
    eps: float = rule(1e-6, gt=0.0)
    """Denominator epsilon."""


@dataclass
class ScheduleConfig:
    name: str = rule("linear", choices=SCHEDULES)
    """Decay after warmup: linear | cosine | constant."""
    warmup_steps: Optional[int] = rule(None, ge=0)
    """Warmup in optimizer steps; if null, warmup_ratio of total steps."""
    warmup_ratio: float = rule(0.06, ge=0.0, lt=1.0)
    """Warmup as a fraction of total steps when warmup_steps is null."""


@dataclass
class EngineConfig:
    backend: str = rule("deepspeed", choices=ENGINES)
    """deepspeed | torch (plain PyTorch, world size 1 only: the debugger-friendly path)."""
    zero_stage: int = rule(2, choices=(0, 1, 2, 3))
    """DeepSpeed ZeRO stage 0-3."""
    bf16: Optional[bool] = False
    """bf16 mixed precision; null = use it where the worker's hardware runs bf16 fast (detected), else fp32."""
    fp16: bool = False
    """fp16 mixed precision with dynamic loss scaling."""
    gradient_clipping: float = rule(1.0, ge=0.0)
    """Clip the global gradient norm to this value (0 disables)."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward to save memory."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer states in CPU memory."""
    offload_param: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    compile: bool = False
    """torch.compile the model."""
    attention: str = rule("auto", choices=ATTENTION_KERNELS)
    """Attention kernel: auto (manual on CPU under bf16, PyTorch's own SDPA choice elsewhere) | flash | efficient |
    math | cudnn (SDPA backends) | default (no preference) | manual (bf16 matmuls around an fp32 softmax, as
    transformers' eager attention; faster than SDPA's CPU kernels under bf16, for CPU bf16 inputs only)."""

    def check(self, job: "JobConfig") -> None:
        on_gpu = job.compute.use_gpu
        if self.attention in ("efficient", "cudnn") and not on_gpu:
            raise ConfigError("engine.attention",
                              f"the {self.attention} SDPA kernel exists only on GPUs; use auto, manual, flash or math "
                              "on CPU")
        if self.attention == "manual" and on_gpu:
            raise ConfigError("engine.attention",
                              "manual is the CPU bf16 attention; on GPUs use auto (PyTorch's SDPA choice), flash, "
                              "efficient, cudnn or math")
        if self.bf16 and self.fp16:
            raise ConfigError("engine.fp16", "bf16 and fp16 are both on; choose one")
        if self.fp16 and not on_gpu:
            raise ConfigError("engine.fp16", "fp16 needs GPUs (CPU kernels lack fp16); use engine.bf16=true on CPU")
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("engine.offload_param", "parameter offload needs ZeRO stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer", "optimizer offload needs ZeRO stage 1-3")
        if job.optim.name == "lamb" and self.backend == "deepspeed" and (self.offload_optimizer or self.offload_param):
            # ZeRO-Offload steps on flat ZeRO partitions on the host: no whole tensors for a per-layer trust ratio
            raise ConfigError("engine.offload_optimizer" if self.offload_optimizer else "engine.offload_param",
                              "ZeRO-Offload steps AdamW on flat ZeRO partitions, where LAMB's per-layer trust ratio"
                              " has no whole tensors: use optim=adamw")
        if job.optim.name == "lamb" and self.backend == "deepspeed" and self.zero_stage > 0:
            # ZeRO flattens and partitions parameters, so a per-tensor trust ratio would be computed on slices.
            raise ConfigError("optim.name", "LAMB's per-layer trust ratio needs whole tensors: use engine=zero0 with lamb")
        if self.backend == "torch" and job.compute.world_size() != 1:
            raise ConfigError("engine.backend",
                              f"engine=torch is single-process; world size is {job.compute.world_size()} (use DeepSpeed)")


@dataclass
class ComputeConfig:
    num_nodes: int = rule(1, ge=1)
    """Nodes the job spans."""
    gpus_per_node: int = rule(0, ge=0)
    """GPUs each node has (0 on CPU-only machines)."""
    workers_per_node: Optional[int] = rule(None, ge=1, why="the job would have zero workers")
    """Workers per node: one per GPU (null = gpus_per_node); CPU workers when use_gpu=false."""
    cpus_per_worker: int = rule(1, ge=1)
    """CPU cores reserved for each worker (its torch threads)."""
    use_gpu: bool = False
    """Run workers on GPUs (NCCL) rather than CPUs (gloo)."""
    placement_strategy: str = rule("PACK", choices=PLACEMENTS)
    """Ray placement: PACK (keep a node's workers together) | STRICT_PACK | SPREAD | STRICT_SPREAD."""
    max_gpus_per_node: int = rule(8, ge=1)
    """GPUs the cluster's largest node type has; the plan refuses shapes it cannot hold."""
    network: str = rule("tcp", choices=_network_profiles)
    """NCCL network profile applied to every worker: nvlink_single_node | infiniband | efa | tcp."""
    network_debug: bool = False
    """NCCL_DEBUG=INFO on every worker (see which transport NCCL picked)."""
    gpu_type: str = "A100"
    """GPU model for the time/cost estimate (A100, H100, H200, A10G, L4, V100, ...)."""
    gpu_memory_gib: float = rule(80.0, gt=0.0)
    """Memory of one GPU; the plan refuses a job whose per-GPU estimate exceeds it."""
    host_memory_gib: Optional[float] = rule(None, gt=0.0)
    """Memory of a node running CPU workers; the plan refuses CPU jobs whose workers together exceed it
    (null = this machine's when the job runs here, unchecked on a remote cluster)."""
    mfu: float = rule(0.4, gt=0.0, le=1.0)
    """Assumed model FLOPs utilisation for the time estimate (0.4: typical of tuned BERT pretraining)."""
    price_per_gpu_hour: Optional[float] = rule(None, ge=0.0)
    """Price of one GPU-hour, for the cost estimate."""
    min_workers: Optional[int] = rule(None, ge=1)
    """Elastic (launcher=ray): fewest data-parallel workers the job runs on (null with max_workers = fixed size)."""
    max_workers: Optional[int] = rule(None, ge=1)
    """Elastic (launcher=ray): most workers; Ray Train ScalingConfig(num_workers=(min, max)). The global batch is
    kept: grad accumulation = global / (micro x current workers), so every size in [min, max] must divide it."""
    elastic_resize_interval_s: float = rule(60.0, gt=0.0)
    """Elastic: how often Ray Train considers growing the worker group (each resize restarts from a checkpoint)."""
    pin_cpu_workers: bool = True
    """launcher=ray CPU workers: each pins its threads to cores of its own when the job's workers reserve every Ray
    CPU of their node (no other job can then be given those cores); false leaves placement to the kernel."""
    gpu_numa_binding: str = rule("node", choices=GPU_NUMA_MODES)
    """GPU workers bind their threads to their GPU's NUMA cores (torch.numa.binding): node | socket | exclusive |
    core-complex (a node's cores split among its GPUs; only when the job holds every GPU of the node, else node)
    | none. The decision is the cpu_affinity line in metrics.jsonl."""

    def resolved_workers_per_node(self) -> int:
        if self.workers_per_node is not None:
            return self.workers_per_node
        return self.gpus_per_node if self.use_gpu else 1

    def world_size(self) -> int:
        """Data-parallel workers of the job (the largest size of an elastic range)."""
        if self.max_workers is not None and self.min_workers is not None:
            return self.max_workers
        return self.num_nodes * self.resolved_workers_per_node()

    def check(self, job: "JobConfig") -> None:
        per_node = self.resolved_workers_per_node()
        if self.use_gpu and self.gpus_per_node < 1:
            raise ConfigError("compute.gpus_per_node", "use_gpu=true needs gpus_per_node >= 1")
        if self.use_gpu and per_node > self.gpus_per_node:
            raise ConfigError("compute.workers_per_node",
                              f"{per_node} workers per node but only {self.gpus_per_node} GPUs: one worker per GPU")
        if self.use_gpu and self.gpus_per_node > self.max_gpus_per_node:
            raise ConfigError("compute.gpus_per_node", f"{self.gpus_per_node} GPUs per node, but the largest node type"
                                                       f" has {self.max_gpus_per_node} (compute.max_gpus_per_node)")
        if self.placement_strategy == "STRICT_PACK" and self.num_nodes > 1:
            raise ConfigError("compute.placement_strategy", "STRICT_PACK puts every worker on one node; num_nodes > 1")
        if job.launcher.name == "local" and self.num_nodes * per_node != 1:
            raise ConfigError("launcher.name", f"launcher=local runs one process; compute asks for"
                                               f" {self.num_nodes * per_node} workers (use compute=cpu1)")
        if (self.min_workers is None) != (self.max_workers is None):
            raise ConfigError("compute.max_workers", "set both compute.min_workers and compute.max_workers (or neither)")
        if self.min_workers is not None:
            self._check_elastic(job)

    def _check_elastic(self, job: "JobConfig") -> None:
        tr = job.train
        if self.max_workers < self.min_workers:
            raise ConfigError("compute.max_workers", f"{self.max_workers} is below compute.min_workers {self.min_workers}")
        if job.launcher.name != "ray":
            raise ConfigError("compute.min_workers", "an elastic worker range needs launcher=ray")
        if job.engine.backend != "deepspeed":
            raise ConfigError("engine.backend", "an elastic worker range needs the DeepSpeed engine")
        if job.launcher.max_failures == 0:
            raise ConfigError("launcher.max_failures", "elastic training restarts the worker group on every resize"
                                                       " (a shrink counts as a failure): set launcher.max_failures > 0 or -1")
        if tr.grad_accum_steps is not None:
            raise ConfigError("train.grad_accum_steps", "elastic: accumulation follows the world size; set it to null")
        if tr.micro_batch_size_per_gpu is None or tr.global_batch_size is None:
            raise ConfigError("train.micro_batch_size_per_gpu", "elastic: give micro_batch_size_per_gpu and global_batch_size")


@dataclass
class LauncherConfig:
    name: str = rule("ray", choices=LAUNCHERS)
    """local (one process, no Ray) | ray (Ray Train TorchTrainer)."""
    address: Optional[str] = None
    """Ray cluster to join; null = RAY_ADDRESS if set, else start a local Ray instance."""
    max_failures: int = rule(2, ge=-1)
    """Worker-group restarts Ray Train may make after a failure (-1 = unlimited)."""
    num_cpus: Optional[int] = rule(None, ge=1)
    """CPUs of a locally started Ray instance (null = all)."""


@dataclass
class LoggerConfig:
    name: str = rule("none", choices=LOGGERS)
    """none | wandb."""
    project: str = "bert-orchestrator"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    group: Optional[str] = None
    """W&B group (sweeps put their members in one)."""
    mode: Optional[str] = rule(None, choices=("online", "offline", "disabled"))
    """W&B mode online | offline | disabled; null = WANDB_MODE or online."""
    tags: List[str] = field(default_factory=list)
    """W&B tags."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <run dir>/tensorboard (logger=tensorboard; with logger=wandb too)."""


@dataclass
class TrainConfig:
    micro_batch_size_per_gpu: Optional[int] = rule(16, ge=1)
    """Samples per worker per forward pass."""
    grad_accum_steps: Optional[int] = rule(None, ge=1)
    """Micro batches accumulated per optimizer step; derived when null."""
    global_batch_size: Optional[int] = rule(64, ge=1)
    """Samples per optimizer step over all workers = micro x accum x world_size."""
    max_steps: Optional[int] = rule(None, ge=1)
    """Optimizer steps to run; one of max_steps, epochs, token_budget."""
    epochs: Optional[float] = rule(None, gt=0.0)
    """Passes over the training samples."""
    token_budget: Optional[int] = rule(None, ge=1)
    """Tokens (non-padding) to train on; steps = budget / tokens per step."""
    log_every_steps: int = rule(10, ge=1)
    """Write a metrics line every N optimizer steps."""
    eval_every_steps: Optional[int] = rule(100, ge=1)
    """Evaluate on the held-out split every N steps (and at the end); null = every epoch."""
    checkpoint_every_steps: int = rule(100, ge=1)
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = rule(2, ge=1)
    """Checkpoints kept in the run dir."""
    seed: int = 42
    """Seed of model init, data order and masking."""
    init_from: Optional[str] = None
    """Initialise the weights from a run dir or export dir (e.g. phase 2 from phase 1); optimizer starts fresh."""
    write_ledger: bool = False
    """Write which rows every rank consumed at every step to ledger/rank<R>.jsonl (proves exactly-once data)."""
    skip_nonfinite: bool = True
    """Divergence guard: a step whose loss is NaN/inf on any rank is skipped (no optimizer/LR update)."""
    spike_factor: Optional[float] = rule(None, gt=1.0)
    """Divergence guard: also skip a step whose loss exceeds factor x the mean of the recent good steps (null = off)."""
    spike_window: int = rule(20, ge=1)
    """Good steps whose mean loss the spike check compares against (checked once 5 are known)."""
    max_bad_steps_in_row: int = rule(3, ge=1)
    """This many skipped steps in a row roll back to the newest good checkpoint."""
    max_rollbacks: int = rule(2, ge=0)
    """Rollbacks allowed per run before the job fails (bad data would otherwise loop forever)."""
    resume: str = rule("auto", choices=("auto", "never", "force"))
    """A run dir holding a checkpoint: auto = resume it when it is the same job (plan/identity.py), else refuse
    naming every differing key; never = refuse any checkpoint; force = resume even a different job's."""
    profile_steps: Optional[List[int]] = None
    """[first, last]: optimizer steps run under torch.profiler on every rank; per rank a summary by category, torch's
    op table and a Chrome trace in <run dir>/profile/ (worker/profiling.py). null = off."""

    def check(self, job: "JobConfig") -> None:
        budgets = [k for k in ("max_steps", "epochs", "token_budget") if getattr(self, k) is not None]
        if len(budgets) != 1:
            raise ConfigError("train.max_steps",
                              f"set exactly one of max_steps, epochs, token_budget (got {budgets or 'none'})")
        p = self.profile_steps
        if p is not None:
            if len(p) != 2 or not 1 <= p[0] <= p[1]:
                raise ConfigError("train.profile_steps", f"give [first, last] with 1 <= first <= last (got {list(p)})")
            if self.max_steps is not None and p[1] > self.max_steps:
                raise ConfigError("train.profile_steps", f"step {p[1]} is past train.max_steps={self.max_steps}")


@dataclass
class StageConfig:
    name: str = "stage"
    """Stage name: its run dir is <pipeline run dir>/<name>."""
    overrides: List[str] = field(default_factory=list)
    """Hydra overrides composing the stage's job; {pipeline_dir} is replaced by the pipeline's run dir."""


@dataclass
class PipelineConfig:
    stages: List[StageConfig] = field(default_factory=list)
    """Jobs run one after the other (e.g. pretrain, then fine-tune from its run dir)."""
    compare: List[str] = field(default_factory=list)
    """Stage names whose final eval metrics the pipeline summary sets side by side."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_name: str = "pretrain"
    """Name of the run; the default run dir is runs/<run_name> (one directory name: it cannot leave runs_root)."""

    def check(self, job: "JobConfig") -> None:
        check_run_name(self.run_name)
    runs_root: str = "runs"
    """Directory holding run dirs (shared storage on multi-node clusters); env BERT_ORCH_RUNS."""
    run_dir: Optional[str] = None
    """Set by the CLI from Hydra's output dir; where plan.json, checkpoints and export go."""
    plan_only: bool = False
    """Print the plan and exit without starting Ray or a worker."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """When stages are given, the job is this sequence of jobs."""
    debug_note: Optional[str] = None
    """Set by debug configs: says why the run is small."""
    verbose: bool = False
    """Show the libraries' routine logs too (Ray Train's report lines, DeepSpeed's accelerator probe,
    transformers' load reports and save bars); off, a run prints its plan, one progress line per log step and
    its summary, with every warning and error."""


def default_run_name(*, _root_: Any) -> str:
    """`run_name: ${orch_run_name:}` (conf/config.yaml): <task>_<model>-<8 hex digits of the job identity>, so
    different configs get different run dirs and the same command the same one (plan/identity.py)."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    from orchestrator.plan.identity import RESULT_KEYS, job_identity

    groups = {g: OmegaConf.to_container(_root_[g], resolve=True, throw_on_missing=False)
              for g in RESULT_KEYS if g in _root_}
    digest = hashlib.sha256(json.dumps(job_identity(groups), sort_keys=True).encode()).hexdigest()[:8]
    return f"{_root_.task.name}_{_root_.model.name}-{digest}"


def register_resolvers() -> None:
    """Called before anything resolves a composed config (the CLI, bert-orch-submit, to_job_config)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("orch_run_name"):
        OmegaConf.register_new_resolver("orch_run_name", default_run_name)
    if not OmegaConf.has_resolver("orch_required"):
        OmegaConf.register_new_resolver("orch_required", required_value)


def required_value(key: str, what: str = "a value") -> Any:
    """`key: ${orch_required:key,what}` in an experiment: a value the command line must give. (`???` cannot say
    it there: OmegaConf keeps the earlier default when it merges `???` over it.)"""
    raise ConfigError(key, f"has no value: give {what} ({key}=...)")


_SCHEMA: Any = None


def _schema() -> Any:
    """OmegaConf's structured view of JobConfig, built once (about 0.1 s each time otherwise)."""
    global _SCHEMA
    if _SCHEMA is None:
        from omegaconf import OmegaConf

        _SCHEMA = OmegaConf.structured(JobConfig)
    return _SCHEMA


def to_job_config(cfg: Any) -> JobConfig:
    """Validate a composed DictConfig (or dict) against JobConfig: unknown keys and wrong types are refused.

    Raises ConfigError naming the full dotted key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.errors import ConfigError

    register_resolvers()
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:  # `???` in a group file: merged onto the schema it would silently become the field's default
            raise ConfigError(missing[0], f"has no value: the chosen config group needs one ({missing[0]}=...)")
        merged = OmegaConf.merge(_schema(), cfg)  # merge copies the schema: the cached one stays untouched
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        inner: Any = e
        while inner is not None and not isinstance(inner, ConfigError):  # raised by a resolver (orch_required)
            inner = inner.__cause__ or inner.__context__
        if inner is not None:
            raise inner from None
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(key, msg) from None
    assert isinstance(obj, JobConfig)
    return obj
