"""Retrieval data (driver side) for the bi-encoder ``task=embed`` and the cross-encoder ``task=rerank``.

* Training pairs: tsv/csv with a header row, or jsonl. Columns ``query`` and ``positive`` (names configurable);
  negatives are every column whose name starts with ``negative`` (``negative``, ``negative_1``, ``negative2`` ...,
  empty cells ignored) or, in jsonl, a field ``negatives`` holding a list of strings. :func:`write_pairs` writes
  jsonl ``{"query", "positive", "negatives": [...]}``.
* Evaluation sets use the BEIR layout: ``corpus.jsonl`` (``{"_id", "title", "text"}``), ``queries.jsonl``
  (``{"_id", "text"}``) and ``qrels/test.tsv`` (or ``qrels.tsv``) with header ``query-id	corpus-id	score``;
  a document's text is ``"title. text"`` when it has a title; only qrels with score > 0 count as relevant.
* Every bad-input error is a one-line :class:`orchestrator.errors.DataError` naming the file and the line.
This module never imports torch; bm25s is imported when a :class:`BM25` index is built.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from orchestrator.data.corpus import _ANIMALS, _DAYS, _FOODS, _JOBS, _NAME_LIST, _PLACES, _VEHICLES
from orchestrator.data.finetuning import (
    _check_file,
    _delimited_records,
    _infer_format,
    _jsonl_records,
    _text_value,
    read_squad,
    table_records,
)
from orchestrator.data.synthetic_tasks import _COLORS
from orchestrator.errors import DataError
from orchestrator.io import write_text_atomic

# ------------------------------------------------------------------------------ pairs


@dataclass(frozen=True)
class PairExample:
    query: str
    positive: str
    negatives: tuple[str, ...]
    line: int  # 1-based line (jsonl) or data row line (tsv/csv) in the file, for error messages


def _negatives(path: Path, record: dict, prefix: str, line: int) -> tuple[str, ...]:
    """Every non-empty string under a key starting with `prefix`, in key order; a key may hold a list of strings."""
    out: list[str] = []
    for key, value in record.items():
        if not key.startswith(prefix) or value is None:
            continue
        values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        for v in values:
            if not isinstance(v, str):
                raise DataError(path, f"negative column '{key}' must hold strings, got {type(v).__name__}", line=line)
            if v.strip():
                out.append(v)
    return tuple(out)


def read_pairs(
    path,
    query_column: str = "query",
    positive_column: str = "positive",
    negative_prefix: str = "negative",
    file_format: str | None = None,
) -> list[PairExample]:
    """Read (query, positive, negatives...) training pairs from tsv/csv with a header row or jsonl (also parquet
    or a datasets dir, whose list columns count like jsonl lists). Negatives: see the module docstring. Raises
    DataError for a missing file, a missing query/positive column (naming it; with the line in jsonl), an empty
    query or positive (with the line), a malformed row, and a file without pairs."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    fmt = _infer_format(path, file_format)
    wanted = [("query", query_column), ("positive", positive_column)]
    records = table_records(path, wanted, fmt)
    pairs: list[PairExample] = []
    try:
        for record, line in records:
            query = _text_value(path, record[query_column], line, query_column)
            positive = _text_value(path, record[positive_column], line, positive_column)
            extra = {k: v for k, v in record.items() if k not in (query_column, positive_column)}
            pairs.append(PairExample(query, positive, _negatives(path, extra, negative_prefix, line), line))
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not pairs:
        raise DataError(path, "no pairs (empty file)")
    return pairs


def _jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_pairs(pairs: list[PairExample], path) -> None:
    """Write pairs as jsonl ``{"query", "positive", "negatives": [...]}``, atomically."""
    rows = ({"query": p.query, "positive": p.positive, "negatives": list(p.negatives)} for p in pairs)
    write_text_atomic(path, _jsonl_text(rows))


# ------------------------------------------------------------------------------- BEIR


