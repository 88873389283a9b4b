"""Model families: BERT and its successors, each through its own Hugging Face classes (no encoder layer is written
here). A family says how to build its config from a `model=` preset, how to run its encoder on our batches (packed
rows: restarted positions and a block-diagonal mask) and how its MLM head reads only the masked positions.

| family     | HF classes          | token types | positions                    | attention kernel |
|------------|---------------------|-------------|------------------------------|------------------|
| bert       | Bert*               | 2           | learned absolute             | SDPA             |
| roberta    | Roberta*            | none        | learned, offset by pad id + 1| SDPA             |
| albert     | Albert* (1 shared layer group, factorised embeddings)  | 2 | learned absolute | SDPA |
| deberta_v2 | DebertaV2* in its v3 shape (relative c2p/p2c attention) | none | relative (buckets) | eager: transformers has no SDPA path |
| modernbert | ModernBert* (RoPE, GeGLU, alternating local/global attention) | none | rotary | SDPA |
| electra    | Electra* (factorised embeddings; the RTD recipe is a job of its own) | 2 | learned absolute | SDPA |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # planning imports this module for FAMILIES: no torch there
    import torch

FAMILIES = ("bert", "roberta", "albert", "deberta_v2", "modernbert", "electra")


@dataclass(frozen=True)
class Family:
    name: str
    prefix: str  # transformers class-name prefix: f"{prefix}ForMaskedLM"
    model_type: str  # config.json "model_type"
    token_types: bool  # segment embeddings exist (sentence A/B)
    sdpa: bool  # transformers offers the SDPA attention path
    next_sentence: bool = False  # has a next-sentence head (BertForPreTraining)
    position_offset: bool = False  # RoBERTa: positions start at padding_idx + 1

    def hf_class(self, suffix: str):
        import transformers

        return getattr(transformers, f"{self.prefix}{suffix}")


SPECS = {
    "bert": Family("bert", "Bert", "bert", token_types=True, sdpa=True, next_sentence=True),
    "roberta": Family("roberta", "Roberta", "roberta", token_types=False, sdpa=True, position_offset=True),
    "albert": Family("albert", "Albert", "albert", token_types=True, sdpa=True),
    "deberta_v2": Family("deberta_v2", "DebertaV2", "deberta-v2", token_types=False, sdpa=False),
    "modernbert": Family("modernbert", "ModernBert", "modernbert", token_types=False, sdpa=True),
    "electra": Family("electra", "Electra", "electra", token_types=True, sdpa=True),
}
BY_MODEL_TYPE = {f.model_type: f for f in SPECS.values()}


def family_of(name: str) -> Family:
    return SPECS[name]


def family_of_config(config) -> Family:
    """The family of a transformers config (a checkpoint's), or a one-line refusal."""
    from orchestrator.errors import ConfigError

    fam = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if fam is None:
        raise ConfigError("train.init_from", f"model_type {getattr(config, 'model_type', None)!r} is not a family"
                                             f" this tool trains ({', '.join(FAMILIES)})")
    return fam


def shape_from_config(model_cfg, cfg: dict, where: str, key: str) -> Family:
    """Set a job's `model` (family and sizes) from a checkpoint's config.json dict; the family, or a one-line
    refusal naming `key` when config.json's model_type is none of ours (old BERT dirs have no model_type)."""
    from orchestrator.errors import ConfigError

    fam = BY_MODEL_TYPE.get(cfg.get("model_type", "bert"))
    if fam is None:
        raise ConfigError(key, f"'{where}' holds a {cfg.get('model_type')!r} model, not one of the families this tool"
                               " trains")
    model_cfg.family = fam.name
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "embedding_size"):
        if name in cfg and (name != "type_vocab_size" or fam.token_types):  # DeBERTa-v3 records 0 segment types
            setattr(model_cfg, name, cfg[name])
    if fam.position_offset:  # RoBERTa counts padding_idx + 1 extra positions
        model_cfg.max_position_embeddings -= cfg.get("pad_token_id", 1) + 1
    if fam.name not in ("albert", "electra"):
        model_cfg.embedding_size = None
    return fam


