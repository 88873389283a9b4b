"""Config stage: one dataclass per conf/ group; composing YAML onto these refuses unknown keys and wrong types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Preset name (tiny, mini, small, base, large); informational, the sizes below rule."""
    hidden_size: int = 128
    """Width of every transformer layer."""
    num_hidden_layers: int = 2
    """Number of transformer layers."""
    num_attention_heads: int = 2
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = 512
    """Width of the feed-forward block (4x hidden in the published BERT sizes)."""
    max_position_embeddings: int = 512
    """Learned absolute positions; the longest sequence the model accepts."""
    type_vocab_size: int = 2
    """Segment (token type) embeddings: 2 for sentence A/B."""
    hidden_dropout_prob: float = 0.1
    """Dropout on hidden states (0 in the pretraining presets, as cramming measured)."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention probabilities."""
    hidden_act: str = "gelu"
    """Activation of the feed-forward block."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon, as in the original BERT."""
    initializer_range: float = 0.02
    """Std of the truncated normal used to initialise weights."""


@dataclass
class TaskConfig:
    name: str = "pretrain"
    """Task: pretrain (MLM, optional NSP) | classify | ner | qa."""
    max_seq_length: int = 128
    """Tokens per sample including [CLS]/[SEP]; at most model.max_position_embeddings."""
    mlm_probability: float = 0.15
    """Fraction of tokens selected for prediction."""
    mask_replace_prob: float = 0.8
    """Of the selected tokens, fraction replaced by [MASK]."""
    random_replace_prob: float = 0.1
    """Of the selected tokens, fraction replaced by a random token (the rest stay unchanged)."""
    masking: str = "token"
    """Masking unit: token | whole_word | span (SpanBERT geometric spans of whole words)."""
    span_geometric_p: float = 0.2
    """Span masking: parameter of the geometric span-length distribution (SpanBERT: 0.2)."""
    span_max_length: int = 10
    """Span masking: longest span in words (SpanBERT: 10)."""
    nsp: bool = False
    """Next-sentence prediction; off = RoBERTa-style full-sentence samples."""
    short_seq_prob: float = 0.1
    """Probability of a shorter target length when building samples (BERT's create_pretraining_data)."""
    packing: bool = True
    """Pack several short samples into one row, with position/segment resets and block-diagonal attention."""
    # ---- fine-tuning (classify, ner, qa) ----
    train_file: Optional[str] = None
    """Fine-tuning: labelled training file (tsv/csv/jsonl, CoNLL, SQuAD JSON)."""
    eval_file: Optional[str] = None
    """Fine-tuning: labelled evaluation file, same format."""
    synthetic: Optional[str] = None
    """Fine-tuning on generated data instead of files: consistency | sentiment | pair | ner | squad | squad_v2."""
    synthetic_train: int = 400
    """Generated training examples (paragraphs for squad)."""
    synthetic_eval: int = 400
    """Generated evaluation examples."""
    text_column: str = "sentence"
    """Classification: column (or jsonl field) of the first text."""
    text_pair_column: Optional[str] = None
    """Classification: column of the second text of a pair (null = single sentences)."""
    label_column: str = "label"
    """Classification: column of the label (strings or integers)."""
    file_format: Optional[str] = None
    """Classification: tsv | csv | jsonl (null = from the file suffix)."""
    token_column: int = 0
    """NER: column of the token in CoNLL lines."""
    tag_column: int = -1
    """NER: column of the BIO/IOB2 tag."""
    doc_stride: int = 128
    """QA: tokens shared by consecutive windows of a long context."""
    max_query_length: int = 64
    """QA: question tokens kept."""
    n_best_size: int = 20
    """QA: start/end candidates considered per window."""
    max_answer_length: int = 30
    """QA: longest answer in tokens."""
    version_2: bool = False
    """QA: SQuAD v2.0 (questions may have no answer)."""
    null_score_diff_threshold: float = 0.0
    """QA v2: predict no answer when the null score beats the best span by more than this."""
    main_metric: Optional[str] = None
    """Metric that picks the best checkpoint (null: accuracy / f1 / f1 for classify / ner / qa)."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """synthetic (embedded grammar corpus) | text (raw files: documents separated by blank lines)."""
    paths: List[str] = field(default_factory=list)
    """For source=text: files, globs or directories of .txt files."""
    synthetic_documents: int = 3000
    """For source=synthetic: number of generated documents."""
    synthetic_seed: int = 1234
    """For source=synthetic: seed of the grammar sampler (the corpus is a pure function of it)."""
    eval_fraction: float = 0.05
    """Fraction of documents held out for evaluation (chosen by a hash of the document)."""
    eval_max_samples: int = 512
    """Cap on held-out samples evaluated each time (keeps evaluation cheap)."""
    cache_dir: str = "~/.cache/bert-orchestrator"
    """Where trained vocabularies and tokenised corpora are cached (shared storage on multi-node clusters)."""
    num_proc: int = 2
    """Threads used to tokenise the corpus (the tokenizers library parallelises in Rust)."""
    loader_workers: int = 0
    """DataLoader worker processes per training worker that prefetch batches (0 = in the training process)."""
    prepared_dir: Optional[str] = None
    """For source=prepared: a dataset written by `python -m orchestrator.prepare` (manifest.json + Arrow shards)."""


@dataclass
class TokenizerConfig:
    source: str = "train"
    """train (a WordPiece vocabulary on the training corpus, cached) | dir (load from path)."""
    path: Optional[str] = None
    """For source=dir: a directory holding vocab.txt or tokenizer.json."""
    vocab_size: int = 4096
    """Vocabulary size to train."""
    min_frequency: int = 2
    """Minimum pair frequency for a WordPiece merge."""
    lowercase: bool = True
    """Lowercase and strip accents (uncased BERT)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | lamb."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.01
    """Decoupled weight decay; not applied to biases and LayerNorm."""
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.999
    """Second-moment decay."""
    eps: float = 1e-6
    """Denominator epsilon."""