@dataclass(frozen=True)
class RetrievalSet:
    corpus: dict[str, str]  # doc id -> text ("title. text" when the BEIR record has a title), insertion order kept
    queries: dict[str, str]  # query id -> text (only queries that have at least one relevant doc in qrels)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance > 0}


def _id_text_records(path: Path, with_title: bool) -> dict[str, str]:
    """id -> text of a BEIR corpus.jsonl / queries.jsonl; errors name the file and the line."""
    _check_file(path)
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for record, line in _jsonl_records(path, [("id", "_id"), ("text", "text")]):
        doc_id, text = record["_id"], record["text"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
            raise DataError(path, f"'_id' must be a non-empty string or an integer, got {doc_id!r}", line=line)
        if not isinstance(text, str):
            raise DataError(path, f"'text' must be a string, got {type(text).__name__}", line=line)
        title = record.get("title") if with_title else None
        if title is not None and not isinstance(title, str):
            raise DataError(path, f"'title' must be a string, got {type(title).__name__}", line=line)
        if title and title.strip():
            text = f"{title}. {text}"
        if not text.strip():
            raise DataError(path, "empty 'text'" + (" and 'title'" if with_title else ""), line=line)
        doc_id = str(doc_id)
        if doc_id in out:
            raise DataError(path, f"duplicate _id {doc_id!r} (first on line {first[doc_id]})", line=line)
        out[doc_id] = text
        first[doc_id] = line
    if not out:
        raise DataError(path, "no records (empty file)")
    return out


def _qrels_path(root: Path) -> Path:
    for candidate in (root / "qrels" / "test.tsv", root / "qrels.tsv"):
        if candidate.is_file():
            return candidate
    raise DataError(root / "qrels" / "test.tsv", f"file not found (nor {root / 'qrels.tsv'})")


def _read_qrels(path: Path, corpus: dict[str, str], queries: dict[str, str]) -> dict[str, dict[str, int]]:
    wanted = [("query id", "query-id"), ("corpus id", "corpus-id"), ("score", "score")]
    qrels: dict[str, dict[str, int]] = {}
    for row, line in _delimited_records(path, wanted, "tsv", header=True):
        qid, doc_id, score = row["query-id"].strip(), row["corpus-id"].strip(), row["score"].strip()
        if qid not in queries:
            raise DataError(path, f"query-id {qid!r} is not in queries.jsonl", line=line)
        if doc_id not in corpus:
            raise DataError(path, f"corpus-id {doc_id!r} is not in corpus.jsonl", line=line)
        if re.fullmatch(r"[+-]?\d+", score) is None:
            raise DataError(path, f"score {score!r} is not an integer", line=line)
        if int(score) > 0:
            qrels.setdefault(qid, {})[doc_id] = int(score)
    return qrels


def read_beir(path) -> RetrievalSet:
    """Read a BEIR dir (see the module docstring). Queries without a relevant document are dropped; queries and
    qrels follow the order of queries.jsonl. Errors name the file and the line (and the id at fault)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(root, "not a directory (expected the BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    corpus = _id_text_records(root / "corpus.jsonl", with_title=True)
    all_queries = _id_text_records(root / "queries.jsonl", with_title=False)
    qrels_file = _qrels_path(root)
    qrels = _read_qrels(qrels_file, corpus, all_queries)
    if not qrels:
        raise DataError(qrels_file, "no query has a relevant document (score > 0)")
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return RetrievalSet(corpus, queries, {qid: qrels[qid] for qid in queries})


def write_beir(rs: RetrievalSet, out_dir) -> None:
    """Write ``rs`` as a BEIR dir (corpus.jsonl with empty titles, queries.jsonl, qrels/test.tsv), each file
    atomically; :func:`read_beir` reads it back equal."""
    out = Path(out_dir)
    for qid, rels in rs.qrels.items():
        if qid not in rs.queries or any(d not in rs.corpus for d in rels):
            raise ValueError(f"write_beir: qrels of query {qid!r} name an unknown query or document")
    for text in (*rs.corpus, *rs.queries, *(d for rels in rs.qrels.values() for d in rels)):
        if re.search(r"[\t\r\n]", text):
            raise ValueError(f"write_beir: id {text!r} holds a tab or newline")
    write_text_atomic(out / "corpus.jsonl", _jsonl_text({"_id": i, "title": "", "text": t} for i, t in rs.corpus.items()))
    write_text_atomic(out / "queries.jsonl", _jsonl_text({"_id": i, "text": t} for i, t in rs.queries.items()))
    lines = ["query-id\tcorpus-id\tscore\n"]
    lines += [f"{qid}\t{doc}\t{rel}\n" for qid, rels in rs.qrels.items() for doc, rel in rels.items()]
    write_text_atomic(out / "qrels" / "test.tsv", "".join(lines))


# ------------------------------------------------------------------------------- BM25

_WORD = re.compile(r"\w+")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Lexical baseline with bm25s (k1=1.5, b=0.75 defaults), lowercased, simple word tokenisation, no stemmer.

    Tokens are the lowercased ``\\w+`` runs (no stopword list, no stemmer). Scores come from bm25s's index
    (Lucene variant); ranking is done here with a stable sort (ties: lower text index first) because bm25s's
    argpartition top-k neither orders ties deterministically nor accepts k > len(corpus). Quiet: no progress bars,
    and bm25s's logger (set to DEBUG by bm25s at import) is lowered to WARNING.
    """

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        import logging

        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)
        if not texts:
            raise ValueError("BM25: no texts to index")
        self.n = len(texts)
        self._index = bm25s.BM25(k1=k1, b=b)
        # every text gets at least one (empty) token so bm25s's vocabulary and length statistics are defined
        self._index.index([_tokens(t) or [""] for t in texts], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every indexed text for ``query`` (float32 [len(texts)]); 0 when no query word is known."""
        ids = self._index.get_tokens_ids(_tokens(query))
        if not ids:
            return np.zeros(self.n, dtype=np.float32)
        return self._index.get_scores_from_ids(ids)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices [nq, k] into texts, scores [nq, k]), best first; k clipped to len(texts)."""
        k = max(0, min(int(k), self.n))
        indices = np.zeros((len(queries), k), dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        for row, query in enumerate(queries):
            s = self.scores(query)
            order = np.argsort(-s, kind="stable")[:k]
            indices[row], scores[row] = order, s[order]
        return indices, scores


def bm25_ranking(rs: RetrievalSet, k: int) -> dict[str, list[str]]:
    """qid -> top-k doc ids by BM25 over ``rs.corpus``."""
    doc_ids = list(rs.corpus)
    indices, _ = BM25(list(rs.corpus.values())).search(list(rs.queries.values()), k)
    return {qid: [doc_ids[i] for i in row] for qid, row in zip(rs.queries, indices)}


# ---------------------------------------------------------------------------- metrics


def retrieval_metrics(
    ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``recall@k`` for k in ``ks``, ``mrr@10`` and ``ndcg@10``, averaged over the queries of ``qrels`` that have a
    relevant document (relevance > 0); a query missing from ``ranked`` scores 0; repeated doc ids count once.

    recall@k = |relevant in top k| / |relevant|; MRR@10 = 1 / rank of the first relevant doc in the top 10, else 0;
    nDCG@10 = DCG / ideal DCG with DCG = sum rel_i / log2(i + 1) over ranks i = 1..10 -- linear gains (rel), as
    trec_eval's ndcg_cut (and pytrec_eval, BEIR's evaluator) uses; graded 2^rel - 1 gains give the same figure
    for binary qrels. Written by hand: the definitions are fixed and short, and neither pytrec_eval nor
    sentence-transformers is then needed on the driver.
    """
    judged = {qid: {d: r for d, r in rels.items() if r > 0} for qid, rels in qrels.items()}
    judged = {qid: rels for qid, rels in judged.items() if rels}
    if not judged:
        raise ValueError("retrieval_metrics: no query in qrels has a relevant document")
    keys = [f"recall@{k}" for k in ks] + ["mrr@10", "ndcg@10"]
    totals = dict.fromkeys(keys, 0.0)
    for qid, rels in judged.items():
        run = list(dict.fromkeys(ranked.get(qid, [])))
        for k in ks:
            totals[f"recall@{k}"] += sum(d in rels for d in run[:k]) / len(rels)
        first = next((i for i, d in enumerate(run[:10]) if d in rels), None)
        totals["mrr@10"] += 0.0 if first is None else 1.0 / (first + 1)
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(run[:10]))
        ideal = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(rels.values(), reverse=True)[:10]))
        totals["ndcg@10"] += dcg / ideal
    return {key: value / len(judged) for key, value in totals.items()}


# ------------------------------------------------------------------------- negatives


def _mined(bm25: BM25, query: str, banned: set[int], need: int, rng: np.random.Generator) -> list[int]:
    """Up to `need` indices by BM25 score (ties broken by a seeded random key), skipping `banned`; when fewer
    than `need` texts share a word with the query the rest are drawn at random."""
    scores = bm25.scores(query)
    m = min(bm25.n, need + len(banned))
    cutoff = np.partition(scores, bm25.n - m)[bm25.n - m]
    candidates = np.flatnonzero(scores >= cutoff) if cutoff > 0 else np.flatnonzero(scores > 0)
    order = candidates[np.lexsort((rng.random(len(candidates)), -scores[candidates]))]
    out = [int(i) for i in order if int(i) not in banned][:need]
    if len(out) < need:
        taken = banned | set(out)
        out += [int(i) for i in rng.permutation(bm25.n) if int(i) not in taken][: need - len(out)]
    return out


def mine_negatives(pairs: list[PairExample], n: int, seed: int) -> list[PairExample]:
    """Hard negatives by BM25 over the distinct positives of ``pairs``: a pair with fewer than ``n`` negatives gets
    its query's top-ranked passages that are neither its positive nor the positive of any pair with the same query
    text nor one of its own negatives, after its file negatives, up to ``n`` in all (fewer when the pool is too
    small; pairs that already have ``n`` or more are returned unchanged). Deterministic for ``seed``."""
    positives = list(dict.fromkeys(p.positive for p in pairs))
    if not positives or n <= 0:
        return list(pairs)
    index = {text: i for i, text in enumerate(positives)}
    own: dict[str, set[int]] = {}
    for p in pairs:
        own.setdefault(p.query, set()).add(index[p.positive])
    bm25 = BM25(positives)
    rng = np.random.default_rng(seed)
    out: list[PairExample] = []
    for p in pairs:
        if len(p.negatives) >= n:
            out.append(p)
            continue
        banned = own[p.query] | {index[t] for t in p.negatives if t in index}
        mined = _mined(bm25, p.query, banned, n - len(p.negatives), rng)
        out.append(PairExample(p.query, p.positive, p.negatives + tuple(positives[i] for i in mined), p.line))
    return out


# ------------------------------------------------------------------------------ SQuAD


def _eval_articles(path: Path, titles: list[str], eval_titles: list[str] | None) -> set[int]:
    if eval_titles is None:
        return {len(titles) - 1}
    if not eval_titles:
        raise DataError(path, "eval_titles is empty (give at least one article title, or None for the last article)")
    known = ", ".join(titles[:30]) + (f", ... ({len(titles)} titles)" if len(titles) > 30 else "")
    for title in eval_titles:
        if title not in titles:
            raise DataError(path, f"eval title {title!r} is not an article title; titles: {known}")
    return {a for a, title in enumerate(titles) if title in set(eval_titles)}


def squad_to_retrieval(
    squad_json, eval_titles: list[str] | None = None
) -> tuple[list[PairExample], RetrievalSet, list[str]]:
    """SQuAD v1.1/v2.0 JSON -> (train pairs, held-out retrieval set, eval titles).

    Articles are split by title: ``eval_titles`` (default: the last article in file order) are held out. Train
    pairs: every answerable question of the other articles -> its paragraph's context (line 0). Held-out set:
    corpus = every paragraph of every article (ids ``p<article>_<paragraph>``, text = context), queries = the
    answerable questions of the held-out articles (ids = SQuAD ids), qrels = qid -> {its paragraph: 1}.
    Unanswerable (is_impossible) questions are skipped. The file is validated by :func:`read_squad` first.
    """
    path = Path(squad_json)
    read_squad(path)  # validates keys, types, ids and answers; its errors name the question id and JSON location
    with path.open("r", encoding="utf-8-sig") as handle:
        articles = json.load(handle)["data"]
    titles = [a.get("title") if isinstance(a.get("title"), str) else f"data[{i}]" for i, a in enumerate(articles)]
    held_out = _eval_articles(path, titles, eval_titles)
    corpus: dict[str, str] = {}
    train: list[PairExample] = []
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(article["paragraphs"]):
            doc_id = f"p{a}_{p}"
            corpus[doc_id] = paragraph["context"]
            for qa in paragraph["qas"]:
                if qa.get("is_impossible", False):
                    continue
                if a in held_out:
                    queries[str(qa["id"])] = qa["question"]
                    qrels[str(qa["id"])] = {doc_id: 1}
                else:
                    train.append(PairExample(qa["question"], paragraph["context"], (), 0))
    chosen = [titles[a] for a in sorted(held_out)]
    if not queries:
        raise DataError(path, f"the held-out articles ({', '.join(chosen)}) have no answerable question")
    return train, RetrievalSet(corpus, queries, qrels), chosen


# -------------------------------------------------------------------------- synthetic

# Paraphrases a query may use instead of a passage's word: plural animals and jobs' products (from the
# pretraining grammar, so a pretrained encoder has seen them together), foods' tastes, and synonyms.
_PARAPHRASE = {
    **{animal: plural for animal, (plural, _, _) in _ANIMALS.items() if plural != animal},
    **{job: product for job, product in _JOBS.items()},
    **{food: f"{taste} food" for food, (_, taste) in _FOODS.items()},
    "lives": "stays", "eats": "likes", "travels": "goes", "works": "earns",
    "red": "scarlet", "blue": "azure", "green": "emerald", "gold": "golden", "white": "ivory", "black": "ebony",
    "purple": "violet", "orange": "amber", "train": "rail", "bus": "coach", "bike": "cycle", "boat": "ship",
    "car": "auto", "plane": "flight", "mountains": "peaks", "desert": "dunes", "coast": "shore", "city": "town",
    "forest": "woods", "island": "isle", "valley": "dale", "north": "arctic",
}
_QUERY_NOISE = ["who", "which person", "find the one that", "someone", "tell me who", "the person that", "a friend who"]


def _topic(rng: random.Random) -> dict[str, str]:
    return {"name": rng.choice(_NAME_LIST), "place": rng.choice(sorted(_PLACES)), "animal": rng.choice(sorted(_ANIMALS)),
            "food": rng.choice(sorted(_FOODS)), "job": rng.choice(sorted(_JOBS)), "color": rng.choice(_COLORS),
            "vehicle": rng.choice(_VEHICLES), "day": rng.choice(_DAYS), "friend": rng.choice(_NAME_LIST)}


def _passage(t: dict[str, str], rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A passage about topic `t` (4-5 of 6 sentences, shuffled) and the (verb, object) facts it states."""
    sound, home = _ANIMALS[t["animal"]][1:]
    facts = [
        (f"{t['name']} lives in {t['place']} where it is {_PLACES[t['place']]} .", ("lives", t["place"].split()[-1])),
        (f"{t['name']} has a {t['color']} {t['animal']} that {sound} in the {home} .", (t["color"], t["animal"])),
        (f"{t['name']} works as a {t['job']} and makes {_JOBS[t['job']]} .", ("works", t["job"])),
        (f"{t['name']} eats {t['food']} with a {_FOODS[t['food']][0]} .", ("eats", t["food"])),
        (f"every {t['day']} {t['name']} travels by {t['vehicle']} to see {t['friend']} .", ("travels", t["vehicle"])),
        (f"{t['friend']} and {t['name']} are old friends .", ("friend", t["friend"])),
    ]
    chosen = rng.sample(facts, rng.randint(4, 5))
    return " ".join(sentence for sentence, _ in chosen), [fact for _, fact in chosen]


def _query(t: dict[str, str], facts: list[tuple[str, str]], rng: random.Random) -> str:
    """2-3 of the passage's facts, each word paraphrased with probability 0.5, the name in a third of the queries."""
    words: list[str] = [rng.choice(_QUERY_NOISE)]
    for fact in rng.sample(facts, rng.randint(2, 3)):
        words += [_PARAPHRASE.get(w, w) if rng.random() < 0.5 else w for w in fact if w != "friend"]
    if rng.random() < 1 / 3:
        words.insert(rng.randint(1, len(words)), t["name"])
    return " ".join(words) + " ?"


def _near_miss(t: dict[str, str], rng: random.Random) -> dict[str, str]:
    """The same person with three other facts: a distractor that shares a query's name and some of its words."""
    other = _topic(rng)
    changed = rng.sample(["place", "animal", "food", "job", "color", "vehicle", "friend"], 3)
    return {key: other[key] if key in changed else value for key, value in t.items()}


def write_synthetic_retrieval(out_dir, n_train: int, n_eval: int, seed: int) -> dict[str, str]:
    """A generated retrieval task: passages about people (name, home, animal, job, food, vehicle, friend; the
    pretraining grammar's words) and queries naming 2-3 of a passage's facts, half the words paraphrased (dogs for
    dog, bread for baker ...) and the name in a third of them, so BM25 is good but not perfect and an encoder can
    learn the paraphrases from the training pairs. Writes ``train_pairs.jsonl`` (``n_train`` pairs) and ``eval/``
    (BEIR: ``n_eval`` queries; the corpus holds their passages and, for each, a near miss about the same person
    with three facts changed, in shuffled order). Deterministic for ``seed``."""
    rng = random.Random(seed)
    out = Path(out_dir)
    train = []
    for i in range(n_train):
        t = _topic(rng)
        passage, facts = _passage(t, rng)
        train.append(PairExample(_query(t, facts, rng), passage, (), i + 1))
    docs: list[tuple[str, int | None]] = []  # (passage, index of its query or None)
    queries: dict[str, str] = {}
    for j in range(n_eval):
        t = _topic(rng)
        passage, facts = _passage(t, rng)
        queries[f"q{j}"] = _query(t, facts, rng)
        docs += [(passage, j), (_passage(_near_miss(t, rng), rng)[0], None)]
    rng.shuffle(docs)
    corpus = {f"d{i}": text for i, (text, _) in enumerate(docs)}
    qrels = {f"q{j}": {f"d{i}": 1} for i, (_, j) in enumerate(docs) if j is not None}
    write_pairs(train, out / "train_pairs.jsonl")
    write_beir(RetrievalSet(corpus, queries, dict(sorted(qrels.items(), key=lambda kv: int(kv[0][1:])))), out / "eval")
    return {"train": str(out / "train_pairs.jsonl"), "eval": str(out / "eval")}


__all__ = [
    "BM25", "PairExample", "RetrievalSet", "bm25_ranking", "mine_negatives", "read_beir", "read_pairs",
    "retrieval_metrics", "squad_to_retrieval", "write_beir", "write_pairs", "write_synthetic_retrieval",
]