def hf_config(model_cfg, vocab_size: int, special_ids: Optional[dict[str, int]] = None):
    """The transformers config of `model_cfg` (a `model=` preset plus `model.family`)."""
    special_ids = special_ids or {}
    pad = special_ids.get("pad_token_id", 0)
    fam = family_of(model_cfg.family)
    m = model_cfg
    common = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                  num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
                  initializer_range=m.initializer_range, pad_token_id=pad)
    bertlike = dict(max_position_embeddings=m.max_position_embeddings, hidden_dropout_prob=m.hidden_dropout_prob,
                    attention_probs_dropout_prob=m.attention_probs_dropout_prob, hidden_act=m.hidden_act,
                    layer_norm_eps=m.layer_norm_eps)
    cls = fam.hf_class("Config")
    if fam.name == "bert":
        config = cls(**common, **bertlike, type_vocab_size=m.type_vocab_size)
    elif fam.name == "roberta":
        bertlike["max_position_embeddings"] = m.max_position_embeddings + pad + 1  # RoBERTa's 514 for 512
        config = cls(**common, **bertlike, type_vocab_size=1, bos_token_id=special_ids.get("cls_token_id", 0),
                     eos_token_id=special_ids.get("sep_token_id", 2))
    elif fam.name in ("albert", "electra"):
        config = cls(**common, **bertlike, type_vocab_size=m.type_vocab_size,
                     embedding_size=m.embedding_size or (128 if fam.name == "albert" else m.hidden_size))
    elif fam.name == "deberta_v2":  # DeBERTa-v3's shape (microsoft/deberta-v3-*/config.json)
        config = cls(**common, **bertlike, type_vocab_size=0, relative_attention=True, pos_att_type=["p2c", "c2p"],
                     position_biased_input=False, max_relative_positions=-1, position_buckets=256,
                     norm_rel_ebd="layer_norm", share_att_key=True)
        config.layer_norm_eps = 1e-7
    else:  # modernbert
        config = cls(**common, max_position_embeddings=m.max_position_embeddings,
                     hidden_activation="gelu", attention_dropout=m.attention_probs_dropout_prob,
                     embedding_dropout=m.hidden_dropout_prob, mlp_dropout=m.hidden_dropout_prob,
                     norm_eps=1e-5, cls_token_id=special_ids.get("cls_token_id", 0),
                     sep_token_id=special_ids.get("sep_token_id", 0), bos_token_id=special_ids.get("cls_token_id", 0),
                     eos_token_id=special_ids.get("sep_token_id", 0))
    return config


def set_attention(config, fam: Family) -> None:
    config._attn_implementation = "sdpa" if fam.sdpa else "eager"


def backbone(hf_model):
    """The encoder inside a head model (model.bert, model.roberta, model.model, ...), or the model itself."""
    return getattr(hf_model, hf_model.base_model_prefix, hf_model)


def _embedding_ids(fam: Family, encoder, token_type_ids, position_ids):
    """(token_type_ids, position_ids) as the family's embeddings take them: no segment ids where it has no segment
    embeddings, positions counted from padding_idx + 1 for RoBERTa."""
    if not fam.token_types:
        token_type_ids = None
    if position_ids is not None and fam.position_offset:
        position_ids = position_ids + encoder.config.pad_token_id + 1
    return token_type_ids, position_ids


def encode(fam: Family, encoder, input_ids, attention_mask, token_type_ids=None, position_ids=None) -> torch.Tensor:
    """Last hidden states [B, T, H] of `encoder` on one of our batches.

    attention_mask is [B, T] (padding) or [B, 1, T, T] boolean (packed rows: block-diagonal); position_ids restart
    per packed sample. Families without segment embeddings get no token_type_ids.
    """
    token_type_ids, position_ids = _embedding_ids(fam, encoder, token_type_ids, position_ids)
    if fam.name == "deberta_v2":
        return _deberta_encode(encoder, input_ids, attention_mask, token_type_ids)
    kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        kw["token_type_ids"] = token_type_ids
    if position_ids is not None:
        kw["position_ids"] = position_ids
    if fam.name == "modernbert" and attention_mask is not None and attention_mask.dim() == 4:
        kw["attention_mask"] = _modernbert_masks(encoder.config, attention_mask)
    return encoder(**kw, return_dict=True).last_hidden_state


# Families whose layers are BERT's (attention.self.query/key/value, attention.output, feed_forward_chunk): their last
# layer can be run at a subset of positions (encode_at)
LAST_LAYER_AT = ("bert", "roberta", "electra")


