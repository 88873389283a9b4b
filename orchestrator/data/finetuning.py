"""Fine-tuning data layer: readers, feature builders, collation and QA post-processing.

Three tasks:

* ``classify`` -- single sentence or sentence-pair classification from tsv/csv (with or without a header),
  jsonl, parquet or a ``datasets.save_to_disk`` dir
  (:func:`read_classification`, :func:`build_label_map`, :func:`encode_labels`,
  :func:`featurize_classification`).
* ``ner`` -- token classification from CoNLL-style files (:func:`read_conll`,
  :func:`build_tag_map`, :func:`featurize_ner`, :func:`decode_ner`).
* ``qa`` -- extractive QA from SQuAD v1.1/v2.0 JSON (:func:`read_squad`,
  :func:`featurize_qa_train`, :func:`featurize_qa_eval`, :func:`postprocess_qa`,
  :func:`squad_metrics`).

Feature builders return *columns* (a dict of equally long lists, one entry per feature,
sequences unpadded); :func:`feature_rows` turns them into per-feature dicts and
:func:`pad_batch` pads a list of those into numpy arrays.  Every bad-input error is an
:class:`orchestrator.errors.DataError` whose one-line message names the file and the line
(1-based) or the JSON location.  This module never imports torch.
"""

from __future__ import annotations

import collections
import csv
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from orchestrator.errors import DataError

IGNORE_INDEX = -100
"""Label value ignored by the loss (subword continuations, special tokens, padding)."""

