"""Data stage (worker side): pretraining rows — a row index and an epoch become masked model inputs.

The masking RNG is seeded by (seed, epoch, row), so the same row gets the same masks whatever the world size,
rank or resume point. Both the cached arrays (data/pretraining.py) and the prepared shards (data/sharded.py)
serve rows through `PretrainingRows`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EVAL_EPOCH = 2**31 - 1  # masking seed of the held-out split: fixed, so evaluations are comparable


def sample_lengths(samples: np.ndarray) -> np.ndarray:
    a = samples[:, 1] - samples[:, 0]
    b = np.where(samples[:, 2] >= 0, samples[:, 3] - samples[:, 2], 0)
    return a + b + np.where(samples[:, 2] >= 0, 3, 2)


@dataclass(frozen=True)
class PreparedData:
    data_dir: str
    tokenizer_dir: str
    train_rows: int
    eval_rows: int
    train_tokens: int
    vocab_size: int
    most_frequent_token_id: int
    seconds: float
    tokens_per_second: float
    cached: bool


@dataclass(frozen=True)
class MaskingSpec:
    mlm_probability: float
    mask_replace_prob: float
    random_replace_prob: float
    unit: str  # token | whole_word | span
    span_geometric_p: float
    span_max_length: int
    mask_id: int
    cls_id: int
    sep_id: int
    pad_id: int


class PretrainingRows:
    """Memory-mapped rows of one split; `row(i, epoch)` builds the masked model inputs of row i."""

    def __init__(self, split_dir: str | os.PathLike, spec: MaskingSpec, vocab_size: int, continuation: np.ndarray,
                 seed: int, nsp: bool, special_ids: np.ndarray, sbo: bool = False):
        d = Path(split_dir)
        self.tokens = np.load(d / "tokens.npy", mmap_mode="r")
        self.samples = np.load(d / "samples.npy", mmap_mode="r")
        self.row_offsets = np.load(d / "row_offsets.npy", mmap_mode="r")
        self.row_samples = np.load(d / "row_samples.npy", mmap_mode="r")
        self.spec = spec
        self.seed = seed
        self.nsp = nsp
        self.sbo = sbo  # SpanBERT's span-boundary objective: each span token's boundary positions
        self.continuation = continuation  # bool per vocab id: WordPiece "##" piece
        candidates = np.setdiff1d(np.arange(vocab_size), special_ids)
        self.random_ids = candidates.astype(np.int64)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def step_order(self, global_batch_size: int, seed: int):
        """Which rows each step consumes: one global permutation per epoch (small corpora)."""
        from orchestrator.data.order import StepOrder

        return StepOrder(len(self), global_batch_size, seed)

    def row_tokens(self, i: int) -> int:
        s = self.samples[self.row_samples[self.row_offsets[i] : self.row_offsets[i + 1]]]
        return int(sample_lengths(np.asarray(s)).sum())

    def row(self, i: int, epoch: int) -> dict[str, np.ndarray]:
        segments = []
        for s_idx in self.row_samples[self.row_offsets[i] : self.row_offsets[i + 1]]:
            a0, a1, b0, b1, label = (int(x) for x in self.samples[s_idx])
            segments.append((self.tokens[a0:a1], self.tokens[b0:b1] if b0 >= 0 else None, label))
        return self.assemble(segments, i, epoch)

    def assemble(self, segments, i: int, epoch: int) -> dict[str, np.ndarray]:
        """Packed row from its samples [(A tokens, B tokens or None, NSP label)], masked for (epoch, row i)."""
        sp = self.spec
        ids: list[np.ndarray] = []
        types: list[np.ndarray] = []
        pos: list[np.ndarray] = []
        seq: list[np.ndarray] = []
        cls_positions: list[int] = []
        nsp_labels: list[int] = []
        cursor = 0
        for k, (a, b, label) in enumerate(segments):
            parts = [np.asarray([sp.cls_id]), a, np.asarray([sp.sep_id])]
            tparts = [np.zeros(len(a) + 2, dtype=np.int64)]
            if b is not None:
                parts += [b, np.asarray([sp.sep_id])]
                tparts.append(np.ones(len(b) + 1, dtype=np.int64))
            sample_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
            n = len(sample_ids)
            ids.append(sample_ids)
            types.append(np.concatenate(tparts))
            pos.append(np.arange(n, dtype=np.int64))
            seq.append(np.full(n, k + 1, dtype=np.int64))
            cls_positions.append(cursor)
            nsp_labels.append(int(label))
            cursor += n
        input_ids = np.concatenate(ids)
        rng = np.random.default_rng([self.seed, epoch & 0x7FFFFFFF, i])
        masked, labels, units = self.mask(input_ids, rng)
        out = {
            "input_ids": masked,
            "token_type_ids": np.concatenate(types),
            "position_ids": np.concatenate(pos),
            "sequence_ids": np.concatenate(seq),
            "mlm_labels": labels,
            "cls_positions": np.asarray(cls_positions, dtype=np.int64),
        }
        if self.nsp:
            out["nsp_labels"] = np.asarray(nsp_labels, dtype=np.int64)
        if self.sbo:
            out["sbo_left"], out["sbo_right"] = span_boundaries(units, len(input_ids))
        return out

    def mask(self, input_ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Select ~mlm_probability of the non-special tokens by unit; 80/10/10 [MASK]/random/keep per unit.

        Returns (masked ids, labels, the selected units: arrays of consecutive positions)."""
        sp = self.spec
        special = (input_ids == sp.cls_id) | (input_ids == sp.sep_id) | (input_ids == sp.pad_id)
        cand = np.flatnonzero(~special)
        labels = np.full(len(input_ids), -100, dtype=np.int64)
        out = input_ids.copy()
        if len(cand) == 0:
            return out, labels, []
        budget = max(1, int(round(len(cand) * sp.mlm_probability)))
        units = self._units(input_ids, cand, special, budget, rng)
        for unit in units:
            labels[unit] = input_ids[unit]
            r = rng.random()
            if r < sp.mask_replace_prob:
                out[unit] = sp.mask_id
            elif r < sp.mask_replace_prob + sp.random_replace_prob:
                out[unit] = rng.choice(self.random_ids, size=len(unit))
        return out, labels, units

    def _words(self, input_ids: np.ndarray, cand: np.ndarray) -> list[np.ndarray]:
        cont = self.continuation[input_ids[cand]]
        # a new word starts at a non-continuation piece or after a gap (special token) in the candidates
        gap = np.ones(len(cand), dtype=bool)
        gap[1:] = np.diff(cand) != 1
        starts = np.flatnonzero(~cont | gap)
        return np.split(cand, starts[1:])

    def _units(self, input_ids, cand, special, budget, rng) -> list[np.ndarray]:
        sp = self.spec
        if sp.unit == "token":
            chosen = rng.choice(cand, size=budget, replace=False)
            return [np.asarray([c]) for c in np.sort(chosen)]
        words = self._words(input_ids, cand)
        if sp.unit == "whole_word":
            units: list[np.ndarray] = []
            total = 0
            for w in rng.permutation(len(words)):
                if total + len(words[w]) > budget:
                    continue
                units.append(words[w])
                total += len(words[w])
                if total >= budget:
                    break
            return units
        # span: SpanBERT — geometric span lengths (in words), clipped; spans never cross a special token
        word_seg = np.cumsum(special)[np.asarray([w[0] for w in words])]
        taken = np.zeros(len(words), dtype=bool)
        units = []
        total = 0
        for _ in range(10 * budget):
            if total >= budget:
                break
            length = min(int(rng.geometric(sp.span_geometric_p)), sp.span_max_length)
            start = int(rng.integers(len(words)))
            span: list[int] = []
            for w in range(start, min(start + length, len(words))):
                if taken[w] or word_seg[w] != word_seg[start]:
                    break
                span.append(w)
            if not span:
                continue
            span_tokens = np.concatenate([words[w] for w in span])
            if total + len(span_tokens) > budget:
                span_tokens = span_tokens[: budget - total]
                if len(span_tokens) == 0:
                    continue
            taken[span] = True
            units.append(span_tokens)
            total += len(span_tokens)
        return units


def span_boundaries(units: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the positions just before and just after the masked span it belongs to (-1 outside spans).

    SpanBERT's boundary tokens x_{s-1} and x_{e+1}; a span never starts at position 0 or ends at the last one, as
    [CLS] and [SEP] are never masked.
    """
    left = np.full(n, -1, dtype=np.int64)
    right = np.full(n, -1, dtype=np.int64)
    for unit in units:
        left[unit] = unit[0] - 1
        right[unit] = unit[-1] + 1
    return left, right


def continuation_mask(tokenizer) -> np.ndarray:
    """Per vocabulary id: the piece continues a word (whole-word and span masking keep words whole). WordPiece marks
    continuations ("##ing"); byte-level BPE marks word starts instead ("Ġword"): there a piece without the mark
    continues the word before it (punctuation too), special tokens excepted."""
    vocab = tokenizer.get_vocab()
    mask = np.zeros(len(vocab), dtype=bool)
    byte_level = any(tok.startswith("\u0120") for tok in vocab)  # "Ġ", the byte-level space
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for tok, idx in vocab.items():
        if idx >= len(mask):
            continue
        mask[idx] = (not tok.startswith("\u0120") and tok not in special) if byte_level else tok.startswith("##")
    return mask