@dataclass
class ScheduleConfig:
    name: str = "linear"
    """Decay after warmup: linear | cosine | constant."""
    warmup_steps: Optional[int] = None
    """Warmup in optimizer steps; if null, warmup_ratio of total steps."""
    warmup_ratio: float = 0.06
    """Warmup as a fraction of total steps when warmup_steps is null."""


@dataclass
class EngineConfig:
    backend: str = "deepspeed"
    """deepspeed | torch (plain PyTorch, world size 1 only: the debugger-friendly path)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    bf16: Optional[bool] = False
    """bf16 mixed precision; null = use it where the worker's hardware runs bf16 fast (detected), else fp32."""
    fp16: bool = False
    """fp16 mixed precision with dynamic loss scaling."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward to save memory."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer states in CPU memory."""
    offload_param: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    compile: bool = False
    """torch.compile the model."""
    attention: str = "auto"
    """SDPA kernel: auto (math on CPU under bf16, where PyTorch's CPU flash backward is ~2x slower at BERT
    lengths; PyTorch's own choice elsewhere) | flash | efficient | math | cudnn | default (no preference)."""


@dataclass
class ComputeConfig:
    num_nodes: int = 1
    """Nodes the job spans."""
    gpus_per_node: int = 0
    """GPUs each node has (0 on CPU-only machines)."""
    workers_per_node: Optional[int] = None
    """Workers per node: one per GPU (null = gpus_per_node); CPU workers when use_gpu=false."""
    cpus_per_worker: int = 1
    """CPU cores reserved for each worker (its torch threads)."""
    use_gpu: bool = False
    """Run workers on GPUs (NCCL) rather than CPUs (gloo)."""
    placement_strategy: str = "PACK"
    """Ray placement: PACK (keep a node's workers together) | STRICT_PACK | SPREAD | STRICT_SPREAD."""
    max_gpus_per_node: int = 8
    """GPUs the cluster's largest node type has; the plan refuses shapes it cannot hold."""
    network: str = "tcp"
    """NCCL network profile applied to every worker: nvlink_single_node | infiniband | efa | tcp."""
    network_debug: bool = False
    """NCCL_DEBUG=INFO on every worker (see which transport NCCL picked)."""
    gpu_type: str = "A100"
    """GPU model for the time/cost estimate (A100, H100, H200, A10G, L4, V100, ...)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU; the plan refuses a job whose per-GPU estimate exceeds it."""
    mfu: float = 0.4
    """Assumed model FLOPs utilisation for the time estimate (0.4: typical of tuned BERT pretraining)."""
    price_per_gpu_hour: Optional[float] = None
    """Price of one GPU-hour, for the cost estimate."""
    min_workers: Optional[int] = None
    """Elastic (launcher=ray): fewest data-parallel workers the job runs on (null with max_workers = fixed size)."""
    max_workers: Optional[int] = None
    """Elastic (launcher=ray): most workers; Ray Train ScalingConfig(num_workers=(min, max)). The global batch is
    kept: grad accumulation = global / (micro x current workers), so every size in [min, max] must divide it."""
    elastic_resize_interval_s: float = 60.0
    """Elastic: how often Ray Train considers growing the worker group (each resize restarts from a checkpoint)."""


