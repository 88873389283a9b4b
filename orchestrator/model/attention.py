"""Attention on a CPU under bf16 autocast: two bf16 matmuls around a bf16 softmax, in place of PyTorch's SDPA kernels.

On a CPU, SDPA's math kernel runs a bf16 attention in fp32 and then applies its "safe softmax" (an `isneginf`, an
`all` and a `where` over every [B, H, T, T] score tensor, for rows with nothing to attend to), and its flash kernel's
bf16 backward is slower still at BERT lengths. The computation here is transformers' `eager_attention_forward` with
two passes over the score tensor fewer each way: a boolean mask becomes an additive one ([B, 1, T, T], the dtype's
minimum where not attending) added to the scores in place (where `masked_fill` makes a copy forward and another
backward), and the softmax takes and gives bf16 (PyTorch's CPU kernel computes it in fp32 inside, so its output is
the fp32 softmax rounded once, as eager's `.to(bf16)` of it) instead of an fp32 copy of the scores and a cast back.
A row with nothing to attend to would softmax to a uniform row, where SDPA gives zeros; the collate never makes one:
padding queries attend to themselves. One layer of the mini shape (B=32, 4 heads, T=128, d=64), forward and
backward, on the 2-core AVX-512 CPU: 7.6 ms, against 16.7 ms for eager's computation and 18.4 ms for SDPA's math
kernel (27.9 ms flash).

It is used only where `engine.attention` resolves to "manual" (the "auto" choice on a CPU under bf16) and only for
CPU bf16 inputs; anything else (fp32 evaluation, GPUs, causal or GQA attention) goes to transformers' SDPA function
unchanged. The choice is made from the model's config and the inputs, not from a context, so activation
checkpointing's recomputation (outside the forward's context, under the same autocast) takes the same path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "orchestrator_cpu_bf16"


def cpu_bf16_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature; returns ([B, T, H, D] output, None) as its SDPA function does."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)  # SDPA's function's default
    plain = (query.device.type == "cpu" and query.dtype == torch.bfloat16 and not causal
             and getattr(module, "num_key_value_groups", 1) == 1 and kwargs.get("position_bias") is None
             and kwargs.get("softcap") is None)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(2, 3))
    if attention_mask is not None:  # added in place: nothing to save, nothing to do in the backward
        if attention_mask.dtype == torch.bool:  # True: attend
            bias = torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device)
            scores = scores.add_(bias.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min))
        else:  # additive
            scores = scores.add_(attention_mask.to(scores.dtype))
    probs = torch.softmax(scores, dim=-1)  # bf16 in and out, computed in fp32 inside the CPU kernel
    if dropout > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, cpu_bf16_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # padding masks are built as for SDPA (boolean, or none at all)


def use_cpu_bf16_attention(model: torch.nn.Module) -> bool:
    """Switch a model on transformers' SDPA path to the function above (its config is shared by every layer), and
    a distillation's frozen teacher, which is kept out of the module tree. Models on another path (DeBERTa's own
    eager attention) are left as they are. Returns whether it switched."""
    switched = False
    teacher = getattr(model, "teacher", None)
    for m in [*model.modules(), *(teacher.modules() if isinstance(teacher, torch.nn.Module) else ())]:
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = NAME
            switched = True
    return switched
