"""Data stage (preparation): plan blocks -> pass 1 (filter, hash) -> dedup -> WordPiece -> pass 2 (tokenise, shard).

Every step writes its result atomically under output_dir and is skipped when a re-run finds it complete, so a
killed preparation resumes where it stopped. Shard contents are a function of (sources, settings) only, never
of the number of workers or the order blocks finish in: an interrupted and resumed run ends with the same
manifest as an uninterrupted one. Pass 1 and pass 2 run per block, in this process (launcher=local) or on a
Ray Data actor pool of num_workers CPUs (launcher=ray); a worker holds one block at a time, so memory is
bounded by shard_bytes, not by the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from orchestrator.data.prepare_sources import (
    Block,
    BlockRefused,
    DocumentReader,
    plan_blocks,
    resolve_sources,
    text_hash,
)
from orchestrator.errors import ConfigError, DataError
from orchestrator.io import atomic_write, save_npy_atomic, sha256_file, write_json_atomic


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1)

log = logging.getLogger("orchestrator.prepare")

KIND = "bert-orchestrator/prepared-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
# settings that do not change any output byte: a re-run may change them freely
_NON_CONTENT = ("launcher", "num_workers", "verify_existing", "output_dir", "dedup_partition_docs",
                "keep_normalised_text")


def content_config(cfg) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for k in _NON_CONTENT:
        d.pop(k, None)
    return d


def _name(i: int) -> str:
    return f"{i:05d}"


# ------------------------------------------------------------------------------------------------ pass 1
# A document's text as pass 1 keeps it for pass 2: its sentences joined by "\n", documents joined by "\x1e".
# Neither can occur inside a sentence: every sentence is cut from a `normalise`d line, and str.split() removes both.
SENT_SEP, DOC_SEP = "\n", "\x1e"


def _pass1_file(out: Path, index: int, suffix: str) -> Path:
    """Pass 1's files of a block: .json its stats (the marker), .npy its hashes, .txt its record of the text."""
    return out / "work" / "pass1" / f"block_{_name(index)}{suffix}"


def pass1_block(block: Block, ctx: dict) -> dict:
    """Read, normalise and filter one block; write the 64-bit hashes of its kept documents, their normalised text
    (so that pass 2 tokenises without reading and normalising the source again) and the block's stats."""
    out = Path(ctx["out"])
    marker, hashes_file = _pass1_file(out, block.index, ".json"), _pass1_file(out, block.index, ".npy")
    if marker.is_file() and hashes_file.is_file():
        return json.loads(marker.read_text())
    reader = DocumentReader.from_config(block, ctx["cfg"])
    hashes: list[int] = []
    separable = True

    def read(record=None) -> None:
        nonlocal separable
        for doc in reader:
            text = SENT_SEP.join(doc)
            hashes.append(text_hash(text))
            if record is not None:
                if len(hashes) > 1:
                    record.write(DOC_SEP)
                record.write(text)
                # always so (see SENT_SEP); else the record is not used
                separable = separable and text.count(SENT_SEP) == len(doc) - 1 and DOC_SEP not in text

    texts = _pass1_file(out, block.index, ".txt")
    kept = ctx.get("keep_text", True)
    try:
        if kept:  # written as it is read: one document in memory at a time
            atomic_write(texts, lambda tmp: _with_open(tmp, read))
        else:
            read()
    except BlockRefused:
        res = {"block": block.index, **asdict(reader.stats)}
        return res  # not written: the refusal is reported by the driver, with the file's line number
    save_npy_atomic(hashes_file, np.asarray(hashes, dtype=np.uint64))
    res = {"block": block.index, **asdict(reader.stats)}
    if kept and separable:
        res["texts_bytes"] = texts.stat().st_size  # without it pass 2 reads the source
    _write_json(marker, res)
    return res


def dedup(blocks: list[Block], out: Path, enabled: bool, partition_docs: int, kept: dict[int, int]) -> int:
    """First occurrence in corpus order (block, index) wins. Bounded: one hash partition in memory at a time."""
    ddir = out / "work" / "dedup"
    done = ddir / "DONE.json"
    if done.is_file():
        return int(json.loads(done.read_text())["duplicates"])
    drops: dict[int, list[np.ndarray]] = {b.index: [] for b in blocks}
    total = sum(kept.values())
    n_parts = max(1, math.ceil(total / partition_docs)) if enabled else 0
    for part in range(n_parts):
        hs, bl, ix = [], [], []
        for b in blocks:
            h = np.load(_pass1_file(out, b.index, ".npy"), mmap_mode="r")
            sel = np.flatnonzero(h % np.uint64(n_parts) == np.uint64(part)) if n_parts > 1 else np.arange(len(h))
            hs.append(np.asarray(h[sel]))
            bl.append(np.full(len(sel), b.index, dtype=np.int32))
            ix.append(sel.astype(np.int64))
        h = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
        b_ = np.concatenate(bl) if bl else np.zeros(0, np.int32)
        i_ = np.concatenate(ix) if ix else np.zeros(0, np.int64)
        order = np.lexsort((i_, b_, h))
        hs_sorted = h[order]
        dup = np.zeros(len(order), dtype=bool)
        dup[1:] = hs_sorted[1:] == hs_sorted[:-1]
        dup_pos = order[dup]
        for blk in np.unique(b_[dup_pos]):
            drops[int(blk)].append(i_[dup_pos][b_[dup_pos] == blk])
        del h, b_, i_, order, hs_sorted, dup
    n_dup = 0
    for b in blocks:
        arr = np.sort(np.concatenate(drops[b.index])) if drops[b.index] else np.zeros(0, np.int64)
        n_dup += len(arr)
        save_npy_atomic(ddir / f"block_{_name(b.index)}.npy", arr.astype(np.int64))
    _write_json(done, {"duplicates": n_dup, "partitions": n_parts})
    return n_dup


def _drops(out: Path, index: int) -> np.ndarray:
    p = out / "work" / "dedup" / f"block_{_name(index)}.npy"
    return np.load(p) if p.is_file() else np.zeros(0, np.int64)


def _with_open(path: Path, fill: Callable) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fill(fh)


def _record_documents(path: Path, chunk_chars: int = 1 << 22) -> Iterator[str]:
    """The documents of a pass-1 record, in order, read a chunk at a time (at least one, maybe empty)."""
    with open(path, encoding="utf-8") as fh:
        rest = ""
        while chunk := fh.read(chunk_chars):
            docs = (rest + chunk).split(DOC_SEP)
            rest = docs.pop()
            yield from docs
        yield rest


def kept_texts(block: Block, ctx: dict) -> Iterator[tuple[str, int]]:
    """The block's documents after filtering and dedup, each as (its sentences joined by SENT_SEP, its 64-bit
    hash), streamed: from pass 1's record of them, or, where there is none of the size pass 1 wrote (none kept,
    or a block pass 2 already deleted it for), read and normalised from the source again."""
    out = Path(ctx["out"])
    dropped = set(_drops(out, block.index).tolist())
    record, marker = _pass1_file(out, block.index, ".txt"), _pass1_file(out, block.index, ".json")
    if record.is_file() and marker.is_file() and \
            record.stat().st_size == json.loads(marker.read_text()).get("texts_bytes", -1):
        hashes = np.load(_pass1_file(out, block.index, ".npy"))
        n = 0
        for k, text in enumerate(_record_documents(record) if len(hashes) else ()):
            n += 1
            if k < len(hashes) and k not in dropped:
                yield text, int(hashes[k])
        if n != len(hashes):
            raise DataError(str(record), f"holds {n} documents where pass 1 hashed {len(hashes)}; delete it and"
                                         " prepare again")
        return
    for k, doc in enumerate(DocumentReader.from_config(block, ctx["cfg"])):
        if k not in dropped:
            text = SENT_SEP.join(doc)
            yield text, text_hash(text)


# ------------------------------------------------------------------------------------------- tokenizer
def ensure_tokenizer(cfg, blocks: list[Block], ctx: dict) -> Path:
    """out/tokenizer: trained on the first documents of every block (spread over the corpus), or copied from a dir."""
    from orchestrator.data.tokenizer import load_tokenizer_dir, train_wordpiece
    from orchestrator.io import atomic_save_dir

    tok_out = Path(ctx["out"]) / "tokenizer"
    if (tok_out / "tokenizer.json").is_file():
        return tok_out
    t = cfg.tokenizer
    if t.source == "dir":
        tok = load_tokenizer_dir(t.path)
    else:
        per_block = max(1, math.ceil(t.sample_documents / max(1, len(blocks))))

        def sample() -> Iterable[str]:
            for b in blocks:
                for n, (text, _) in enumerate(kept_texts(b, ctx)):
                    if n >= per_block:
                        break
                    yield from text.split(SENT_SEP)

        tok = train_wordpiece(sample, t.vocab_size, t.min_frequency, t.lowercase)
    atomic_save_dir(lambda d: tok.save_pretrained(str(d)), tok_out)
    return tok_out


# ------------------------------------------------------------------------------------------------ pass 2
class _SplitAcc:
    """One split's documents in order: their tokens, each sentence's length, each document's sentence count.
    Sentences without a token are dropped, and documents left without a sentence."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.sent_lens: list[np.ndarray] = []
        self.doc_sents: list[np.ndarray] = []

    def add(self, ids_per_sentence: list[list[int]], dtype) -> None:
        """One document, each sentence's ids."""
        lens = [len(x) for x in ids_per_sentence if x]
        if not lens:
            return
        self.chunks.append(np.fromiter((t for x in ids_per_sentence for t in x), dtype=dtype, count=sum(lens)))
        self.sent_lens.append(np.asarray(lens, dtype=np.int64))
        self.doc_sents.append(np.asarray([len(lens)], dtype=np.int64))

    def add_batch(self, toks: np.ndarray, lens: np.ndarray, doc_of: np.ndarray, take: np.ndarray, dtype) -> None:
        """Documents encoded together: `toks` all their sentences' ids back to back, `lens` each sentence's
        length, `doc_of` its document (0..n-1, ascending), `take` whether its document belongs here. The same
        as `add` of each taken document in turn."""
        keep = take & (lens > 0)
        self.chunks.append(toks[np.repeat(keep, lens)].astype(dtype))
        self.sent_lens.append(lens[keep])
        per_doc = np.bincount(doc_of[keep], minlength=int(doc_of[-1]) + 1 if len(doc_of) else 0)
        self.doc_sents.append(per_doc[per_doc > 0])

    def arrays(self, dtype):
        toks = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype)
        lens = np.concatenate(self.sent_lens) if self.sent_lens else np.zeros(0, np.int64)
        sent_off = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=sent_off[1:])
        doc_sents = np.concatenate(self.doc_sents) if self.doc_sents else np.zeros(0, np.int64)
        doc_off = np.zeros(len(doc_sents) + 1, np.int64)
        np.cumsum(doc_sents, out=doc_off[1:])
        return toks, sent_off, doc_off


def _gather(tokens: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    total = int(lens.sum())
    if total == 0:
        return tokens[:0]
    base = np.concatenate([[0], np.cumsum(lens)[:-1]])
    idx = np.repeat(starts - base, lens) + np.arange(total)
    return tokens[idx]


def _write_arrow_atomic(path: Path, names: list[str], arrays: list, metadata: dict[str, str]) -> tuple[str, int]:
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    batch = pa.record_batch(arrays, names=names)
    schema = batch.schema.with_metadata({k: str(v) for k, v in metadata.items()})
    batch = batch.replace_schema_metadata(schema.metadata)

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)

    atomic_write(path, write)
    return sha256_file(path), path.stat().st_size


def _list_array(offsets: np.ndarray, values: np.ndarray):
    import pyarrow as pa

    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def build_split_shard(toks, sent_off, doc_off, cfg: dict, seed: int, out: Path, split: str, index: int,
                      hist_edges: np.ndarray) -> Optional[dict]:
    """Samples (NSP pairs or doc-sentences) and packed rows of one block's split, written as two Arrow files."""
    from orchestrator.data.pretraining import build_samples, pack_rows, sample_lengths

    if len(doc_off) <= 1:
        return None
    L, nsp = cfg["max_seq_length"], cfg["nsp"]
    samples = build_samples(sent_off, doc_off, L, nsp, cfg["short_seq_prob"], seed)
    if len(samples) == 0:
        return None
    lengths = sample_lengths(samples)
    row_off, row_samples = pack_rows(lengths, L, cfg["packing"])
    ordered = samples[row_samples]
    if nsp:
        starts = ordered[:, [0, 2]].ravel()
        ends = ordered[:, [1, 3]].ravel()
        per_sample = 2
    else:
        starts, ends, per_sample = ordered[:, 0], ordered[:, 1], 1
    seg_lens = (ends - starts).astype(np.int64)
    values = _gather(toks, starts, seg_lens)
    seg_cum = np.zeros(len(seg_lens) + 1, np.int64)
    np.cumsum(seg_lens, out=seg_cum[1:])
    tok_off = seg_cum[row_off * per_sample]
    row_lengths = np.add.reduceat(lengths[row_samples], row_off[:-1]) if len(row_off) > 1 else np.zeros(0, np.int64)
    meta = {"kind": KIND, "split": split, "block": index, "max_seq_length": L, "nsp": nsp}
    rows_file = f"{split}/rows_{_name(index)}.arrow"
    rows_sha, rows_bytes = _write_arrow_atomic(
        out / rows_file,
        ["tokens", "segment_lengths", "nsp_labels"],
        [_list_array(tok_off, values), _list_array(row_off * per_sample, seg_lens.astype(np.int32)),
         _list_array(row_off, ordered[:, 4].astype(np.int8))],
        meta,
    )
    # the token dataset itself: every document with its sentence boundaries (rows can be rebuilt from it)
    docs_file = f"{split}/docs_{_name(index)}.arrow"
    doc_tok_off = sent_off[doc_off]
    docs_sha, docs_bytes = _write_arrow_atomic(
        out / docs_file,
        ["tokens", "sentence_lengths"],
        [_list_array(doc_tok_off, toks), _list_array(doc_off, np.diff(sent_off).astype(np.int32))],
        meta,
    )
    return {
        "block": index,
        "rows_file": rows_file,
        "docs_file": docs_file,
        "rows": int(len(row_off) - 1),
        "samples": int(len(samples)),
        "documents": int(len(doc_off) - 1),
        "sentences": int(len(sent_off) - 1),
        "tokens": int(len(toks)),
        "row_tokens": int(row_lengths.sum()),
        "rows_sha256": rows_sha,
        "rows_bytes": rows_bytes,
        "docs_sha256": docs_sha,
        "docs_bytes": docs_bytes,
        "row_length_hist": np.histogram(row_lengths, bins=hist_edges)[0].tolist(),
    }


def _marker_ok(marker: Path, out: Path, verify: bool) -> Optional[dict]:
    if not marker.is_file():
        return None
    res = json.loads(marker.read_text())
    for sh in res["splits"].values():
        if sh is None:
            continue
        for kind in ("rows", "docs"):
            p = out / sh[f"{kind}_file"]
            if not p.is_file() or p.stat().st_size != sh[f"{kind}_bytes"]:
                return None
            if verify and sha256_file(p) != sh[f"{kind}_sha256"]:
                log.warning("%s does not match its checksum: block %d is redone", p, res["block"])
                return None
    if not (out / res["counts_file"]).is_file():
        return None
    return res


# Pass 2 encodes a document in one call, its sentences joined by this marker, added to a copy of the tokenizer as a
# special token (id = vocabulary size, so no other id moves): one Rust call per document on the fast path (no
# offsets), not one Encoding per sentence. Added tokens split the text before normalisation and pre-tokenisation, so
# each sentence is encoded exactly as alone (tests/test_prepare_text.py checks it on WordPiece and byte-level BPE)
# where the pre-tokeniser does not look at where a piece sits in the whole text: Metaspace with
# prepend_scheme="first" (SentencePiece conversions) does, so such tokenizers, and documents whose text holds the
# marker's private-use character, are encoded sentence by sentence with the unmodified tokenizer. Preparation never
# truncates or pads: a tokenizer.json that enables either has it switched off here.
SENTENCE_MARK = "\ue000sentence\ue000"
_POSITION_FREE = {"BertPreTokenizer", "ByteLevel", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits",
                  "CharDelimiterSplit", "UnicodeScripts", "Split"}


def _position_free(pre_tokenizer: Optional[dict]) -> bool:
    """The pre-tokeniser treats every piece of text alike, wherever it sits (so joining sentences changes nothing)."""
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_position_free(p) for p in pre_tokenizer.get("pretokenizers", []))
    if kind == "Metaspace":
        return pre_tokenizer.get("prepend_scheme") in ("always", "never")
    return kind in _POSITION_FREE


class _TokenizerCache:
    tok = None  # the tokenizer as given (no truncation, no padding)
    marked = None  # a copy with the sentence marker; None where joining sentences could change their ids
    tok_dir = None
    vocab = 0
    mark_id = -1

    def load(self, tok_dir: str) -> None:
        from tokenizers import AddedToken, Tokenizer

        if self.tok is not None and self.tok_dir == tok_dir:
            return
        path = str(Path(tok_dir) / "tokenizer.json")
        self.tok, self.tok_dir = Tokenizer.from_file(path), tok_dir
        self.tok.no_truncation()
        self.tok.no_padding()
        self.vocab = self.tok.get_vocab_size()
        self.marked = None
        spec = self.tok.to_str()
        if _position_free(json.loads(spec).get("pre_tokenizer")):
            self.marked = Tokenizer.from_str(spec)
            self.marked.add_special_tokens([AddedToken(SENTENCE_MARK, special=True, normalized=False)])
            self.mark_id = self.marked.token_to_id(SENTENCE_MARK)
            if self.mark_id < self.vocab:  # the vocabulary has it already: the marker would be ambiguous
                self.marked = None

    def encode_joined(self, texts: list[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Documents (each its sentences joined by SENT_SEP) in one fast-path call, every sentence boundary, also
        between documents, a marker: (all sentences' ids back to back, each sentence's length). Each sentence
        gets exactly the ids it gets alone. None where that cannot hold: a tokenizer without the marker, or a
        document holding the marker's character."""
        text = SENT_SEP.join(texts)
        if self.marked is None or SENTENCE_MARK[0] in text:
            return None
        enc = getattr(self.marked, "encode_batch_fast", self.marked.encode_batch)(
            [text.replace(SENT_SEP, SENTENCE_MARK)], add_special_tokens=False)[0]
        ids = np.asarray(enc.ids, dtype=np.int64)
        is_mark = ids == self.mark_id
        lens = np.diff(np.flatnonzero(is_mark), prepend=-1, append=len(ids)) - 1
        return ids[~is_mark], lens

    def encode_sentences(self, text: str) -> list[list[int]]:
        """One document's sentences encoded one by one (where `encode_joined` cannot be used)."""
        return [e.ids for e in self.tok.encode_batch(text.split(SENT_SEP), add_special_tokens=False)]


def pass2_block(block: Block, ctx: dict, cache: Optional[_TokenizerCache] = None) -> dict:
    """Tokenise one block's kept documents, split train/eval by document hash, write its shards and marker."""
    from orchestrator.data.corpus import is_eval_hash

    out = Path(ctx["out"])
    marker = out / "work" / "blocks" / f"block_{_name(block.index)}.json"
    done = _marker_ok(marker, out, ctx["verify_existing"])
    if done is not None:
        return {**done, "skipped": True}
    cfg = ctx["cfg"]
    cache = cache or _TokenizerCache()
    cache.load(ctx["tok_dir"])
    tok, vocab = cache.tok, cache.vocab
    dtype = np.uint16 if vocab <= 65535 else np.int32
    unk_id = tok.token_to_id("[UNK]")
    accs = {s: _SplitAcc() for s in SPLITS}
    pending: list[str] = []
    pending_hashes: list[int] = []

    def flush() -> None:
        held_out = np.fromiter((is_eval_hash(h, cfg["eval_fraction"]) for h in pending_hashes), bool, len(pending))
        joined = cache.encode_joined(pending)
        if joined is None:
            for text, ev in zip(pending, held_out):
                accs["eval" if ev else "train"].add(cache.encode_sentences(text), dtype)
        else:
            toks, lens = joined
            sentences = np.fromiter((t.count(SENT_SEP) + 1 for t in pending), np.int64, len(pending))
            doc_of = np.repeat(np.arange(len(pending)), sentences)
            assert len(doc_of) == len(lens), "one length per sentence"
            for split in SPLITS:
                accs[split].add_batch(toks, lens, doc_of, held_out[doc_of] == (split == "eval"), dtype)
        pending.clear()
        pending_hashes.clear()

    try:
        for text, h in kept_texts(block, ctx):
            pending.append(text)
            pending_hashes.append(h)
            if len(pending) >= 256:
                flush()
        if pending:
            flush()
    except BlockRefused as exc:  # the file changed since pass 1
        raise DataError(block.uri, exc.info["message"] + " (file changed since pass 1?)") from None
    delay = float(os.environ.get("BERT_ORCH_PREPARE_BLOCK_DELAY_S", "0") or 0)  # fault-injection tests
    if delay:
        time.sleep(delay)
    L = cfg["max_seq_length"]
    edges = np.unique(np.linspace(0, L, 9).round().astype(np.int64))
    edges[-1] = L + 1
    counts = np.zeros(vocab, np.int64)
    splits: dict[str, Optional[dict]] = {}
    unk = 0
    for si, split in enumerate(SPLITS):
        toks, sent_off, doc_off = accs[split].arrays(dtype)
        accs[split] = _SplitAcc()
        counts += np.bincount(toks, minlength=vocab)[:vocab]
        unk += int((toks == unk_id).sum()) if unk_id is not None else 0
        seed = cfg["seed"] * 1_000_003 + 2 * block.index + si  # a shard's samples depend on its block only
        splits[split] = build_split_shard(toks, sent_off, doc_off, cfg, seed, out, split, block.index, edges)
        del toks, sent_off, doc_off
    counts_file = f"work/counts/block_{_name(block.index)}.npy"
    save_npy_atomic(out / counts_file, counts)
    res = {"block": block.index, "splits": splits, "unk_tokens": unk, "counts_file": counts_file,
           "hist_edges": edges.tolist()}
    _write_json(marker, res)
    _pass1_file(out, block.index, ".txt").unlink(missing_ok=True)  # its shards hold it now: no second copy of the corpus
    return {**res, "skipped": False}


# --------------------------------------------------------------------------------------------- executors
def _run_task(kind: str, block: Block, ctx: dict, cache) -> dict:
    if kind == "pass1":
        return pass1_block(block, ctx)
    return pass2_block(block, ctx, cache)


class BlockActor:
    """A Ray Data actor: holds the tokenizer across blocks; a batch is one block descriptor."""

    def __init__(self, ctx_json: str):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one actor = one CPU
        self.ctx = json.loads(ctx_json)
        self.cache = _TokenizerCache()

    def __call__(self, batch: dict) -> dict:
        from orchestrator.errors import OrchestratorError

        out = []
        for item in batch["item"]:
            task = json.loads(str(item))
            try:
                res = _run_task(task["kind"], Block(**task["block"]), self.ctx, self.cache)
            except OrchestratorError as exc:
                res = {"raised": {"path": getattr(exc, "path", ""), "line": getattr(exc, "line", None),
                                  "message": str(exc)}}
            out.append(json.dumps(res))
        return {"result": np.asarray(out, dtype=object)}


def run_blocks(kind: str, blocks: list[Block], ctx: dict, cfg, progress: Callable[[dict], None]) -> None:
    if not blocks:
        return
    if cfg.launcher.name == "local":
        cache = _TokenizerCache()
        for b in blocks:
            progress(_run_task(kind, b, ctx, cache))
        return
    import ray

    ctxd = ray.data.DataContext.get_current()
    ctxd.enable_progress_bars = sys.stderr.isatty()
    ctxd.execution_options.preserve_order = False
    _quiet_ray_data_console(ctxd)
    items = [{"item": json.dumps({"kind": kind, "block": asdict(b)})} for b in blocks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # Ray 2.60 names `max_restarts=0` as the way to turn actor restarts off, and warns that the extra
        # remote arguments it comes in are deprecated (for 2.64; constraints.txt pins 2.60)
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        dataset = dataset.map_batches(
            BlockActor,
            fn_constructor_kwargs={"ctx_json": json.dumps(ctx)},
            batch_size=1,
            # no more actors than blocks; `concurrency=` would warn of its deprecation
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_workers, len(blocks))),
            num_cpus=1,
            # a lost actor fails the pass instead of being restarted (a rerun resumes at the blocks not done),
            # and Ray's core worker no longer prints an error line at each actor's start about restarts that
            # could not work (ray-project/ray#53727)
            max_restarts=0,
        )
    for row in dataset.iter_rows():
        res = json.loads(row["result"])
        if "raised" in res:
            raise _reraise(res["raised"])
        progress(res)


class _DropProgressBarNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def _quiet_ray_data_console(ctxd) -> None:
    """Ray Data's console lines are its warnings and errors only: no INFO line per dataset executed, no note that
    its progress bars are off (without a terminal our own lines report progress). Its log file is unchanged."""
    ctxd.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropProgressBarNote) for f in handler.filters):
                handler.addFilter(_DropProgressBarNote())


def _reraise(r: dict):
    msg = r["message"]
    if not r["path"]:
        return DataError("?", msg)
    prefix = f"{r['path']}:{r['line']}: " if r["line"] is not None else f"{r['path']}: "
    return DataError(r["path"], msg[len(prefix):] if msg.startswith(prefix) else msg, line=r["line"])


def connect_ray(cfg) -> bool:
    """Join launcher.address / RAY_ADDRESS (also what `ray job submit` sets), else start a small local Ray."""
    from orchestrator.launch.ray_job import connect_ray

    return connect_ray(cfg.launcher.address, num_cpus=cfg.launcher.num_cpus or cfg.num_workers, include_dashboard=False,
                       runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}},
                       object_store_memory=cfg.launcher.object_store_memory_mb * 2**20)


# ------------------------------------------------------------------------------------------------ driver
def _location_error(res: dict, block: Block, line_base: int) -> DataError:
    e = res["error"]
    if "rel_line" in e:
        return DataError(block.uri, e["message"], line=line_base + e["rel_line"] - 1)
    return DataError(block.uri, e["message"])


def _problem_location(p: dict, block: Block, line_base: int) -> dict:
    q = {"file": block.uri, "kind": p["kind"], "message": p["message"]}
    if "rel_line" in p:
        q["line"] = line_base + p["rel_line"] - 1
    if "byte" in p:
        q["byte"] = p["byte"]
    if "row" in p:
        q["row"] = p["row"]
    return q


def _load_or_plan(cfg, out: Path) -> tuple[list, list[Block]]:
    files = resolve_sources(list(cfg.sources), cfg.format)
    content = content_config(cfg)
    plan_path = out / "work" / "plan.json"
    want = {"kind": KIND, "version": FORMAT_VERSION, "content": content,
            "sources": [asdict(f) for f in files]}
    if plan_path.is_file():
        have = json.loads(plan_path.read_text())
        if {k: have.get(k) for k in want} == want:
            return files, [Block(**b) for b in have["blocks"]]
        finished = any((out / "work" / "blocks").glob("block_*.json")) or (out / "manifest.json").is_file()
        if finished:
            diff = sorted(k for k in set(content) | set(have.get("content", {}))
                          if content.get(k) != have.get("content", {}).get(k))
            what = f"settings {diff}" if diff else "sources (files added, removed or modified)"
            raise ConfigError("output_dir", f"'{out}' holds a preparation with other {what}; choose another"
                              " output_dir or delete it")
        shutil.rmtree(out / "work", ignore_errors=True)  # only pass-1 results: cheap to redo
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
    blocks = plan_blocks(files, cfg.shard_bytes, cfg.text_field)
    _write_json(plan_path, {**want, "blocks": [asdict(b) for b in blocks]})
    return files, blocks


def prepare_corpus(cfg, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole preparation; returns the stats (also in output_dir/stats.json)."""
    t0 = time.perf_counter()
    out = Path(os.path.expanduser(cfg.output_dir)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files, blocks = _load_or_plan(cfg, out)
    if not blocks:
        raise DataError(", ".join(f.uri for f in files), "corpus is empty: the sources hold no bytes")
    echo(f"prepare: {len(files)} file(s), {sum(f.size for f in files):,} bytes, {len(blocks)} block(s) -> {out}")
    ctx = {"out": str(out), "cfg": content_config(cfg), "verify_existing": cfg.verify_existing,
           "keep_text": cfg.keep_normalised_text}
    started_ray = connect_ray(cfg) if cfg.launcher.name == "ray" else False
    try:
        return _prepare(cfg, out, files, blocks, ctx, t0, echo)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


class _Progress:
    """One line per block done: what, k/n, and the time left at the rate of the blocks worked on so far (a block
    a resumed run finds done takes no time and prints no line)."""

    def __init__(self, what: str, total: int, echo: Callable[[str], None]):
        self.what, self.total, self.echo = what, total, echo
        self.done, self.worked, self.t0 = 0, 0, time.perf_counter()

    def tick(self, r: dict, worked: bool = True) -> None:
        from orchestrator.worker.metrics import _clock

        self.done += 1
        if worked:
            self.worked += 1
            left = (time.perf_counter() - self.t0) / self.worked * (self.total - self.done)
            self.echo(f"  {self.what.format(block=r['block'])} ({self.done}/{self.total}, eta {_clock(left)})")


def _prepare(cfg, out: Path, files, blocks: list[Block], ctx: dict, t0: float, echo) -> dict:
    by_index = {b.index: b for b in blocks}

    # pass 1: filter + hash (errors are collected, then reported with the file's line number)
    t1 = time.perf_counter()
    p1: dict[int, dict] = {}
    todo = []
    for b in blocks:
        m = _pass1_file(out, b.index, ".json")
        if m.is_file() and _pass1_file(out, b.index, ".npy").is_file():
            p1[b.index] = json.loads(m.read_text())
        else:
            todo.append(b)
    read = _Progress("block {block:5d} read", len(todo), echo)

    def pass1_done(r: dict) -> None:
        p1[r["block"]] = r
        read.tick(r)

    run_blocks("pass1", todo, ctx, cfg, pass1_done)
    line_base: dict[int, int] = {}
    next_line: dict[str, int] = {}
    for b in blocks:
        line_base[b.index] = next_line.get(b.uri, 1)
        next_line[b.uri] = line_base[b.index] + p1[b.index]["lines"]
    for b in blocks:
        if p1[b.index].get("error"):
            raise _location_error(p1[b.index], b, line_base[b.index])
    s = {k: sum(p1[b.index][k] for b in blocks) for k in (
        "documents_read", "documents_kept", "empty_dropped", "too_short_dropped", "documents_cut",
        "invalid_utf8_skipped", "bad_records_skipped", "lines", "bytes", "chars")}
    problems = [_problem_location(p, by_index[i], line_base[i]) for i in sorted(p1) for p in p1[i]["problems"]][:20]
    if s["documents_kept"] == 0:
        raise DataError(
            ", ".join(f.uri for f in files),
            f"corpus is empty after filtering: {s['documents_read']} documents read, {s['empty_dropped']} empty,"
            f" {s['too_short_dropped']} shorter than min_chars={cfg.min_chars}, {s['invalid_utf8_skipped']} lines of"
            f" invalid UTF-8 and {s['bad_records_skipped']} bad records skipped",
        )
    pass1_s = time.perf_counter() - t1

    # dedup: global, deterministic, one hash partition in memory at a time
    duplicates = dedup(blocks, out, cfg.dedup, cfg.dedup_partition_docs,
                       {b.index: p1[b.index]["documents_kept"] for b in blocks})

    # vocabulary
    t2 = time.perf_counter()
    tok_dir = ensure_tokenizer(cfg, blocks, ctx)
    tok_s = time.perf_counter() - t2

    # pass 2: tokenise + shard
    t3 = time.perf_counter()
    ctx2 = {**ctx, "tok_dir": str(tok_dir)}
    results: dict[int, dict] = {}
    written = _Progress("shard {block:5d} written", len(blocks), echo)

    def progress(r: dict) -> None:
        results[r["block"]] = r
        written.tick(r, worked=not r.get("skipped"))

    run_blocks("pass2", blocks, ctx2, cfg, progress)
    pass2_s = time.perf_counter() - t3
    skipped = sum(1 for r in results.values() if r.get("skipped"))
    manifest, stats = _manifest(cfg, out, files, blocks, results, tok_dir, s, duplicates, problems)
    _write_json(out / "manifest.json", manifest)
    secs = time.perf_counter() - t0
    tokens = stats["tokens"]
    timing = {
        "seconds": secs, "pass1_seconds": pass1_s, "tokenizer_seconds": tok_s, "pass2_seconds": pass2_s,
        "tokens_per_s": tokens / secs if secs > 0 else 0.0, "blocks": len(blocks), "blocks_skipped": skipped,
        "launcher": cfg.launcher.name, "num_workers": cfg.num_workers,
    }
    full = {**stats, "timing": timing, "output_dir": str(out)}
    _write_json(out / "stats.json", full)
    for line in format_stats(full):
        echo(line)
    return full


def _manifest(cfg, out: Path, files, blocks, results, tok_dir: Path, s: dict, duplicates: int, problems):
    from tokenizers import Tokenizer

    from orchestrator.data.tokenizer import tokenizer_hash

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    counts = np.zeros(vocab, np.int64)
    splits: dict[str, dict] = {}
    hist = None
    edges = None
    unk = 0
    for split in SPLITS:
        shards = []
        for b in blocks:
            sh = results[b.index]["splits"].get(split)
            if sh:
                shards.append({k: v for k, v in sh.items() if k != "row_length_hist"})
                h = np.asarray(sh["row_length_hist"])
                if split == "train":
                    hist = h if hist is None else hist + h
        splits[split] = {
            "rows": sum(x["rows"] for x in shards),
            "documents": sum(x["documents"] for x in shards),
            "sentences": sum(x["sentences"] for x in shards),
            "tokens": sum(x["tokens"] for x in shards),
            "samples": sum(x["samples"] for x in shards),
            "shards": shards,
        }
    for b in blocks:
        r = results[b.index]
        counts += np.load(out / r["counts_file"])
        unk += r["unk_tokens"]
        edges = r["hist_edges"]
    tokens = int(counts.sum())
    if splits["train"]["rows"] == 0:
        raise DataError(", ".join(f.uri for f in files), "corpus holds no training rows after filtering")
    stats = {
        "files": len(files),
        "bytes": s["bytes"],
        "documents_read": s["documents_read"],
        "documents": s["documents_kept"] - duplicates,
        "empty_dropped": s["empty_dropped"],
        "too_short_dropped": s["too_short_dropped"],
        "duplicates_dropped": duplicates,
        "documents_cut": s["documents_cut"],
        "invalid_utf8_lines_skipped": s["invalid_utf8_skipped"],
        "bad_records_skipped": s["bad_records_skipped"],
        "skipped_examples": problems,
        "tokens": tokens,
        "train_tokens": splits["train"]["tokens"],
        "eval_tokens": splits["eval"]["tokens"],
        "train_rows": splits["train"]["rows"],
        "eval_rows": splits["eval"]["rows"],
        "unknown_tokens": unk,
        "unknown_token_rate": unk / tokens if tokens else 0.0,
        "row_length_histogram": {"edges": edges, "train_rows": hist.tolist() if hist is not None else []},
    }
    manifest = {
        "kind": KIND,
        "version": FORMAT_VERSION,
        "config": content_config(cfg),
        "sources": [asdict(f) for f in files],
        "tokenizer": {"dir": "tokenizer", "hash": tokenizer_hash(tok_dir), "vocab_size": vocab,
                      "token_dtype": "uint16" if vocab <= 65535 else "int32"},
        "task": {"max_seq_length": cfg.max_seq_length, "nsp": cfg.nsp, "short_seq_prob": cfg.short_seq_prob,
                 "packing": cfg.packing, "seed": cfg.seed},
        "order": {"shuffle_window_shards": cfg.shuffle_window_shards},
        "most_frequent_token_id": int(counts.argmax()) if tokens else -1,
        "splits": splits,
        "stats": stats,
    }
    return manifest, stats


def format_stats(st: dict) -> list[str]:
    t = st.get("timing", {})
    lines = [
        f"documents          {st['documents']:,} kept of {st['documents_read']:,} read"
        f" ({st['empty_dropped']:,} empty, {st['too_short_dropped']:,} too short,"
        f" {st['duplicates_dropped']:,} duplicates dropped; {st['documents_cut']:,} cut)",
        f"skipped            {st['invalid_utf8_lines_skipped']:,} invalid UTF-8 lines,"
        f" {st['bad_records_skipped']:,} bad records",
        f"tokens             {st['tokens']:,} (train {st['train_tokens']:,}, eval {st['eval_tokens']:,}),"
        f" unknown-token rate {st['unknown_token_rate']:.4%}",
        f"rows               train {st['train_rows']:,}, eval {st['eval_rows']:,}",
        "row lengths        " + ", ".join(
            f"[{a},{b}): {n:,}" for a, b, n in zip(st["row_length_histogram"]["edges"][:-1],
                                                   st["row_length_histogram"]["edges"][1:],
                                                   st["row_length_histogram"]["train_rows"])),
    ]
    if t:
        lines.append(
            f"time               {t['seconds']:.1f}s ({t['tokens_per_s']:,.0f} tokens/s; pass 1 {t['pass1_seconds']:.1f}s,"
            f" vocabulary {t['tokenizer_seconds']:.1f}s, pass 2 {t['pass2_seconds']:.1f}s;"
            f" {t['blocks_skipped']}/{t['blocks']} blocks already done)"
        )
    for p in st.get("skipped_examples", [])[:5]:
        where = f"{p['file']}:{p['line']}" if "line" in p else p["file"]
        lines.append(f"skipped            {where}: {p['message']}")
    return lines