@dataclass
class LauncherConfig:
    name: str = "ray"
    """local (one process, no Ray) | ray (Ray Train TorchTrainer)."""
    address: Optional[str] = None
    """Ray cluster to join; null = RAY_ADDRESS if set, else start a local Ray instance."""
    max_failures: int = 2
    """Worker-group restarts Ray Train may make after a failure (-1 = unlimited)."""
    num_cpus: Optional[int] = None
    """CPUs of a locally started Ray instance (null = all)."""


@dataclass
class LoggerConfig:
    name: str = "none"
    """none | wandb."""
    project: str = "bert-orchestrator"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    group: Optional[str] = None
    """W&B group (sweeps put their members in one)."""
    mode: Optional[str] = None
    """W&B mode online | offline | disabled; null = WANDB_MODE or online."""
    tags: List[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class TrainConfig:
    micro_batch_size_per_gpu: Optional[int] = 16
    """Samples per worker per forward pass."""
    grad_accum_steps: Optional[int] = None
    """Micro batches accumulated per optimizer step; derived when null."""
    global_batch_size: Optional[int] = 64
    """Samples per optimizer step over all workers = micro x accum x data_parallel_size."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; one of max_steps, epochs, token_budget."""
    epochs: Optional[float] = None
    """Passes over the training samples."""
    token_budget: Optional[int] = None
    """Tokens (non-padding) to train on; steps = budget / tokens per step."""
    log_every_steps: int = 10
    """Write a metrics line every N optimizer steps."""
    eval_every_steps: Optional[int] = 100
    """Evaluate on the held-out split every N steps (and at the end); null = every epoch."""
    checkpoint_every_steps: int = 100
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept in the run dir."""
    seed: int = 42
    """Seed of model init, data order and masking."""
    init_from: Optional[str] = None
    """Initialise the weights from a run dir or export dir (e.g. phase 2 from phase 1); optimizer starts fresh."""
    write_ledger: bool = False
    """Write which rows every rank consumed at every step to ledger/rank<R>.jsonl (proves exactly-once data)."""
    skip_nonfinite: bool = True
    """Divergence guard: a step whose loss is NaN/inf on any rank is skipped (no optimizer/LR update)."""
    spike_factor: Optional[float] = None
    """Divergence guard: also skip a step whose loss exceeds factor x the mean of the recent good steps (null = off)."""
    spike_window: int = 20
    """Good steps whose mean loss the spike check compares against (checked once 5 are known)."""
    max_bad_steps_in_row: int = 3
    """This many skipped steps in a row roll back to the newest good checkpoint."""
    max_rollbacks: int = 2
    """Rollbacks allowed per run before the job fails (bad data would otherwise loop forever)."""


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
    """Name of the run; the default run dir is runs/<run_name>."""
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


def to_job_config(cfg: Any) -> JobConfig:
    """Validate a composed DictConfig (or dict) against JobConfig: unknown keys and wrong types are refused.

    Raises ConfigError naming the full dotted key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.errors import ConfigError

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    schema = OmegaConf.structured(JobConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(key, msg) from None
    assert isinstance(obj, JobConfig)
    return obj
