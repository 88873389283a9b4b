"""Data stage (driver side): pretraining samples — tokenise once into a keyed cache, build (NSP) samples, pack rows.

It imports no torch: it writes numpy arrays the workers memory-map and read through data/rows.py
(`PretrainingRows`; prepared shards through data/sharded.py), masked per (seed, epoch, row).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from orchestrator.data.corpus import Document, corpus_spec, is_eval_document
from orchestrator.data.rows import MaskingSpec, PreparedData, PretrainingRows, continuation_mask, sample_lengths
from orchestrator.data.sharded import ShardedRows, is_prepared_dir, prepared_data
from orchestrator.data.tokenizer import get_tokenizer, open_tokenizer, tokenizer_hash
from orchestrator.io import atomic_save_dir
from orchestrator.errors import DataError

FORMAT_VERSION = 1
_MAX_OPEN_ROWS = 64


# ----------------------------------------------------------------------------------------- tokenising
def _tokenize_split(tokenizer, docs: Iterator[Document], batch_docs: int = 512):
    """Tokenise documents into flat arrays: tokens, sentence offsets, document->sentence offsets."""
    backend = tokenizer.backend_tokenizer
    tokens: list[np.ndarray] = []
    sent_lens: list[int] = []
    doc_sents: list[int] = []
    pending: list[Document] = []

    def flush() -> None:
        flat = [s for d in pending for s in d]
        encs = backend.encode_batch(flat, add_special_tokens=False)  # parallel in Rust threads
        i = 0
        for d in pending:
            n = 0
            for enc in encs[i : i + len(d)]:
                if enc.ids:
                    tokens.append(np.asarray(enc.ids, dtype=np.int32))
                    sent_lens.append(len(enc.ids))
                    n += 1
            i += len(d)
            if n:
                doc_sents.append(n)
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) >= batch_docs:
            flush()
    if pending:
        flush()
    flat_tokens = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int32)
    sent_offsets = np.zeros(len(sent_lens) + 1, dtype=np.int64)
    np.cumsum(sent_lens, out=sent_offsets[1:])
    doc_offsets = np.zeros(len(doc_sents) + 1, dtype=np.int64)
    np.cumsum(doc_sents, out=doc_offsets[1:])
    return flat_tokens, sent_offsets, doc_offsets


# ------------------------------------------------------------------------------------- building samples
def _target_length(rng, max_tokens: int, short_seq_prob: float) -> int:
    """A chunk's token target: max_tokens, or (short_seq_prob of the time) a random shorter one, as BERT does."""
    return int(rng.integers(2, max_tokens + 1)) if rng.random() < short_seq_prob else max_tokens


def _doc_sentence_samples(t0: int, t1: int, max_tokens: int) -> list[tuple[int, int, int, int, int]]:
    """Tokens [t0, t1) of consecutive sentences as samples of at most max_tokens: the first cut at max_tokens, and
    a very long sentence's remainder kept as further samples."""
    return [(a, min(t1, a + max_tokens), -1, -1, 0) for a in range(t0, max(t1, t0 + 1), max_tokens)]


def _random_next_segment(rng, d: int, n_docs: int, target_b: int, sent_offsets, doc_offsets) -> tuple[int, int]:
    """Segment B of a "random next" pair: sentences from a random point of another document, up to target_b tokens."""
    other = int(rng.integers(0, n_docs - 1))
    other = other + 1 if other >= d else other
    o_begin, o_end = int(doc_offsets[other]), int(doc_offsets[other + 1])
    o_s = o_e = int(rng.integers(o_begin, o_end))
    blen = 0
    while o_e < o_end and blen < target_b:
        blen += int(sent_offsets[o_e + 1] - sent_offsets[o_e])
        o_e += 1
    return int(sent_offsets[o_s]), int(sent_offsets[o_e])


def _nsp_pair(rng, c0: int, c1: int, d: int, n_docs: int, target: int, max_tokens: int, sent_offsets,
              doc_offsets) -> tuple[Optional[tuple[int, int, int, int, int]], int]:
    """The NSP pair of sentences [c0, c1) of document d, and the last sentence it used: A is a random-length head of
    the chunk; B is the rest (label 0) or, half of the time, text of another document (label 1, and the chunk's
    unused sentences go back into the pool, as BERT does). Pairs are cut from the longer segment until they fit."""
    n_in_chunk = c1 - c0
    a_end = c0 + (int(rng.integers(1, n_in_chunk)) if n_in_chunk >= 2 else 1)
    a0, a1 = int(sent_offsets[c0]), int(sent_offsets[a_end])
    last_used = c1 - 1
    if (n_in_chunk == 1 or rng.random() < 0.5) and n_docs > 1:
        b0, b1 = _random_next_segment(rng, d, n_docs, max(1, target - (a1 - a0)), sent_offsets, doc_offsets)
        label, last_used = 1, a_end - 1
    else:
        b0, b1 = (int(sent_offsets[a_end]), int(sent_offsets[c1])) if a_end < c1 else (a1, a1)
        label = 0
    while (a1 - a0) + (b1 - b0) > max_tokens:
        if (a1 - a0) >= (b1 - b0):
            a1 -= 1
        else:
            b1 -= 1
    return ((a0, a1, b0, b1, label) if a1 > a0 and b1 > b0 else None), last_used


def _sop_pair(rng, c0: int, c1: int, max_tokens: int, sent_offsets) -> Optional[tuple[int, int, int, int, int]]:
    """ALBERT's sentence-order pair of sentences [c0, c1) of one document: A is a random-length head of the chunk and
    B the rest (a one-sentence chunk is cut inside the sentence); half of the time they are swapped (label 1).
    Cut from the end of the longer segment until they fit."""
    if c1 - c0 >= 2:
        cut = int(sent_offsets[c0 + int(rng.integers(1, c1 - c0))])
    else:
        t0, t1 = int(sent_offsets[c0]), int(sent_offsets[c1])
        if t1 - t0 < 2:
            return None
        cut = int(rng.integers(t0 + 1, t1))
    a0, a1, b0, b1 = int(sent_offsets[c0]), cut, cut, int(sent_offsets[c1])
    while (a1 - a0) + (b1 - b0) > max_tokens:
        if (a1 - a0) >= (b1 - b0):
            a1 -= 1
        else:
            b1 -= 1
    return (b0, b1, a0, a1, 1) if rng.random() < 0.5 else (a0, a1, b0, b1, 0)


def build_samples(
    sent_offsets: np.ndarray,
    doc_offsets: np.ndarray,
    max_seq_length: int,
    nsp: bool,
    short_seq_prob: float,
    seed: int,
    sop: bool = False,
) -> np.ndarray:
    """Samples as token ranges into the flat array: (a_start, a_end, b_start, b_end, nsp_label).

    Without NSP a sample is consecutive sentences of one document up to max_seq_length - 2 tokens
    (RoBERTa's DOC-SENTENCES). With NSP it follows BERT's create_pretraining_data: a chunk of sentences
    split at a random point into A and B, B replaced by sentences of another document half of the time
    (label 1 = random next). Pairs are cut from the end of the longer segment until they fit. With SOP (ALBERT) the
    chunk's two segments stay in one document and are swapped half the time (label 1 = swapped).
    """
    rng = np.random.default_rng([seed, 17])
    n_docs = len(doc_offsets) - 1
    out: list[tuple[int, int, int, int, int]] = []
    max_tokens = max_seq_length - (3 if nsp or sop else 2)
    for d in range(n_docs):
        s_begin, s_end = int(doc_offsets[d]), int(doc_offsets[d + 1])
        target = _target_length(rng, max_tokens, short_seq_prob)
        chunk_start, s, length = s_begin, s_begin, 0
        while s < s_end:  # sentences accumulate into a chunk until it reaches its target or the document ends
            length += int(sent_offsets[s + 1] - sent_offsets[s])
            if length >= target or s == s_end - 1:
                if sop:
                    pair = _sop_pair(rng, chunk_start, s + 1, max_tokens, sent_offsets)
                    if pair is not None:
                        out.append(pair)
                elif not nsp:
                    out.extend(_doc_sentence_samples(int(sent_offsets[chunk_start]), int(sent_offsets[s + 1]), max_tokens))
                else:
                    pair, s = _nsp_pair(rng, chunk_start, s + 1, d, n_docs, target, max_tokens, sent_offsets, doc_offsets)
                    if pair is not None:
                        out.append(pair)
                chunk_start, length = s + 1, 0
                target = _target_length(rng, max_tokens, short_seq_prob)
            s += 1
    return np.asarray(out, dtype=np.int64).reshape(-1, 5)


def pack_rows(lengths: np.ndarray, max_seq_length: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Group samples into rows of at most max_seq_length tokens (best fit over a window of open rows).

    Returns (row_offsets, row_samples): row r holds samples row_samples[row_offsets[r]:row_offsets[r+1]].
    """
    if not packing:
        n = len(lengths)
        return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)
    closed: list[list[int]] = []
    open_rows: list[list[int]] = []
    room: list[int] = []
    for i, ln in enumerate(lengths.tolist()):
        best = -1
        for j, r in enumerate(room):
            if ln <= r and (best < 0 or r < room[best]):
                best = j
        if best < 0:
            open_rows.append([i])
            room.append(max_seq_length - ln)
            best = len(room) - 1
        else:
            open_rows[best].append(i)
            room[best] -= ln
        if room[best] < 8 or len(open_rows) > _MAX_OPEN_ROWS:
            k = best if room[best] < 8 else int(np.argmin(room))
            closed.append(open_rows.pop(k))
            room.pop(k)
    closed.extend(open_rows)
    closed.sort(key=lambda r: r[0])  # deterministic order: by first sample
    offsets = np.zeros(len(closed) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in closed], out=offsets[1:])
    flat = np.asarray([i for r in closed for i in r], dtype=np.int64)
    return offsets, flat


# ------------------------------------------------------------------------------------------ driver side
def _split_docs(corpus, eval_fraction: float, want_eval: bool) -> Iterator[Document]:
    for doc in corpus.documents():
        if is_eval_document(doc, eval_fraction) == want_eval:
            yield doc


def prepare_pretraining_data(job) -> PreparedData:
    """Tokenise the corpus (cached by corpus and tokenizer) and build packed rows (cached by task settings)."""
    if job.data.source == "prepared":  # sharded by `python -m orchestrator.prepare`: validate its manifest only
        return prepared_data(job)
    t0 = time.perf_counter()
    cache_dir = Path(os.path.expanduser(job.data.cache_dir)).resolve()
    corpus = corpus_spec(job.data)
    loaded, tok_dir = get_tokenizer(job.tokenizer, corpus, cache_dir)
    tok_key = tokenizer_hash(tok_dir)
    t = job.task
    key_src = json.dumps(
        {
            "v": FORMAT_VERSION,
            "corpus": corpus.fingerprint(),
            "tok": tok_key,
            "eval_fraction": job.data.eval_fraction,
            "seq": t.max_seq_length,
            "nsp": t.nsp,
            **({"sop": True} if t.sop else {}),  # absent when off: the cache keys of existing datasets stay
            "short": t.short_seq_prob,
            "packing": t.packing,
            "seed": job.train.seed,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = cache_dir / "datasets" / key
    cached = (out / "meta.json").is_file()
    if not cached:

        def build(tmp: Path) -> None:
            tokenizer = loaded if loaded is not None else open_tokenizer(tok_dir)
            for split, want_eval in (("train", False), ("eval", True)):
                toks, sent_off, doc_off = _tokenize_split(tokenizer, _split_docs(corpus, job.data.eval_fraction, want_eval))
                samples = build_samples(sent_off, doc_off, t.max_seq_length, t.nsp, t.short_seq_prob, job.train.seed,
                                        sop=t.sop)
                row_off, row_samples = pack_rows(sample_lengths(samples), t.max_seq_length, t.packing)
                d = tmp / split
                d.mkdir()
                np.save(d / "tokens.npy", toks)
                np.save(d / "samples.npy", samples)
                np.save(d / "row_offsets.npy", row_off)
                np.save(d / "row_samples.npy", row_samples)
            counts = np.bincount(np.load(tmp / "train" / "tokens.npy"), minlength=len(tokenizer.get_vocab()))
            meta = {
                "key": json.loads(key_src),
                "corpus": corpus.describe(),
                "tokenizer_dir": str(tok_dir),
                "vocab_size": len(tokenizer.get_vocab()),
                "most_frequent_token_id": int(counts.argmax()) if counts.sum() else -1,
                "train_tokens": int(counts.sum()),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

        atomic_save_dir(build, out)
    meta = json.loads((out / "meta.json").read_text())
    train_rows = len(np.load(out / "train" / "row_offsets.npy", mmap_mode="r")) - 1
    eval_rows = len(np.load(out / "eval" / "row_offsets.npy", mmap_mode="r")) - 1
    if train_rows == 0 or meta["train_tokens"] == 0:
        raise DataError(corpus.describe(), "corpus holds no text to train on (all documents empty or held out)")
    secs = time.perf_counter() - t0
    return PreparedData(
        data_dir=str(out),
        tokenizer_dir=str(tok_dir),
        train_rows=train_rows,
        eval_rows=eval_rows,
        train_tokens=meta["train_tokens"],
        vocab_size=meta["vocab_size"],
        most_frequent_token_id=meta["most_frequent_token_id"],
        seconds=secs,
        tokens_per_second=(meta["train_tokens"] / secs) if not cached and secs > 0 else 0.0,
        cached=cached,
    )


def open_split(data_dir: str, split: str, job, tokenizer) -> PretrainingRows:
    t = job.task
    spec = MaskingSpec(
        mlm_probability=t.mlm_probability,
        mask_replace_prob=t.mask_replace_prob,
        random_replace_prob=t.random_replace_prob,
        unit=t.masking,
        span_geometric_p=t.span_geometric_p,
        span_max_length=t.span_max_length,
        mask_id=tokenizer.mask_token_id,
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    if is_prepared_dir(data_dir):
        return ShardedRows(data_dir, split, spec, len(tokenizer.get_vocab()), continuation_mask(tokenizer),
                           job.train.seed, t.nsp, special_ids, t.sbo)
    return PretrainingRows(
        Path(data_dir) / split, spec, len(tokenizer.get_vocab()), continuation_mask(tokenizer), job.train.seed,
        t.nsp or t.sop, special_ids, t.sbo,
    )


def most_frequent_baseline(labels: np.ndarray, most_frequent_token_id: Optional[int]) -> float:
    sel = labels[labels != -100]
    if len(sel) == 0 or most_frequent_token_id is None or most_frequent_token_id < 0:
        return 0.0
    return float((sel == most_frequent_token_id).mean())
