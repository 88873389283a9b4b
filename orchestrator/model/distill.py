"""Distillation (task=distill): DistilBERT's recipe (Sanh et al. 2019) on our pretraining batches.

The student is the teacher's family and shape with fewer layers, initialised from the teacher: embeddings, heads and
every other layer (DistilBERT's 12 -> 6 takes layers 0, 2, 4, 7, 9, 11: evenly spread, first and last kept).
Its loss is  alpha_kl * T^2 * KL(teacher_T || student_T)  at the masked positions,  + alpha_mlm * MLM,
+ alpha_cos * (1 - cos(student, teacher last hidden states))  over the real tokens.

The teacher is frozen (eval mode, no gradients) and kept out of the module tree: the engine, the optimizer, the
checkpoints see the student only, and the export is the student's. Under engine=zero3 the teacher is sharded too:
its own DeepSpeed ZeRO-3 inference engine (no optimizer) partitions its weights across the workers and gathers each
layer's for its forward, so a teacher larger than one worker's memory fits (`shard_teacher`, called by the engine;
a `teacher_sharded` event in metrics.jsonl records the elements each worker holds). Below ZeRO-3 it is replicated.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from orchestrator.model.build import PretrainingModel

_LAYER = re.compile(r"\.(layer|layers)\.(\d+)\.")


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers the student's are copied from: evenly spread, the first and the last kept."""
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def student_of(teacher: PretrainingModel, layers: int, seed: int) -> PretrainingModel:
    """The teacher's config with `layers` layers, every weight copied from the teacher (layer j from
    kept_layers[j]). Refuses nothing silently: a student weight without a teacher source raises."""
    config = copy.deepcopy(teacher.hf.config)
    kept = kept_layers(config.num_hidden_layers, layers)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):  # ModernBERT: each layer's attention kind (local / global)
        config.layer_types = [config.layer_types[i] for i in kept]
    torch.manual_seed(seed)
    student = PretrainingModel(config, nsp=False)
    source = teacher.hf.state_dict()
    state = {}
    for key, value in student.hf.state_dict().items():
        theirs = _LAYER.sub(lambda m: f".{m.group(1)}.{kept[int(m.group(2))]}.", key)
        if theirs not in source or source[theirs].shape != value.shape:
            raise ValueError(f"student weight {key} has no teacher weight {theirs} of shape {tuple(value.shape)}")
        state[key] = source[theirs]
    student.hf.load_state_dict(state)
    return student


class DistillModel(nn.Module):
    """The student (the only submodule) and its frozen teacher; forward returns the pretraining outputs."""

    def __init__(self, student: PretrainingModel, teacher: PretrainingModel, pad_id: int, temperature: float,
                 alpha_kl: float, alpha_mlm: float, alpha_cos: float):
        super().__init__()
        self.student = student
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: no optimizer state, no checkpoint, no ZeRO
        self.pad_id, self.T = pad_id, temperature
        self.alpha = (alpha_kl, alpha_mlm, alpha_cos)
        self.events: list[dict] = []  # what the trainer writes to metrics.jsonl when the run starts

    def shard_teacher(self, ds_config: dict) -> None:
        """ZeRO-3 inference for the teacher: the student's precision and parameter offload, no optimizer."""
        import deepspeed

        cfg = {"train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
               "gradient_accumulation_steps": 1,
               "bf16": ds_config.get("bf16", {"enabled": False}), "fp16": ds_config.get("fp16", {"enabled": False}),
               "zero_optimization": {"stage": 3, **{k: v for k, v in ds_config["zero_optimization"].items()
                                                    if k == "offload_param"}}}
        engine, *_ = deepspeed.initialize(model=self.teacher, config=cfg)
        teacher = engine.module.eval()
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "_teacher_engine", engine)  # keeps the partitioning hooks alive
        params = list(teacher.parameters())
        self.events.append({"event": "teacher_sharded", "zero_stage": 3,
                            "teacher_params": int(sum(getattr(p, "ds_numel", p.numel()) for p in params)),
                            "teacher_params_held": int(sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                                           for p in params))})

    @property
    def hf(self):  # what the task exports and checkpoints against: the student's HF model
        return self.student.hf

    def forward(self, input_ids, token_type_ids, position_ids, attention_mask, mlm_labels, cls_index=None,
                nsp_labels=None):
        inputs = (input_ids, token_type_ids, position_ids, attention_mask, mlm_labels)
        hidden, logits, targets, _ = self.student.masked(*inputs, every_position=True)  # cosine: every position
        teacher = self.teacher
        if not hasattr(self, "_teacher_engine") and next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            t_hidden, t_logits, _, _ = teacher.masked(*inputs, every_position=True)
        T = self.T
        kl = nn.functional.kl_div(nn.functional.log_softmax(logits / T, -1), nn.functional.log_softmax(t_logits / T, -1),
                                  reduction="batchmean", log_target=True) * T * T
        mlm = nn.functional.cross_entropy(logits, targets)
        real = (input_ids != self.pad_id).reshape(-1)
        h, th = (x.reshape(-1, x.shape[-1])[real].float() for x in (hidden, t_hidden))
        cos = 1.0 - nn.functional.cosine_similarity(h, th, dim=-1).mean()
        a_kl, a_mlm, a_cos = self.alpha
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum()
        return {
            "loss": a_kl * kl + a_mlm * mlm + a_cos * cos,
            "mlm_loss": mlm.detach(),
            "mlm_correct": correct,
            "mlm_count": torch.tensor(len(targets), device=hidden.device),
            "distill_kl": kl.detach(),
            "distill_cos": cos.detach(),
        }


def build_distill_model(job, pad_id: int) -> DistillModel:
    from orchestrator.plan.inputs import resolve_init_dir

    t = job.task
    teacher = PretrainingModel.from_pretrained(str(resolve_init_dir(t.distill_from, "task.distill_from")))
    student = student_of(teacher, job.model.num_hidden_layers, job.train.seed)
    return DistillModel(student, teacher, pad_id, t.distill_temperature, t.distill_alpha_kl, t.distill_alpha_mlm,
                        t.distill_alpha_cos)
