"""Serving stage: the torch module that is exported, per task. Inputs are always (input_ids, attention_mask,
token_type_ids), right-padded; outputs are the task's (serve/tasks.py HEADS). For embed the sentence-transformers
pooling (and Normalize) runs inside the module, so ONNX Runtime returns sentence embeddings directly. The model is
loaded with attn_implementation="eager": plain MatMul/Softmax attention, which int8 quantisation covers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.serve.tasks import HEADS, pooling_of


class TaskHead(torch.nn.Module):
    """A transformers model whose named outputs are returned as a tuple (the ONNX graph's outputs, in order)."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return tuple(out[k] for k in self.outputs)


class PooledEncoder(torch.nn.Module):
    """A BertModel and sentence-transformers' pooling: the sentence embedding of each (right-padded) row."""

    def __init__(self, model: torch.nn.Module, modes: tuple[str, ...], normalize: bool):
        super().__init__()
        self.model, self.modes, self.normalize = model, modes, normalize

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        vecs = []
        for mode in self.modes:
            if mode == "cls":
                vecs.append(h[:, 0])
            elif mode == "max":
                vecs.append(h.masked_fill(m == 0, float("-inf")).max(dim=1).values)
            elif mode == "lasttoken":
                last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
                vecs.append(torch.gather(h, 1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1))
            else:  # mean, mean_sqrt_len_tokens
                n = m.sum(dim=1).clamp(min=1e-9)
                vecs.append((h * m).sum(dim=1) / (n if mode == "mean" else n.sqrt()))
        e = torch.cat(vecs, dim=-1) if len(vecs) > 1 else vecs[0]
        return (torch.nn.functional.normalize(e, p=2, dim=1),) if self.normalize else (e,)


def load_module(export: Path, task: str) -> torch.nn.Module:
    """The export's model (fp32, eval mode, eager attention) wrapped for its task."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _, auto, outputs = HEADS[task]
    model = getattr(transformers, auto).from_pretrained(str(export), attn_implementation="eager", dtype=torch.float32,
                                                        local_files_only=True).eval()
    if task == "embed":
        modes, normalize = pooling_of(export)
        return PooledEncoder(model, modes, normalize).eval()
    return TaskHead(model, outputs).eval()
