"""SpanBERT's span-boundary objective (Joshi et al. 2020), a small head transformers does not have.

Each token x_i of a masked span (x_s .. x_e) is predicted again from the encoder states of the span's two boundary
tokens x_{s-1}, x_{e+1} and a learned embedding of its position in the span (i - s):
    h = LayerNorm(GELU(W2 LayerNorm(GELU(W1 [x_{s-1}; x_{e+1}; p_{i-s}]))))
The result goes through the family's own masked-LM head (its transform and the decoder tied to the word
embeddings), so the vocabulary projection is shared with the MLM loss as in the paper, ALBERT's factorised
embeddings need nothing extra, and ZeRO-3 partitions it like every other module.
"""

from __future__ import annotations

import torch
from torch import nn


class SpanBoundaryHead(nn.Module):
    def __init__(self, hidden: int, positions: int, eps: float = 1e-12):
        super().__init__()
        self.positions = nn.Embedding(positions, hidden)
        self.fc1, self.ln1 = nn.Linear(3 * hidden, hidden), nn.LayerNorm(hidden, eps=eps)
        self.fc2, self.ln2 = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps)

    def forward(self, left: torch.Tensor, right: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """left, right: boundary states [M, H]; offset: position in the span [M] -> span representations [M, H]."""
        offset = offset.clamp(0, self.positions.num_embeddings - 1)
        h = torch.cat([left, right, self.positions(offset).to(left.dtype)], dim=-1)
        h = self.ln1(nn.functional.gelu(self.fc1(h)))
        return self.ln2(nn.functional.gelu(self.fc2(h)))