_SEQUENCE_PAD = {"input_ids": None, "token_type_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


def _short(text: str, limit: int = 60) -> str:
    """A one-line, quoted, length-limited rendering of ``text`` for error messages."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a regular file")


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    text_pair: str | None
    label: str  # raw label as a string ("0", "positive", ...); jsonl integers become "1"
    line: int  # 1-based line of the record in its file


_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
CLASSIFICATION_FORMATS = ("tsv", "csv", "jsonl", "parquet", "datasets")


def _infer_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        if file_format not in CLASSIFICATION_FORMATS:
            raise DataError(path, f"unknown file_format {file_format!r} (expected {', '.join(CLASSIFICATION_FORMATS)})")
        return file_format
    if path.is_dir():
        return "datasets"
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(path, f"cannot infer the format from suffix {path.suffix!r}; use .tsv, .csv, .jsonl or .parquet,"
                              " a datasets.save_to_disk dir, or pass file_format")
    return fmt


def _label_str(path: Path, value: Any, line: int, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(path, f"label column '{column}' must hold a string or an integer, got {value!r}", line=line)
    text = str(value).strip()
    if not text:
        raise DataError(path, f"empty label in column '{column}'", line=line)
    return text


def _text_value(path: Path, value: Any, line: int, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(path, f"text column '{column}' must hold a string, got {type(value).__name__}", line=line)
    if not value.strip():
        raise DataError(path, f"empty text in column '{column}'", line=line)
    return value


def _check_columns(path: Path, wanted: list[tuple[str, str]], found: Sequence[str], what: str, line=None) -> None:
    for role, column in wanted:
        if column not in found:
            raise DataError(path, f"{role} column '{column}' missing; {what} found: {', '.join(found) or 'none'}",
                            line=line)


def _jsonl_records(path: Path, wanted):
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"malformed JSON line: {exc.msg} (column {exc.colno})", line=line_no) from None
            if not isinstance(record, dict):
                raise DataError(path, f"expected a JSON object, got {type(record).__name__}", line=line_no)
            _check_columns(path, wanted, sorted(record), "keys", line=line_no)
            yield record, line_no


def _delimited_records(path: Path, wanted, fmt: str, header: bool):
    """tsv (quoting off: SST-2 sentences hold quotes) or csv rows as dicts keyed by the header's names, or by each
    column's 0-based index ("0", "1", ...) in a file without a header row."""
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(handle)
        try:
            names = None
            if header:
                names = next(reader, None)
                while names is not None and not any(cell.strip() for cell in names):
                    names = next(reader, None)
                if names is None:
                    raise DataError(path, "file is empty (expected a header row; task.header=false for none)")
                names = [cell.strip() for cell in names]
                _check_columns(path, wanted, names, "columns", line=reader.line_num)
            start = reader.line_num + 1
            for row in reader:
                line_no, start = start, reader.line_num + 1
                if not row or not any(cell.strip() for cell in row):
                    continue
                if names is None:  # headerless: the first row fixes the column count
                    names = [str(i) for i in range(len(row))]
                    _check_columns(path, wanted, names, "column indices (no header)", line=line_no)
                if len(row) != len(names):
                    raise DataError(path, f"row has {len(row)} fields, {'the header has' if header else 'the first row had'}"
                                          f" {len(names)}", line=line_no)
                yield dict(zip(names, row)), line_no
        except csv.Error as exc:
            raise DataError(path, f"malformed {fmt}: {exc}", line=reader.line_num) from None


def _table_records(path: Path, wanted, fmt: str):
    """Rows of a parquet file, or of a `datasets` dir (Dataset.save_to_disk); `line` is the 1-based row."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors have many types; name the file
            raise DataError(path, f"cannot read parquet: {str(exc).splitlines()[0]}") from None
        columns, rows = table.column_names, table.to_pylist()
    else:
        try:
            import datasets
        except ImportError:
            raise DataError(path, "reading a datasets dir needs the `datasets` package (pip install datasets)") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise DataError(path, f"not a datasets.save_to_disk dir: {str(exc).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(path, f"holds a DatasetDict ({', '.join(ds)}): give one split's dir, e.g. {path}/{next(iter(ds))}")
        columns, rows = ds.column_names, ds
    _check_columns(path, wanted, list(columns), "columns")
    for i, row in enumerate(rows, start=1):
        yield row, i


def table_records(path: Path, wanted, fmt: str, header: bool = True):
    """(record, line) pairs of a jsonl, tsv/csv, parquet or datasets file, with the `wanted` columns checked."""
    if fmt == "jsonl":
        return _jsonl_records(path, wanted)
    if fmt in ("tsv", "csv"):
        return _delimited_records(path, wanted, fmt, header)
    return _table_records(path, wanted, fmt)


def read_classification(
    path: str | Path,
    text_column: str,
    text_pair_column: str | None = None,
    label_column: str = "label",
    file_format: str | None = None,
    header: bool = True,
) -> list[ClassificationExample]:
    """Read a classification split: tsv or csv (with a header row, or `header=False` and columns named by their
    0-based index), jsonl (one JSON object per line), parquet, or a `datasets.save_to_disk` dir.  Blank lines are
    skipped.  Raises DataError for a missing file, a missing text/label column (naming the columns found), a row
    with the wrong number of fields, a malformed jsonl line, an empty text or label, and an empty split.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    fmt = _infer_format(path, file_format)
    if fmt == "datasets" and not path.is_dir():
        raise DataError(path, "not a directory (file_format datasets: a datasets.save_to_disk dir)")
    if fmt != "datasets" and not path.is_file():
        raise DataError(path, "not a regular file")
    wanted = [("text", text_column)] + ([("text pair", text_pair_column)] if text_pair_column else [])
    wanted.append(("label", label_column))
    records = table_records(path, wanted, fmt, header)
    examples: list[ClassificationExample] = []
    try:
        for record, line in records:
            text = _text_value(path, record[text_column], line, text_column)
            pair = _text_value(path, record[text_pair_column], line, text_pair_column) if text_pair_column else None
            label = _label_str(path, record[label_column], line, label_column)
            examples.append(ClassificationExample(text, pair, label, line))
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not examples:
        raise DataError(path, "no examples (empty split)")
    return examples


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def build_label_map(train_examples: Iterable[ClassificationExample]) -> list[str]:
    """Sorted list of the labels seen in training; index = label id.

    Integer-like labels sort numerically ("2" < "10"), otherwise lexicographically.
    """
    labels = {ex.label for ex in train_examples}
    if labels and all(_is_int(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def encode_labels(
    examples: Sequence[ClassificationExample], labels: Sequence[str], path: str | Path
) -> np.ndarray:
    """Label ids (int64) for ``examples`` given the training label list.

    A label not in ``labels`` raises DataError naming ``path`` and the example's line.
    """
    index = {label: i for i, label in enumerate(labels)}
    ids = np.empty(len(examples), dtype=np.int64)
    for i, ex in enumerate(examples):
        if ex.label not in index:
            raise DataError(
                path,
                f"label {ex.label!r} was not seen in the training split (known labels: {', '.join(labels)})",
                line=ex.line,
            )
        ids[i] = index[ex.label]
    return ids


def featurize_classification(
    examples: Sequence[ClassificationExample],
    tokenizer: Any,
    max_seq_length: int,
    label_list: Sequence[str] | None = None,
    path: str | Path = "<examples>",
) -> dict[str, Any]:
    """Tokenize classification examples.

    Returns ``{"input_ids", "token_type_ids", "attention_mask"}`` as lists of unpadded int
    lists and ``"labels"`` as an int64 array.  Pairs become ``[CLS] A [SEP] B [SEP]``
    (token types 0/1) truncated 'longest_first'.  ``label_list`` is the *training* label
    list (:func:`build_label_map`); when None it is built from ``examples`` -- only right
    for the training split.  ``path`` names the file in unknown-label errors.
    """
    if not examples:
        return {"input_ids": [], "token_type_ids": [], "attention_mask": [], "labels": np.zeros(0, np.int64)}
    pairs = [ex.text_pair for ex in examples]
    has_pair = pairs[0] is not None
    if any((p is not None) != has_pair for p in pairs):
        raise ValueError("featurize_classification: examples mix single sentences and sentence pairs")
    if label_list is None:
        label_list = build_label_map(examples)
    labels = encode_labels(examples, label_list, path)
    enc = tokenizer(
        [ex.text for ex in examples],
        pairs if has_pair else None,
        truncation="longest_first",
        max_length=max_seq_length,
        padding=False,
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    return {
        "input_ids": list(enc["input_ids"]),
        "token_type_ids": list(enc["token_type_ids"]),
        "attention_mask": list(enc["attention_mask"]),
        "labels": labels,
    }


# --------------------------------------------------------------------------------------
# NER (CoNLL, BIO / IOB2)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NerSentence:
    tokens: list[str]
    tags: list[str]
    line: int  # 1-based line of the sentence's first token
    tag_lines: list[int] = field(default_factory=list, compare=False, repr=False)  # line of each token


_TAG_RE = re.compile(r"^(O|[BI]-\S+)$")


def _split_fields(raw: str, delimiter: str | None, tab_mode: bool) -> list[str]:
    if delimiter is not None:
        return [f.strip() for f in raw.split(delimiter)]
    if tab_mode:
        return [f.strip(" \r\n\f\v") for f in raw.split("\t")]
    return raw.split()


def read_conll(
    path: str | Path,
    token_column: int = 0,
    tag_column: int = -1,
    delimiter: str | None = None,
    repair_bio: bool = False,
) -> list[NerSentence]:
    """Read a CoNLL-style token/tag file into sentences.

    Blank lines (also lines holding only whitespace) separate sentences; ``-DOCSTART-``
    lines are skipped (and end the current sentence).  With ``delimiter=None`` the file is
    tab-separated if its first data line contains a tab, else split on whitespace.  Every
    data line must have as many columns as the first one.  Tags must be ``O``, ``B-X`` or
    ``I-X`` (BIO / IOB2).  An ``I-X`` that does not follow ``B-X``/``I-X`` is accepted as
    is (seqeval's default CoNLL scoring treats it as the start of an entity anyway);
    with ``repair_bio=True`` it is rewritten to ``B-X``.
    """
    path = Path(path)
    _check_file(path)
    sentences: list[NerSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    n_columns: int | None = None
    first_line = 0
    tab_mode = False

    def flush() -> None:
        nonlocal tokens, tags, lines
        if tokens:
            sentences.append(NerSentence(tokens, tags, lines[0], lines))
        tokens, tags, lines = [], [], []

    try:
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            for line_no, raw in enumerate(handle, start=1):
                raw = raw.rstrip("\r\n")
                if not raw.strip():
                    flush()
                    continue
                if raw.lstrip().startswith("-DOCSTART-"):
                    flush()
                    continue
                if n_columns is None:
                    tab_mode = delimiter is None and "\t" in raw
                fields = _split_fields(raw, delimiter, tab_mode)
                if n_columns is None:
                    n_columns, first_line = len(fields), line_no
                    for name, col in (("token_column", token_column), ("tag_column", tag_column)):
                        if not -n_columns <= col < n_columns:
                            raise DataError(
                                path, f"{name}={col} is out of range for a line with {n_columns} columns", line=line_no
                            )
                    if n_columns < 2:
                        raise DataError(path, "expected at least 2 columns (token and tag), found 1", line=line_no)
                if len(fields) != n_columns:
                    raise DataError(
                        path,
                        f"expected {n_columns} columns (as on line {first_line}), found {len(fields)}",
                        line=line_no,
                    )
                token, tag = fields[token_column], fields[tag_column]
                if not token:
                    raise DataError(path, "empty token", line=line_no)
                if not _TAG_RE.match(tag):
                    raise DataError(path, f"tag {tag!r} is not BIO/IOB2 (expected O, B-TYPE or I-TYPE)", line=line_no)
                if repair_bio and tag.startswith("I-"):
                    prev = tags[-1] if tags else "O"
                    if prev == "O" or prev[2:] != tag[2:]:
                        tag = "B-" + tag[2:]
                tokens.append(token)
                tags.append(tag)
                lines.append(line_no)
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    flush()
    if not sentences:
        raise DataError(path, "no sentences (empty split)")
    return sentences


def build_tag_map(sentences: Iterable[NerSentence]) -> list[str]:
    """Tag list (index = tag id): ``O`` first, then entity tags sorted by type, B before I."""
    tags = {t for s in sentences for t in s.tags}
    tags.add("O")
    others = sorted(tags - {"O"}, key=lambda t: (t[2:], t[0]))
    return ["O"] + others


def featurize_ner(
    sentences: Sequence[NerSentence],
    tokenizer: Any,
    tag_to_id: Mapping[str, int] | Sequence[str],
    max_seq_length: int,
    path: str | Path = "<sentences>",
) -> dict[str, Any]:
    """Tokenize pre-split sentences and align word tags to subwords.

    The first subword of each word carries the word's tag id; other subwords and special
    tokens get -100.  Words cut off by truncation get no label (they are predicted 'O' by
    :func:`decode_ner`).  Returns columns ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels`` (unpadded int lists), ``word_ids`` (per token: word
    index or None) and ``num_words`` (words in the sentence, truncated or not).  A tag not
    in ``tag_to_id`` raises DataError naming ``path`` and the token's line.
    """
    if not isinstance(tag_to_id, Mapping):
        tag_to_id = {t: i for i, t in enumerate(tag_to_id)}
    out: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "attention_mask", "labels", "word_ids", "num_words")}
    if not sentences:
        return out
    enc = tokenizer(
        [list(s.tokens) for s in sentences],
        is_split_into_words=True,
        truncation=True,
        max_length=max_seq_length,
        padding=False,
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    for i, sent in enumerate(sentences):
        word_ids = enc.word_ids(i)
        labels = []
        previous = None
        for wid in word_ids:
            if wid is None or wid == previous:
                labels.append(IGNORE_INDEX)
            else:
                tag = sent.tags[wid]
                if tag not in tag_to_id:
                    line = sent.tag_lines[wid] if sent.tag_lines else sent.line
                    raise DataError(path, f"tag {tag!r} was not seen in the training split", line=line)
                labels.append(tag_to_id[tag])
            if wid is not None:
                previous = wid
        out["input_ids"].append(list(enc["input_ids"][i]))
        out["token_type_ids"].append(list(enc["token_type_ids"][i]))
        out["attention_mask"].append(list(enc["attention_mask"][i]))
        out["labels"].append(labels)
        out["word_ids"].append(list(word_ids))
        out["num_words"].append(len(sent.tokens))
    return out


def decode_ner(
    pred_ids_per_token: Sequence[int] | np.ndarray,
    word_ids: Sequence[int | None],
    id_to_tag: Sequence[str] | Mapping[int, str],
    num_words: int,
) -> list[str]:
    """Per-word tags from per-token predicted ids (the first subword of a word decides).

    ``pred_ids_per_token`` may be padded beyond ``len(word_ids)``.  Words with no token
    (cut by truncation or dropped by the tokenizer) are 'O'.
    """
    tags = ["O"] * num_words
    seen: set[int] = set()
    for position, wid in enumerate(word_ids):
        if wid is None or wid in seen or wid >= num_words:
            continue
        seen.add(wid)
        tags[wid] = id_to_tag[int(pred_ids_per_token[position])]
    return tags


# --------------------------------------------------------------------------------------
# QA (SQuAD v1.1 / v2.0)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SquadAnswer:
    text: str
    answer_start: int


@dataclass(frozen=True)
class QAExample:
    qid: str
    question: str
    context: str
    answers: list[SquadAnswer]  # empty when is_impossible
    is_impossible: bool = False
    title: str = ""
    location: str = ""  # JSON path, e.g. data[0].paragraphs[3].qas[1]
    plausible_answers: list[SquadAnswer] = field(default_factory=list)


def _need(path: Path, obj: Any, key: str, kind: type | tuple, where: str, qid: str | None = None) -> Any:
    who = f"question id {qid!r} at " if qid is not None else ""
    if not isinstance(obj, dict):
        raise DataError(path, f"{who}{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(path, f"{who}{where}: missing key '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(path, f"{who}{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _read_answers(path: Path, qa: dict, key: str, context: str, where: str, qid: str) -> list[SquadAnswer]:
    answers = []
    for k, ans in enumerate(_need(path, qa, key, list, where, qid)):
        loc = f"{where}.{key}[{k}]"
        text = _need(path, ans, "text", str, loc, qid)
        start = _need(path, ans, "answer_start", int, loc, qid)
        if start < 0 or context[start : start + len(text)] != text:
            found = context[max(start, 0) : max(start, 0) + len(text)]
            raise DataError(
                path,
                f"question id {qid!r} at {loc}: answer_start {start} does not match the answer text: "
                f"context[{start}:{start + len(text)}] is {_short(found)}, text is {_short(text)}",
            )
        answers.append(SquadAnswer(text, start))
    return answers


def read_squad(path: str | Path) -> list[QAExample]:
    """Read SQuAD v1.1 / v2.0 JSON (data -> paragraphs -> context, qas).

    Checks that keys exist with the right types, question ids are unique, every answer
    (and v2 plausible answer) satisfies ``context[answer_start:answer_start+len(text)] ==
    text``, answerable questions have answers and impossible ones have none.  Errors name
    the file, the question id and the JSON path (``data[0].paragraphs[3].qas[1]``).
    """
    path = Path(path)
    _check_file(path)
    try:
        with path.open("r", encoding="utf-8-sig") as handle:
            doc = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"malformed JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(doc, dict):
        raise DataError(path, "top level: expected a JSON object with key 'data'")
    articles = _need(path, doc, "data", list, "top level")
    examples: list[QAExample] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(articles):
        where_a = f"data[{a}]"
        paragraphs = _need(path, article, "paragraphs", list, where_a)
        title = article.get("title", "") if isinstance(article.get("title", ""), str) else ""
        for p, paragraph in enumerate(paragraphs):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = _need(path, paragraph, "context", str, where_p)
            qas = _need(path, paragraph, "qas", list, where_p)
            for q, qa in enumerate(qas):
                where = f"{where_p}.qas[{q}]"
                qid = _need(path, qa, "id", (str, int), where)
                qid = str(qid)
                question = _need(path, qa, "question", str, where, qid)
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise DataError(path, f"question id {qid!r} at {where}.is_impossible: expected a boolean")
                if "answers" in qa or not impossible:
                    answers = _read_answers(path, qa, "answers", context, where, qid)
                else:
                    answers = []
                plausible = _read_answers(path, qa, "plausible_answers", context, where, qid) if "plausible_answers" in qa else []
                if impossible and answers:
                    raise DataError(path, f"question id {qid!r} at {where}: is_impossible is true but answers is not empty")
                if not impossible and not answers:
                    raise DataError(path, f"question id {qid!r} at {where}: no answers and not marked is_impossible")
                if qid in seen:
                    raise DataError(path, f"question id {qid!r} at {where}: duplicate id (first at {seen[qid]})")
                seen[qid] = where
                examples.append(QAExample(qid, question, context, answers, impossible, title, where, plausible))
    if not examples:
        raise DataError(path, "no questions (empty split)")
    return examples


def _check_qa_lengths(max_seq_length: int, doc_stride: int, max_query_length: int) -> None:
    room = max_seq_length - max_query_length - 3
    if room < 1:
        raise ValueError(
            f"max_seq_length ({max_seq_length}) must exceed max_query_length ({max_query_length}) + 3 special tokens"
        )
    if not 0 <= doc_stride < room:
        raise ValueError(
            f"doc_stride ({doc_stride}) must be >= 0 and < max_seq_length - max_query_length - 3 ({room})"
        )


def _truncate_questions(questions: list[str], tokenizer: Any, max_query_length: int) -> list[str]:
    """Cut each question after its ``max_query_length``-th token (by character offset)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offsets in zip(questions, enc["offset_mapping"]):
        out.append(q[: offsets[max_query_length - 1][1]] if len(offsets) > max_query_length else q)
    return out


def _encode_qa(examples: Sequence[QAExample], tokenizer: Any, max_seq_length: int, doc_stride: int, max_query_length: int):
    _check_qa_lengths(max_seq_length, doc_stride, max_query_length)
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError("QA featurization expects a tokenizer with padding_side='right'")
    questions = _truncate_questions([ex.question.lstrip() for ex in examples], tokenizer, max_query_length)
    return tokenizer(
        questions,
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
        return_attention_mask=True,
        padding=False,
    )


def featurize_qa_train(
    examples: Sequence[QAExample],
    tokenizer: Any,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
) -> dict[str, Any]:
    """Windowed training features for extractive QA (as HF run_qa).

    Each example yields one feature per window of the context (``doc_stride`` = tokens
    shared by consecutive windows, HF semantics).  Questions longer than
    ``max_query_length`` tokens are cut.  ``start_positions``/``end_positions`` are the
    token indices of the first answer, or the [CLS] index (0) when the window does not
    contain the whole answer or the question is impossible.  Returns columns
    ``input_ids``, ``token_type_ids``, ``attention_mask`` (unpadded lists),
    ``start_positions``, ``end_positions`` (ints) and ``example_index`` (row in
    ``examples``).
    """
    keys = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions", "example_index")
    out: dict[str, list] = {k: [] for k in keys}
    if not examples:
        return out
    enc = _encode_qa(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        ex = examples[sample]
        input_ids = list(enc["input_ids"][i])
        offsets = enc["offset_mapping"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        start_pos = end_pos = cls_index
        if not ex.is_impossible and ex.answers:
            start_char = ex.answers[0].answer_start
            end_char = start_char + len(ex.answers[0].text)
            seq_ids = enc.sequence_ids(i)
            ctx = [t for t, s in enumerate(seq_ids) if s == 1]
            if ctx and offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
                t = ctx[0]
                while t <= ctx[-1] and offsets[t][0] <= start_char:
                    t += 1
                start_pos = t - 1
                t = ctx[-1]
                while t >= ctx[0] and offsets[t][1] >= end_char:
                    t -= 1
                end_pos = t + 1
        out["input_ids"].append(input_ids)
        out["token_type_ids"].append(list(enc["token_type_ids"][i]))
        out["attention_mask"].append(list(enc["attention_mask"][i]))
        out["start_positions"].append(start_pos)
        out["end_positions"].append(end_pos)
        out["example_index"].append(int(sample))
    return out


def featurize_qa_eval(
    examples: Sequence[QAExample],
    tokenizer: Any,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
) -> dict[str, Any]:
    """Windowed evaluation features: columns ``input_ids``, ``token_type_ids``,
    ``attention_mask`` (unpadded lists), ``example_id`` (question id), ``example_index``
    and ``offset_mapping`` (per token a ``(start, end)`` character span in the context, or
    None for question and special tokens)."""
    keys = ("input_ids", "token_type_ids", "attention_mask", "example_id", "example_index", "offset_mapping")
    out: dict[str, list] = {k: [] for k in keys}
    if not examples:
        return out
    enc = _encode_qa(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        seq_ids = enc.sequence_ids(i)
        offsets = [tuple(o) if seq_ids[t] == 1 else None for t, o in enumerate(enc["offset_mapping"][i])]
        out["input_ids"].append(list(enc["input_ids"][i]))
        out["token_type_ids"].append(list(enc["token_type_ids"][i]))
        out["attention_mask"].append(list(enc["attention_mask"][i]))
        out["example_id"].append(examples[sample].qid)
        out["example_index"].append(int(sample))
        out["offset_mapping"].append(offsets)
    return out


def postprocess_qa(
    examples: Sequence[QAExample],
    features: Mapping[str, Sequence[Any]],
    start_logits: Sequence[Sequence[float]] | np.ndarray,
    end_logits: Sequence[Sequence[float]] | np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """Turn per-feature start/end logits into ``{question id: answer text}`` (HF run_qa).

    ``features`` is the dict from :func:`featurize_qa_eval`; logits have one row per
    feature and may be padded (positions past the feature's length are ignored).  For
    every window the ``n_best_size`` best starts and ends are combined into spans inside
    the context with ``end >= start`` and at most ``max_answer_length`` tokens; the best
    score (start + end logit) over all windows wins.  With ``version_2`` the null score is
    the minimum over windows of ``start[0] + end[0]`` (CLS) and the answer is "" when
    ``null - best_span_score > null_score_diff_threshold``.  Differs from HF only in
    returning "" (not the string "empty") when no valid span exists.
    """
    if len(start_logits) != len(features["example_id"]) or len(end_logits) != len(features["example_id"]):
        raise ValueError("postprocess_qa: need one row of start/end logits per feature")
    by_qid: dict[str, list[int]] = collections.defaultdict(list)
    for f, qid in enumerate(features["example_id"]):
        by_qid[qid].append(f)
    predictions: dict[str, str] = {}
    for ex in examples:
        best_text, best_score = "", -np.inf
        null_score = None
        for f in by_qid.get(ex.qid, []):
            starts = np.asarray(start_logits[f], dtype=np.float64)
            ends = np.asarray(end_logits[f], dtype=np.float64)
            offsets = features["offset_mapping"][f]
            feature_null = starts[0] + ends[0]
            if null_score is None or feature_null < null_score:
                null_score = feature_null
            start_idx = np.argsort(starts, kind="stable")[-1 : -n_best_size - 1 : -1]
            end_idx = np.argsort(ends, kind="stable")[-1 : -n_best_size - 1 : -1]
            for s in start_idx:
                for e in end_idx:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = starts[s] + ends[e]
                    if score > best_score:
                        best_score = score
                        best_text = ex.context[offsets[s][0] : offsets[e][1]]
        if version_2 and null_score is not None:
            if best_score == -np.inf or null_score - best_score > null_score_diff_threshold:
                best_text = ""
        predictions[ex.qid] = best_text
    return predictions


def normalize_answer(s: str) -> str:
    """Official SQuAD normalisation: lower, drop punctuation, drop a/an/the, fix whitespace."""
    s = s.lower()
    exclude = set(string.punctuation)
    s = "".join(ch for ch in s if ch not in exclude)
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def _f1_v1(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _f1_v2(prediction: str, gold: str) -> float:
    gold_toks = normalize_answer(gold).split()
    pred_toks = normalize_answer(prediction).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    return _f1_v1(prediction, gold)


def squad_metrics(
    predictions: Mapping[str, str], examples: Sequence[QAExample], version_2: bool | None = None
) -> dict[str, float]:
    """Exact match and F1 (percent) as the official SQuAD evaluation scripts compute them.

    ``version_2=None`` picks v2 when any example is impossible.  v1.1: max over all gold
    texts, F1 0 when no token overlaps.  v2.0: gold texts that normalise to "" are
    dropped and an unanswerable question has gold [""]; F1 is 1 when both prediction and
    gold are empty.  Returns ``exact``, ``f1``, ``total`` and for v2 also
    ``HasAns_exact/f1/total`` and ``NoAns_exact/f1/total`` (each only when that subset is
    non-empty).  A question without a prediction scores 0.
    """
    if version_2 is None:
        version_2 = any(ex.is_impossible for ex in examples)
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_ans: dict[str, bool] = {}
    for ex in examples:
        golds = [a.text for a in ex.answers]
        if version_2:
            golds = [g for g in golds if normalize_answer(g)] or [""]
        has_ans[ex.qid] = bool(ex.answers)
        if ex.qid not in predictions:
            exact[ex.qid] = f1[ex.qid] = 0.0
            continue
        pred = predictions[ex.qid]
        exact[ex.qid] = max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1_fn = _f1_v2 if version_2 else _f1_v1
        f1[ex.qid] = max(f1_fn(pred, g) for g in golds)

    def summary(qids: list[str], prefix: str = "") -> dict[str, float]:
        n = len(qids)
        return {
            f"{prefix}exact": 100.0 * sum(exact[q] for q in qids) / n if n else 0.0,
            f"{prefix}f1": 100.0 * sum(f1[q] for q in qids) / n if n else 0.0,
            f"{prefix}total": n,
        }

    result = summary(list(exact))
    if version_2:
        has = [q for q in exact if has_ans[q]]
        no = [q for q in exact if not has_ans[q]]
        if has:
            result.update(summary(has, "HasAns_"))
        if no:
            result.update(summary(no, "NoAns_"))
    return result


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------


def feature_rows(features: Mapping[str, Sequence[Any]], keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Column dict (from a ``featurize_*``) -> list of per-feature dicts (only ``keys``)."""
    keys = list(features) if keys is None else list(keys)
    if not keys:
        return []
    n = len(features[keys[0]])
    for k in keys:
        if len(features[k]) != n:
            raise ValueError(f"feature column {k!r} has {len(features[k])} rows, expected {n}")
    return [{k: features[k][i] for k in keys} for i in range(n)]


def pad_batch(
    features_list: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, np.ndarray]:
    """Pad a list of per-feature dicts into int64 numpy arrays of shape [batch, seq].

    ``input_ids`` pad with ``pad_token_id``, ``token_type_ids`` and ``attention_mask``
    with 0 (an absent ``attention_mask`` is created), sequence ``labels`` (NER) with -100.
    Scalar fields (classification ``labels``, ``start_positions``, ``end_positions``,
    ``example_index``) become [batch] arrays.  Non-numeric bookkeeping fields
    (``word_ids``, ``offset_mapping``, ``example_id``, ``num_words``) are left out: keep
    them from the featurize output for decoding.  Padding is on the right.
    """
    if not features_list:
        raise ValueError("pad_batch: empty batch")
    skip = {"word_ids", "offset_mapping", "example_id", "num_words"}
    lengths = [len(f["input_ids"]) for f in features_list]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, np.ndarray] = {}
    keys = [k for k in features_list[0] if k not in skip]
    if "attention_mask" not in keys:
        keys.append("attention_mask")
    for key in keys:
        first = features_list[0].get(key)
        if key == "attention_mask" and first is None:
            arr = np.zeros((len(features_list), width), dtype=np.int64)
            for i, n in enumerate(lengths):
                arr[i, :n] = 1
            batch[key] = arr
            continue
        if isinstance(first, (list, tuple, np.ndarray)):
            pad = pad_token_id if key == "input_ids" else _SEQUENCE_PAD.get(key, 0)
            arr = np.full((len(features_list), width), pad, dtype=np.int64)
            for i, f in enumerate(features_list):
                seq = f[key]
                if len(seq) != lengths[i]:
                    raise ValueError(f"pad_batch: feature {i} has {len(seq)} {key} but {lengths[i]} input_ids")
                arr[i, : len(seq)] = seq
            batch[key] = arr
        else:
            batch[key] = np.asarray([f[key] for f in features_list], dtype=np.int64)
    return batch


__all__ = [
    "IGNORE_INDEX",
    "ClassificationExample",
    "NerSentence",
    "QAExample",
    "SquadAnswer",
    "build_label_map",
    "build_tag_map",
    "decode_ner",
    "encode_labels",
    "feature_rows",
    "featurize_classification",
    "featurize_ner",
    "featurize_qa_eval",
    "featurize_qa_train",
    "normalize_answer",
    "pad_batch",
    "postprocess_qa",
    "read_classification",
    "read_conll",
    "read_squad",
    "squad_metrics",
]
