"""Replaced-token detection (task.objective=rtd): ELECTRA (Clark et al. 2020) and DeBERTa-v3 (He et al. 2021).

A small generator (the job's family with task.rtd_generator_layers layers, half by default, as DeBERTa-v3) is a
masked LM on the masked positions; its samples replace those tokens, and the discriminator (the job's model) says
for every real token whether it was replaced. Loss = generator MLM + task.rtd_weight (50, ELECTRA's) x
discriminator BCE. The two share the word embeddings (ELECTRA's sharing; DeBERTa-v3's gradient-disentangled
variant is not done here). The discriminator is what is exported: ELECTRA as `ElectraForPreTraining` (its own RTD
head, `AutoModelForPreTraining`), the other families as their bare encoder (`AutoModel`; the RTD head written here
is a pretraining-only head, as DeBERTa-v3's is), which fine-tuning takes with train.init_from.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from orchestrator.model.build import PretrainingModel


class RTDHead(nn.Module):
    """ELECTRA's discriminator head (dense, activation, one logit per token) for families transformers has none for."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.gelu(self.dense(h))).squeeze(-1)


class RTDModel(nn.Module):
    def __init__(self, config, generator_layers: int, weight: float):
        super().__init__()
        from orchestrator.model.families import backbone, family_of_config, no_pooler, set_attention

        self.family = family_of_config(config)
        set_attention(config, self.family)
        if self.family.name == "electra":
            from transformers import ElectraForPreTraining

            self.disc = ElectraForPreTraining(config)
            self.head = None
        else:
            self.disc = self.family.hf_class("Model")(config, **no_pooler(self.family))
            self.head = RTDHead(config.hidden_size)
        gen_config = copy.deepcopy(config)
        gen_config.num_hidden_layers = generator_layers
        if getattr(gen_config, "layer_types", None):  # ModernBERT: one attention kind per layer
            gen_config.layer_types = gen_config.layer_types[:generator_layers]
        self.gen = PretrainingModel(gen_config, nsp=False)
        backbone(self.gen.hf).set_input_embeddings(backbone(self.disc).get_input_embeddings())  # shared embeddings
        self.gen.hf.tie_weights()  # the generator's decoder follows the shared embedding
        self.weight = weight

    @property
    def hf(self):  # exported, checkpointed against, initialised by train.init_from: the discriminator
        return self.disc

    def forward(self, input_ids, token_type_ids, position_ids, attention_mask, mlm_labels, cls_index=None,
                nsp_labels=None):
        from orchestrator.model.families import backbone, encode

        _, logits, targets, _ = self.gen.masked(input_ids, token_type_ids, position_ids, attention_mask, mlm_labels)
        gen_loss = nn.functional.cross_entropy(logits, targets)
        flat = mlm_labels.reshape(-1)
        masked = (flat != -100).nonzero(as_tuple=True)[0]
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)  # the generator's guesses
            original = torch.where(mlm_labels != -100, mlm_labels, input_ids).reshape(-1)
            corrupted = original.clone()
            corrupted[masked] = sampled
            replaced = (corrupted != original).float()
            gen_correct = (logits.argmax(-1) == targets).sum()
        corrupted = corrupted.view_as(input_ids)
        hidden = encode(self.family, backbone(self.disc), corrupted, attention_mask, token_type_ids, position_ids)
        scores = self.disc.discriminator_predictions(hidden) if self.head is None else self.head(hidden)
        real = (input_ids != backbone(self.disc).config.pad_token_id).reshape(-1)
        scores, replaced = scores.reshape(-1)[real].float(), replaced[real]
        disc_loss = nn.functional.binary_cross_entropy_with_logits(scores, replaced)
        with torch.no_grad():
            rtd_correct = ((scores > 0).float() == replaced).sum()
        return {
            "loss": gen_loss + self.weight * disc_loss,
            "mlm_loss": gen_loss.detach(),  # the generator's: held-out MLM accuracy stays comparable
            "mlm_correct": gen_correct,
            "mlm_count": torch.tensor(len(targets), device=input_ids.device),
            "rtd_loss": disc_loss.detach(),
            "rtd_correct": rtd_correct,
            "rtd_count": torch.tensor(len(replaced), device=input_ids.device),
            "rtd_replaced": replaced.sum(),
        }


def build_rtd_model(model_cfg, vocab_size: int, special: dict, task, seed: int) -> RTDModel:
    from orchestrator.model.families import hf_config

    torch.manual_seed(seed)
    layers = task.rtd_generator_layers or max(1, model_cfg.num_hidden_layers // 2)
    return RTDModel(hf_config(model_cfg, vocab_size, special), layers, task.rtd_weight)
