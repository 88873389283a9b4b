"""Model stage: a family's Hugging Face classes (families.py); the MLM decoder runs only on masked positions."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def special_ids(tokenizer) -> dict[str, int]:
    """The token ids a family's config records (padding; [CLS]/<s> and [SEP]/</s> for RoBERTa and ModernBERT)."""
    return {k: getattr(tokenizer, k) for k in ("pad_token_id", "cls_token_id", "sep_token_id")
            if getattr(tokenizer, k, None) is not None}


def bert_config(model_cfg, vocab_size: int, pad_token_id: int = 0):
    """The transformers config of the job's model (any family; the name is kept for BERT, the first of them)."""
    from orchestrator.model.families import hf_config

    return hf_config(model_cfg, vocab_size, {"pad_token_id": pad_token_id})


class PretrainingModel(nn.Module):
    """A family's Hugging Face pretraining class driven so that only masked positions reach the vocabulary decoder.

    Packed rows carry several samples: `position_ids` restart per sample, `attention_mask` is a
    block-diagonal boolean mask [B, 1, T, T], and NSP reads each sample's own [CLS] (`cls_positions`).
    The wrapped HF model is what gets exported (`save_pretrained`): BERT as `BertForPreTraining` (its NSP head
    included), every other family as its `...ForMaskedLM`, so the export loads with `AutoModelForMaskedLM`.
    """

    def __init__(self, config, nsp: bool, src: Optional[str] = None, sbo_positions: int = 0):
        super().__init__()
        from orchestrator.model.families import family_of_config, set_attention

        self.family = family_of_config(config)
        set_attention(config, self.family)
        # BERT's pretraining class holds its NSP head, ALBERT's its sentence-order head (loaded when SOP is on)
        pretraining = self.family.next_sentence or (nsp and self.family.name == "albert")
        self.pair = "sop" if self.family.name == "albert" else "nsp"  # the sentence-pair objective's name
        hf_class = self.family.hf_class("ForPreTraining" if pretraining else "ForMaskedLM")
        self.hf = hf_class(config) if src is None else hf_class.from_pretrained(
            src, config=config, local_files_only=True)
        self.nsp = nsp
        self.sbo = None  # SpanBERT's span-boundary head (task.sbo): pretraining only, not part of the export
        if sbo_positions:
            from orchestrator.model.sbo import SpanBoundaryHead

            self.sbo = SpanBoundaryHead(config.hidden_size, sbo_positions, getattr(config, "layer_norm_eps", 1e-12))

    @classmethod
    def from_pretrained(cls, src: str) -> "PretrainingModel":
        """A saved masked-LM dir (one of our exports, or any of the families' HF dirs) as a PretrainingModel."""
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(str(src), local_files_only=True), nsp=False, src=str(src))

    def masked(self, input_ids, token_type_ids, position_ids, attention_mask, mlm_labels, sbo_left=None,
               sbo_right=None, cls_index=None, every_position=False):
        """(hidden states [B, T, H] with `every_position`, else None; fp32 vocabulary logits of the masked positions
        [M, V]; their targets [M]; the last hidden states at `cls_index` [S, H], or None without it).

        Without `every_position` the last layer runs only where these outputs read it (`encode_at`): the masked
        positions, their span boundaries and the [CLS] positions. With the span-boundary head and boundaries given
        (flat indices b * T + position per masked token), the logits are [2M, V]: the M MLM rows, then the M
        span-boundary rows, through one call of the vocabulary head.
        """
        from orchestrator.model.families import backbone, encode, encode_at, mlm_head

        flat_labels = mlm_labels.reshape(-1)
        masked = (flat_labels != -100).nonzero(as_tuple=True)[0]
        wanted = [masked]
        sbo = self.sbo is not None and sbo_left is not None
        if sbo:
            left = sbo_left.reshape(-1).index_select(0, masked)
            right = sbo_right.reshape(-1).index_select(0, masked)
            wanted += [left, right]
        if cls_index is not None:
            wanted.append(cls_index)
        args = (self.family, backbone(self.hf), input_ids, attention_mask, token_type_ids, position_ids)
        hidden = None
        if every_position:
            hidden = encode(*args)
            flat = hidden.reshape(-1, hidden.shape[-1])
            rows = [flat.index_select(0, w) for w in wanted]
        elif len(wanted) == 1:  # MLM alone: `masked` is already sorted and unique
            rows = [encode_at(*args, masked)]
        else:
            positions, inverse = torch.cat(wanted).unique(sorted=True, return_inverse=True)
            rows = list(encode_at(*args, positions).index_select(0, inverse).split([len(w) for w in wanted]))
        head_in = rows[0]
        if sbo:
            head_in = torch.cat([head_in, self.sbo(rows[1], rows[2], masked - left - 1)])
        logits = mlm_head(self.family, self.hf)(head_in)  # [M, V]: the sparse MLM head
        # the loss in fp32 under bf16; argmax on this copy too (bf16 argmax is ~2x slower on CPU)
        return hidden, logits.float(), flat_labels.index_select(0, masked), rows[-1] if cls_index is not None else None

    def forward(self, input_ids, token_type_ids, position_ids, attention_mask, mlm_labels, cls_index=None, nsp_labels=None,
                sbo_left=None, sbo_right=None):
        pair = self.nsp and nsp_labels is not None
        _, logits, targets, cls_hidden = self.masked(input_ids, token_type_ids, position_ids, attention_mask,
                                                     mlm_labels, sbo_left, sbo_right, cls_index if pair else None)
        sbo_logits = logits[len(targets):]
        logits = logits[: len(targets)]
        mlm_loss = nn.functional.cross_entropy(logits, targets)
        with torch.no_grad():
            mlm_correct = (logits.argmax(-1) == targets).sum()
        result = {
            "loss": mlm_loss,
            "mlm_loss": mlm_loss.detach(),
            "mlm_correct": mlm_correct,
            "mlm_count": torch.tensor(len(targets), device=logits.device),
        }
        if self.sbo is not None and sbo_left is not None:  # SpanBERT: loss = MLM + SBO, both over the span tokens
            sbo_loss = nn.functional.cross_entropy(sbo_logits, targets)
            result["loss"] = result["loss"] + sbo_loss
            result["sbo_loss"] = sbo_loss.detach()
            with torch.no_grad():
                result["sbo_correct"] = (sbo_logits.argmax(-1) == targets).sum()
            result["sbo_count"] = result["mlm_count"]
        if pair:  # NSP (BERT) or SOP (ALBERT): one label per packed sample
            # cls_index: flat indices (b * T + position) of every packed sample's [CLS]
            if self.pair == "sop":
                albert = self.hf.albert
                pair_logits = self.hf.sop_classifier(albert.pooler_activation(albert.pooler(cls_hidden)))
            else:
                bert = self.hf.bert
                pair_logits = self.hf.cls.seq_relationship(bert.pooler.activation(bert.pooler.dense(cls_hidden)))
            pair_loss = nn.functional.cross_entropy(pair_logits.float(), nsp_labels)
            result["loss"] = result["loss"] + pair_loss
            result[f"{self.pair}_loss"] = pair_loss.detach()
            with torch.no_grad():
                result[f"{self.pair}_correct"] = (pair_logits.argmax(-1) == nsp_labels).sum()
            result[f"{self.pair}_count"] = torch.tensor(len(nsp_labels), device=logits.device)
        return result


BertPretrainingModel = PretrainingModel  # the name of the BERT-only days


def build_pretraining_model(model_cfg, vocab_size: int, pad_token_id: int, nsp: bool, seed: int,
                            special: Optional[dict[str, int]] = None, sbo_positions: int = 0) -> PretrainingModel:
    """sbo_positions > 0 adds SpanBERT's span-boundary head with that many in-span positions."""
    from orchestrator.model.families import hf_config

    torch.manual_seed(seed)  # identical initial weights on every rank and every run
    ids = {"pad_token_id": pad_token_id, **(special or {})}
    return PretrainingModel(hf_config(model_cfg, vocab_size, ids), nsp=nsp, sbo_positions=sbo_positions)


def load_encoder_weights(hf_model, init_from: str, keep_heads: bool) -> None:
    """Copy the encoder (and, for pretraining, the MLM/NSP heads) from init_from into hf_model.

    Refuses a checkpoint of another family, or whose vocabulary or shape differs from the job's model.
    """
    from transformers import AutoConfig

    from orchestrator.errors import ConfigError
    from orchestrator.model.families import backbone, family_of_config
    from orchestrator.plan.inputs import resolve_init_dir

    src = resolve_init_dir(init_from)
    loaded_cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
    mine = hf_model.config
    fam, theirs = family_of_config(mine), family_of_config(loaded_cfg)
    if fam != theirs:
        raise ConfigError("model.family", f"'{src}' holds a {theirs.name} model but the job's model.family is {fam.name}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(loaded_cfg, key) != getattr(mine, key):
            raise ConfigError(
                "train.init_from",
                f"'{src}' has {key}={getattr(loaded_cfg, key)} but the job's model has {getattr(mine, key)}",
            )
    if keep_heads:
        loaded = type(hf_model).from_pretrained(str(src), local_files_only=True)
        hf_model.load_state_dict(loaded.state_dict(), strict=False)
    else:
        encoder, info = fam.hf_class("Model").from_pretrained(str(src), local_files_only=True, output_loading_info=True)
        # transformers fills weights absent from the files with random ones and only warns: refuse instead
        absent = [k for k in info.get("missing_keys", []) if not k.startswith("pooler")]
        if absent:
            raise ConfigError("train.init_from", f"'{src}' lacks {len(absent)} encoder weights, e.g. {sorted(absent)[:3]}")
        state = encoder.state_dict()
        target = backbone(hf_model)  # a head model's encoder, or a bare encoder (embed)
        if getattr(target, "pooler", None) is None:  # token classification / QA heads have no pooler
            state = {k: v for k, v in state.items() if not k.startswith("pooler")}
        missing, unexpected = target.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError("train.init_from", f"'{src}' has weights the encoder does not: {unexpected[:3]}")