def encode_at(fam: Family, encoder, input_ids, attention_mask, token_type_ids, position_ids,
              positions: torch.Tensor) -> torch.Tensor:
    """Last hidden states at `positions` (flat indices b * T + t, sorted, unique) as [N, H]: what `encode` gives
    there, computed without the last layer's work anywhere else.

    A pretraining loss reads the last layer at the masked positions (and [CLS], span boundaries) only, and every
    position's output in a layer depends on the others only through that layer's keys and values. So for BERT-layer
    families the last layer projects keys and values at all positions and runs its queries, attention output, and
    feed-forward block at the N positions only (about 15% of a row): the same arithmetic on fewer rows, about 70% of
    the layer's matmul FLOPs saved, and the same loss and gradients (tests/test_families.py). Every other family runs
    `encode` and picks the rows. The projections and the feed-forward block run on the N positions; only the
    attention itself needs each row's queries together, padded to the longest row's count with zero queries whose
    outputs are dropped.
    """
    import torch

    if fam.name not in LAST_LAYER_AT or positions.numel() == 0:
        hidden = encode(fam, encoder, input_ids, attention_mask, token_type_ids, position_ids)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    # where each position sits in its row's padded query block; the longest row's count is a host sync, taken here,
    # next to the caller's `nonzero`, rather than after the first layers have been queued (on a GPU)
    b, t = input_ids.shape
    row, pos = positions // t, positions % t
    counts = torch.bincount(row, minlength=b)
    slot = torch.arange(len(positions), device=positions.device) - (torch.cumsum(counts, 0) - counts)[row]
    rows = int(counts.max())
    token_type_ids, position_ids = _embedding_ids(fam, encoder, token_type_ids, position_ids)
    h = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
    if hasattr(encoder, "embeddings_project"):  # ELECTRA's factorised embeddings
        h = encoder.embeddings_project(h)
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=h, attention_mask=attention_mask)
    layers = encoder.encoder.layer
    for layer in layers[:-1]:
        h = layer(h, mask)  # through each layer's own __call__: activation checkpointing applies as in `encode`
    last = layers[-1]
    width = h.shape[-1]
    at = h.reshape(-1, width).index_select(0, positions)  # [N, H]
    attn = last.attention.self
    d = attn.attention_head_size
    q_at = attn.query(at)
    q = q_at.new_zeros(b, rows, q_at.shape[-1]).index_put((row, slot), q_at).view(b, rows, -1, d).transpose(1, 2)
    k = attn.key(h).view(b, t, -1, d).transpose(1, 2)
    v = attn.value(h).view(b, t, -1, d).transpose(1, 2)
    if mask is not None and mask.dim() == 4 and mask.shape[2] != 1:  # per-query rows (block-diagonal): ours only
        idx = torch.zeros(b, rows, dtype=torch.long, device=positions.device).index_put((row, slot), pos)
        mask = mask.gather(2, idx[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    # the layer's own choice, as BertSelfAttention makes it (RoBERTa's and ELECTRA's eager functions are copies)
    kernel = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    ctx, _ = kernel(attn, q, k, v, mask, dropout=attn.dropout.p if attn.training else 0.0, scaling=attn.scaling)
    ctx = ctx.reshape(b, rows, -1)[row, slot]  # [N, H]: back to the positions; the rest (per position) on N rows
    return last.feed_forward_chunk(last.attention.output(ctx, at))


def _modernbert_masks(config, block: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModernBERT's masks for a packed row's block-diagonal one. transformers passes a 4D mask through unchanged to
    every layer, so its local-attention layers would attend across the whole sample: they get the block mask cut to
    their window (|i - j| <= config.sliding_window, the half-window: what transformers builds from a [B, T] mask)."""
    import torch

    t = block.shape[-1]
    pos = torch.arange(t, device=block.device)
    band = (pos[:, None] - pos[None, :]).abs() <= config.sliding_window
    return {"full_attention": block, "sliding_attention": block & band}


def _deberta_encode(encoder, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
    """DeBERTa's embeddings take the [B, T] padding mask and its encoder a [B, T, T] one; relative positions make
    the packed samples' restarted position ids unnecessary (i - j is the same inside any sample)."""
    if attention_mask.dim() == 4:
        pair = attention_mask[:, 0]
        pad = (input_ids != encoder.config.pad_token_id).long()  # padding rows attend to themselves in `pair`
    else:
        pair, pad = attention_mask, attention_mask
    emb = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=pad)
    return encoder.encoder(emb, pair, output_hidden_states=False, return_dict=True).last_hidden_state


def mlm_head(fam: Family, hf_model) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [M, H] -> vocabulary logits [M, V] through the family's own (tied) MLM head."""
    n = fam.name
    if n == "bert":
        return hf_model.cls.predictions  # BertForPreTraining and BertForMaskedLM both
    if n == "roberta":
        return hf_model.lm_head
    if n == "albert":
        return hf_model.predictions
    if n == "electra":
        return lambda h: hf_model.generator_lm_head(hf_model.generator_predictions(h))
    if n == "modernbert":
        return lambda h: hf_model.decoder(hf_model.head(h))
    if getattr(hf_model, "legacy", True):  # deberta_v2
        return hf_model.cls
    return lambda h: hf_model.lm_predictions(h, hf_model.deberta.embeddings.word_embeddings)


def no_pooler(fam: Family) -> dict:
    """Constructor kwargs of the family's bare encoder without its pooler (BERT, RoBERTa, ALBERT have one)."""
    import inspect

    params = inspect.signature(fam.hf_class("Model").__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in params else {}


def counted_parameters(model_cfg, task_cfg, vocab_size: int) -> tuple[int, int]:
    """(parameters of the model a pretraining job trains, those of its largest single module as DeepSpeed's ZeRO-3
    counts a module: its own, not its children's), exact for every family: the model is built on the meta device
    (no memory, no init). ALBERT's shared layer and factorised embedding, RTD's generator (sharing the word
    embeddings) and the span-boundary head are counted as they are, which a closed formula for BERT is not."""
    import torch

    from orchestrator.model.build import build_pretraining_model

    with torch.device("meta"):
        if getattr(task_cfg, "objective", "mlm") == "rtd":
            from orchestrator.model.rtd import build_rtd_model

            model = build_rtd_model(model_cfg, vocab_size, {"pad_token_id": 0}, task_cfg, seed=0)
        else:
            model = build_pretraining_model(model_cfg, vocab_size, 0, bool(task_cfg.nsp or task_cfg.sop), seed=0,
                                            sbo_positions=task_cfg.max_seq_length if task_cfg.sbo else 0)
    total = sum(p.numel() for p in model.parameters())  # tied and shared parameters once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest
