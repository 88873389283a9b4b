"""Data stage (preparation): raw sources -> input blocks planned by the driver -> normalised, filtered documents.

A block is a byte range of a text/jsonl file (snapped to a document or line boundary) or a range of Parquet
row groups. Blocks are planned once from file sizes and a few boundary reads, so they do not depend on how many
workers run them; every block becomes one shard per split. Files are read through pyarrow filesystems
(local, file://, s3://, gs://, hdfs://, abfs://) or fsspec for other URL schemes, in bounded chunks.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

from orchestrator.errors import DataError

_CHUNK = 1 << 20
MAX_LINE_BYTES = 64 << 20
TEXT_EXT = (".txt", ".text", ".raw")
JSONL_EXT = (".jsonl", ".json", ".ndjson")
PARQUET_EXT = (".parquet", ".pq")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WS = re.compile(r"\s+")


# ------------------------------------------------------------------------------------------- filesystems
def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or URL."""
    from pyarrow import fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception:  # a scheme pyarrow lacks (or its support is not built): go through fsspec
        import fsspec

        fsfs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsfs)), path


def _join_uri(spec: str, path: str) -> str:
    """The URI of `path` listed inside the filesystem of `spec` (keeps the scheme of the source)."""
    if "://" not in spec:
        return path
    scheme = spec.split("://", 1)[0]
    return f"file://{path}" if scheme == "file" else f"{scheme}://{path}"


def detect_format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    low = uri.lower()
    if low.endswith(JSONL_EXT):
        return "jsonl"
    if low.endswith(PARQUET_EXT):
        return "parquet"
    return "text"


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int
    mtime_ns: int
    format: str


def resolve_sources(specs: list[str], fmt: str) -> list[SourceFile]:
    """Expand files, directories (recursive) and globs into a sorted list; refuse missing or unreadable input."""
    from pyarrow import fs as pafs

    found: dict[str, SourceFile] = {}
    for spec in specs:
        spec = str(spec)
        fs, path = filesystem(spec)
        if any(ch in path for ch in "*?["):
            if isinstance(fs, pafs.LocalFileSystem):
                paths = sorted(p for p in globlib.glob(path, recursive=True) if os.path.isfile(p))
            else:
                base = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
            if not paths:
                raise DataError(spec, "glob matches no file (sources)")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise DataError(spec, "no such file or directory (sources)")
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                exts = TEXT_EXT + JSONL_EXT + PARQUET_EXT
                paths = sorted(
                    i.path for i in infos
                    if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
                    and (fmt != "auto" or i.path.lower().endswith(exts))
                )
                if not paths:
                    raise DataError(spec, "directory holds no corpus file (.txt, .jsonl, .parquet) (sources)")
            else:
                paths = [path]
        for p in paths:
            info = fs.get_file_info(p)
            uri = _join_uri(spec, p)
            if isinstance(fs, pafs.LocalFileSystem) and not os.access(p, os.R_OK):
                raise DataError(uri, "file is not readable (permission denied)")
            try:
                fs.open_input_file(p).close()
            except Exception as exc:
                raise DataError(uri, f"file cannot be opened: {exc}".splitlines()[0]) from None
            mtime = info.mtime_ns if info.mtime_ns is not None else 0
            found[uri] = SourceFile(uri, int(info.size or 0), int(mtime), detect_format(uri, fmt))
    return [found[k] for k in sorted(found)]


def sources_fingerprint(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(json.dumps(asdict(f), sort_keys=True).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ blocks
@dataclass(frozen=True)
class Block:
    index: int
    uri: str
    format: str
    start: int  # byte offset (text, jsonl) or first row group (parquet)
    end: int  # byte end (exclusive) or row group end
    first_row: int = 0  # parquet: row number of the block's first row in the file

    def where(self) -> str:
        unit = "row groups" if self.format == "parquet" else "bytes"
        return f"{self.uri} [{unit} {self.start}-{self.end})"


def _iter_lines(f, start: int, end: Optional[int], uri: str) -> Iterator[tuple[int, bytes]]:
    """(offset, line without newline) for the lines starting in [start, end); start must be a line start."""
    f.seek(start)
    pos = start
    carry = b""
    carry_at = start
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        buf = carry + chunk if carry else chunk
        i = 0
        while True:
            j = buf.find(b"\n", i)
            if j < 0:
                break
            if end is not None and carry_at + i >= end:
                return
            yield carry_at + i, buf[i:j]
            i = j + 1
        carry = buf[i:]
        carry_at = carry_at + i
        if len(carry) > MAX_LINE_BYTES:
            raise DataError(uri, f"a line at byte {carry_at} is longer than {MAX_LINE_BYTES >> 20} MiB")
        pos += len(chunk)
    if carry and (end is None or carry_at < end):
        yield carry_at, carry


def _line_start_at_or_after(f, target: int) -> int:
    """The first line start >= target (target itself when the byte before it is a newline)."""
    if target == 0:
        return 0
    f.seek(target - 1)
    at = target - 1
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return -1
        j = chunk.find(b"\n")
        if j >= 0:
            return at + j + 1
        at += len(chunk)


def _snap(f, target: int, fmt: str, size: int, uri: str) -> int:
    """Block boundary at or after target: a line start (jsonl) or a blank line between documents (text)."""
    q = _line_start_at_or_after(f, target)
    if q < 0 or q >= size or fmt == "jsonl":
        return q if q >= 0 else size
    for off, line in _iter_lines(f, q, None, uri):
        if not line.strip():
            return off
    return size


def plan_blocks(files: list[SourceFile], shard_bytes: int, text_field: str) -> list[Block]:
    """Deterministic blocks of about shard_bytes each, from file sizes and boundary reads only."""
    import pyarrow.parquet as pq

    blocks: list[Block] = []
    for sf in files:
        fs, path = filesystem(sf.uri)
        if sf.format == "parquet":
            try:
                pf = pq.ParquetFile(fs.open_input_file(path))
            except Exception as exc:
                raise DataError(sf.uri, f"not a readable Parquet file: {exc}".splitlines()[0]) from None
            if text_field not in pf.schema_arrow.names:
                raise DataError(sf.uri, f"Parquet file has no column '{text_field}' (text_field); it has {pf.schema_arrow.names}")
            md = pf.metadata
            g0, acc, row0, rows_before = 0, 0, 0, 0
            for g in range(md.num_row_groups):
                acc += md.row_group(g).total_byte_size
                rows_before += md.row_group(g).num_rows
                if acc >= shard_bytes or g == md.num_row_groups - 1:
                    blocks.append(Block(len(blocks), sf.uri, "parquet", g0, g + 1, row0))
                    g0, acc, row0 = g + 1, 0, rows_before
            continue
        if sf.size == 0:
            continue
        with fs.open_input_file(path) as f:
            bounds = [0]
            while True:
                b = _snap(f, bounds[-1] + shard_bytes, sf.format, sf.size, sf.uri)
                if b >= sf.size:
                    break
                bounds.append(b)
            bounds.append(sf.size)
        for s, e in zip(bounds[:-1], bounds[1:]):
            blocks.append(Block(len(blocks), sf.uri, sf.format, s, e))
    return blocks


# -------------------------------------------------------------------------------------------- documents
@dataclass
class ReadStats:
    """What reading a block found; line numbers are relative to the block (1 = its first line)."""

    documents_read: int = 0
    documents_kept: int = 0
    empty_dropped: int = 0
    too_short_dropped: int = 0
    documents_cut: int = 0
    invalid_utf8_skipped: int = 0
    bad_records_skipped: int = 0
    lines: int = 0
    bytes: int = 0
    chars: int = 0
    problems: list = field(default_factory=list)  # first few skipped lines: {kind, byte, rel_line|row, message}
    error: Optional[dict] = None  # the refusal (on_*=error): {byte, rel_line|row, message}


class BlockRefused(Exception):
    def __init__(self, info: dict):
        self.info = info
        super().__init__(info["message"])


def normalise(line: str) -> str:
    """NFC, whitespace runs to one space, no space at the ends. (str.split() splits on exactly the characters
    regex `\\s` matches, 4x faster than `_WS.sub`; tests/test_prepare_text.py checks both on every code point.)"""
    return " ".join(unicodedata.normalize("NFC", line).split())


def split_sentences(text: str) -> list[str]:
    """Sentences of a `normalise`d line (its only whitespace single spaces; it may end in one where a long line was
    cut): split after . ! or ? followed by a space and more text, exactly as `_SENT_SPLIT` splits it, by three
    str.replace calls instead of a look-behind regex (several times faster). Only normalised lines come here."""
    if "\x00" in text:  # the placeholder below
        return [s for s in _SENT_SPLIT.split(text) if s]
    trail = text.endswith(" ")
    body = text[:-1] if trail else text
    parts = body.replace(". ", ".\x00").replace("! ", "!\x00").replace("? ", "?\x00").split("\x00")
    if trail:
        parts[-1] += " "
    return [s for s in parts if s]


class DocumentReader:
    """Normalised, filtered documents of one block, in file order; the k-th yielded document has index k."""

    MAX_PROBLEMS = 10

    def __init__(self, block: Block, text_field: str, min_chars: int, max_document_chars: int,
                 on_invalid_utf8: str, on_bad_record: str):
        self.b = block
        self.text_field = text_field
        self.min_chars = min_chars
        self.max_chars = max_document_chars
        self.on_invalid_utf8 = on_invalid_utf8
        self.on_bad_record = on_bad_record
        self.stats = ReadStats()

    @classmethod
    def from_config(cls, block: Block, cfg: dict) -> "DocumentReader":
        return cls(block, cfg["text_field"], cfg["min_chars"], cfg["max_document_chars"], cfg["on_invalid_utf8"],
                   cfg["on_bad_record"])

    def _problem(self, kind: str, mode: str, loc: dict, message: str) -> None:
        info = {"kind": kind, **loc, "message": message}
        if mode == "error":
            raise BlockRefused(info)
        if len(self.stats.problems) < self.MAX_PROBLEMS:
            self.stats.problems.append(info)

    def _finish(self, sentences: list[str], chars: int) -> Optional[list[str]]:
        self.stats.documents_read += 1
        if chars == 0:
            self.stats.empty_dropped += 1
            return None
        if chars < self.min_chars:
            self.stats.too_short_dropped += 1
            return None
        self.stats.documents_kept += 1
        self.stats.chars += chars
        return sentences

    def __iter__(self) -> Iterator[list[str]]:
        try:
            if self.b.format == "parquet":
                yield from self._parquet()
            else:
                yield from self._lines()
        except BlockRefused as exc:
            self.stats.error = exc.info
            raise

    def _decode(self, off: int, rel_line: int, raw: bytes) -> Optional[str]:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.stats.invalid_utf8_skipped += 1
            self._problem("invalid_utf8", self.on_invalid_utf8, {"byte": off + exc.start, "rel_line": rel_line},
                          f"invalid UTF-8 at byte {off + exc.start}")
            return None

    def _text_doc(self, text: str) -> Iterator[list[str]]:
        """A jsonl/parquet document: paragraphs by newline, sentences by punctuation; cut when too long."""
        sentences: list[str] = []
        chars = 0
        for para in text.split("\n"):
            line = normalise(para)
            if not line:
                continue
            if chars + len(line) > self.max_chars and sentences:
                self.stats.documents_cut += 1
                doc = self._finish(sentences, chars)
                if doc:
                    yield doc
                sentences, chars = [], 0
            sentences.extend(split_sentences(line[: self.max_chars]))
            chars += min(len(line), self.max_chars)
        doc = self._finish(sentences, chars)
        if doc:
            yield doc

    def _lines(self) -> Iterator[list[str]]:
        fs, path = filesystem(self.b.uri)
        jsonl = self.b.format == "jsonl"
        sentences: list[str] = []
        chars = 0
        with fs.open_input_file(path) as f:
            for rel, (off, raw) in enumerate(_iter_lines(f, self.b.start, self.b.end, self.b.uri), start=1):
                self.stats.lines += 1
                self.stats.bytes += len(raw) + 1
                text = self._decode(off, rel, raw)
                if text is None:
                    continue
                if jsonl:
                    if not text.strip():
                        continue
                    try:
                        obj = json.loads(text)
                    except ValueError as exc:
                        self.stats.bad_records_skipped += 1
                        self._problem("bad_record", self.on_bad_record, {"byte": off, "rel_line": rel},
                                      f"not a JSON line ({exc.msg}) at byte {off}")
                        continue
                    val = obj.get(self.text_field) if isinstance(obj, dict) else None
                    if not isinstance(val, str):
                        self.stats.bad_records_skipped += 1
                        what = "has no" if not isinstance(obj, dict) or self.text_field not in obj else "has a non-string"
                        self._problem("bad_record", self.on_bad_record, {"byte": off, "rel_line": rel},
                                      f"JSON line {what} text field '{self.text_field}' (text_field) at byte {off}")
                        continue
                    yield from self._text_doc(val)
                    continue
                line = normalise(text)
                if not line:
                    if sentences:
                        doc = self._finish(sentences, chars)
                        if doc:
                            yield doc
                        sentences, chars = [], 0
                    continue
                if chars + len(line) > self.max_chars and sentences:
                    self.stats.documents_cut += 1
                    doc = self._finish(sentences, chars)
                    if doc:
                        yield doc
                    sentences, chars = [], 0
                sentences.extend(split_sentences(line[: self.max_chars]))
                chars += min(len(line), self.max_chars)
        if sentences:
            doc = self._finish(sentences, chars)
            if doc:
                yield doc

    def _parquet(self) -> Iterator[list[str]]:
        import pyarrow.parquet as pq

        fs, path = filesystem(self.b.uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            row = self.b.first_row
            for batch in pf.iter_batches(batch_size=1024, row_groups=list(range(self.b.start, self.b.end)),
                                         columns=[self.text_field]):
                for val in batch.column(0).to_pylist():
                    self.stats.lines += 1
                    if val is None:
                        self.stats.documents_read += 1
                        self.stats.empty_dropped += 1
                    elif not isinstance(val, str):
                        self.stats.bad_records_skipped += 1
                        self._problem("bad_record", self.on_bad_record, {"row": row},
                                      f"row {row}: column '{self.text_field}' is not a string")
                    else:
                        self.stats.bytes += len(val)
                        yield from self._text_doc(val)
                    row += 1


def text_hash(text: str) -> int:
    """64-bit hash of a normalised document, its sentences joined by "\\n": the dedup key, and the key of the
    held-out split (`corpus.is_eval_hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
