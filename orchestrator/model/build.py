"""Model stage: Hugging Face BERT classes with SDPA attention; the MLM decoder runs only on masked positions."""

from __future__ import annotations

import torch
from torch import nn


def bert_config(model_cfg, vocab_size: int, pad_token_id: int = 0):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        intermediate_size=model_cfg.intermediate_size,
        max_position_embeddings=model_cfg.max_position_embeddings,
        type_vocab_size=model_cfg.type_vocab_size,
        hidden_dropout_prob=model_cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=model_cfg.attention_probs_dropout_prob,
        hidden_act=model_cfg.hidden_act,
        layer_norm_eps=model_cfg.layer_norm_eps,
        initializer_range=model_cfg.initializer_range,
        pad_token_id=pad_token_id,
    )


class BertPretrainingModel(nn.Module):
    """`transformers.BertForPreTraining` driven so that only masked positions reach the vocabulary decoder.

    Packed rows carry several samples: `position_ids` restart per sample, `attention_mask` is a
    block-diagonal boolean mask [B, 1, T, T], and NSP reads each sample's own [CLS] (`cls_positions`).
    The wrapped HF model is what gets exported (`save_pretrained`), so the export loads with
    `BertForPreTraining` / `BertForMaskedLM` / `BertModel.from_pretrained`.
    """

    def __init__(self, config, nsp: bool):
        super().__init__()
        from transformers import BertForPreTraining

        config._attn_implementation = "sdpa"
        self.hf = BertForPreTraining(config)
        self.nsp = nsp

    def forward(self, input_ids, token_type_ids, position_ids, attention_mask, mlm_labels, cls_index=None, nsp_labels=None):
        bert = self.hf.bert
        out = bert(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            return_dict=True,
        )
        hidden = out.last_hidden_state  # [B, T, H]
        flat_labels = mlm_labels.reshape(-1)
        masked = (flat_labels != -100).nonzero(as_tuple=True)[0]
        masked_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked)
        logits = self.hf.cls.predictions(masked_hidden)  # [M, V]: the sparse MLM head
        targets = flat_labels.index_select(0, masked)
        logits = logits.float()  # the loss in fp32 under bf16; argmax on this copy too (bf16 argmax is ~2x slower on CPU)
        mlm_loss = nn.functional.cross_entropy(logits, targets)
        with torch.no_grad():
            mlm_correct = (logits.argmax(-1) == targets).sum()
        result = {
            "loss": mlm_loss,
            "mlm_loss": mlm_loss.detach(),
            "mlm_correct": mlm_correct,
            "mlm_count": torch.tensor(len(targets), device=hidden.device),
        }
        if self.nsp and nsp_labels is not None:
            # cls_index: flat indices (b * T + position) of every packed sample's [CLS]
            cls_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, cls_index)
            pooled = bert.pooler.activation(bert.pooler.dense(cls_hidden))
            nsp_logits = self.hf.cls.seq_relationship(pooled)
            nsp_loss = nn.functional.cross_entropy(nsp_logits.float(), nsp_labels)
            result["loss"] = mlm_loss + nsp_loss
            result["nsp_loss"] = nsp_loss.detach()
            with torch.no_grad():
                result["nsp_correct"] = (nsp_logits.argmax(-1) == nsp_labels).sum()
            result["nsp_count"] = torch.tensor(len(nsp_labels), device=hidden.device)
        return result


def build_pretraining_model(model_cfg, vocab_size: int, pad_token_id: int, nsp: bool, seed: int) -> BertPretrainingModel:
    torch.manual_seed(seed)  # identical initial weights on every rank and every run
    model = BertPretrainingModel(bert_config(model_cfg, vocab_size, pad_token_id), nsp=nsp)
    return model


def load_encoder_weights(hf_model, init_from: str, keep_heads: bool) -> None:
    """Copy the encoder (and, for pretraining, the MLM/NSP heads) from init_from into hf_model.

    Refuses a checkpoint whose vocabulary or shape differs from the job's model.
    """
    from transformers import BertModel

    from orchestrator.errors import ConfigError

    from orchestrator.plan.inputs import resolve_init_dir

    src = resolve_init_dir(init_from)
    loaded_cfg = type(hf_model.config).from_pretrained(str(src), local_files_only=True)
    mine = hf_model.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(loaded_cfg, key) != getattr(mine, key):
            raise ConfigError(
                "train.init_from",
                f"'{src}' has {key}={getattr(loaded_cfg, key)} but the job's model has {getattr(mine, key)}",
            )
    if keep_heads:
        from transformers import BertForPreTraining

        loaded = BertForPreTraining.from_pretrained(str(src), local_files_only=True)
        hf_model.load_state_dict(loaded.state_dict(), strict=False)
    else:
        encoder, info = BertModel.from_pretrained(str(src), local_files_only=True, add_pooling_layer=True,
                                                  output_loading_info=True)
        # transformers fills weights absent from the files with random ones and only warns: refuse instead
        absent = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
        if absent:
            raise ConfigError("train.init_from", f"'{src}' lacks {len(absent)} encoder weights, e.g. {sorted(absent)[:3]}")
        state = encoder.state_dict()
        target = getattr(hf_model, "bert", hf_model)  # a head model's encoder, or a bare BertModel (embed)
        if getattr(target, "pooler", None) is None:  # token classification / QA heads have no pooler
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        missing, unexpected = target.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError("train.init_from", f"'{src}' has weights the encoder does not: {unexpected[:3]}")
