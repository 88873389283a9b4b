"""Retrieval data layer: pairs and BEIR readers/writers, BM25 baseline, metrics, hard negatives, SQuAD split,
synthetic task (unit tier: no Ray, no training)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.data.retrieval import (
    BM25,
    PairExample,
    RetrievalSet,
    bm25_ranking,
    mine_negatives,
    read_beir,
    read_pairs,
    retrieval_metrics,
    squad_to_retrieval,
    write_beir,
    write_pairs,
    write_synthetic_retrieval,
)
from orchestrator.errors import DataError

SQUAD_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v2-subset" / "dev-4articles.json"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- pairs
def test_read_pairs_tsv_negative_columns(tmp_path):
    path = _write(tmp_path / "p.tsv", "query\tpositive\tnegative\tnegative_1\tnegative2\n"
                                      "q one\tp one\tn a\t\tn c\n"
                                      "\n"
                                      "q two\tp two\t\t\t\n")
    pairs = read_pairs(path)
    assert pairs == [PairExample("q one", "p one", ("n a", "n c"), 2), PairExample("q two", "p two", (), 4)]


def test_read_pairs_csv_custom_columns(tmp_path):
    path = _write(tmp_path / "p.csv", 'question,answer,hard_neg\n"a, b",c,d\n')
    pairs = read_pairs(path, query_column="question", positive_column="answer", negative_prefix="hard_neg")
    assert pairs == [PairExample("a, b", "c", ("d",), 2)]


def test_read_pairs_jsonl_both_negative_spellings(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [
        {"query": "q1", "positive": "p1", "negatives": ["n1", "", "n2"]},
        {"query": "q2", "positive": "p2", "negative": "m1", "negative_2": "m2"},
        {"query": "q3", "positive": "p3"},
    ])
    pairs = read_pairs(path)
    assert [p.negatives for p in pairs] == [("n1", "n2"), ("m1", "m2"), ()]
    assert [p.line for p in pairs] == [1, 2, 3]


def test_read_pairs_missing_column_names_file_and_column(tmp_path):
    tsv = _write(tmp_path / "p.tsv", "query\tpos\nq\tp\n")
    with pytest.raises(DataError) as err:
        read_pairs(tsv)
    assert str(tsv) in str(err.value) and "'positive'" in str(err.value) and "\n" not in str(err.value)
    jsonl = _jsonl(tmp_path / "p.jsonl", [{"query": "q", "positive": "p"}, {"query": "q"}])
    with pytest.raises(DataError) as err:
        read_pairs(jsonl)
    assert f"{jsonl}:2:" in str(err.value) and "'positive'" in str(err.value)


def test_read_pairs_empty_query_names_line(tmp_path):
    path = _write(tmp_path / "p.tsv", "query\tpositive\nq\tp\n \tp2\n")
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert err.value.line == 3 and f"{path}:3:" in str(err.value) and "query" in str(err.value)


def test_read_pairs_negative_not_a_string(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"query": "q", "positive": "p", "negatives": ["a", 3]}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: negative column 'negatives'"):
        read_pairs(path)


def test_write_pairs_round_trip(tmp_path):
    pairs = [PairExample("q \"1\"", "p\t1", ("n1", "n2"), 1), PairExample("q2", "p2", (), 2)]
    path = tmp_path / "out" / "pairs.jsonl"
    write_pairs(pairs, path)
    assert read_pairs(path) == pairs
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary left behind


# ------------------------------------------------------------------------------ BEIR
def _beir(root: Path, qrels: str = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td2\t1\nq3\td1\t0\n") -> Path:
    _jsonl(root / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "title": "", "text": "two"},
                                   {"_id": "d3", "text": "three"}])
    _jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"},
                                    {"_id": "q3", "text": "third"}])
    _write(root / "qrels" / "test.tsv", qrels)
    return root


def test_read_beir(tmp_path):
    rs = read_beir(_beir(tmp_path / "b"))
    assert list(rs.corpus.items()) == [("d1", "T. one"), ("d2", "two"), ("d3", "three")]
    assert rs.queries == {"q1": "first", "q2": "second"}  # q3 has no relevant doc (score 0)
    assert rs.qrels == {"q1": {"d1": 1, "d2": 2}, "q2": {"d2": 1}}


def test_beir_round_trip_and_flat_qrels(tmp_path):
    rs = read_beir(_beir(tmp_path / "b"))
    write_beir(rs, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus.jsonl", "qrels", "queries.jsonl"]
    again = read_beir(tmp_path / "out")
    assert again == rs and list(again.corpus) == list(rs.corpus)
    flat = tmp_path / "flat"
    (tmp_path / "out" / "qrels" / "test.tsv").rename(tmp_path / "out" / "qrels.tsv")
    (tmp_path / "out").rename(flat)
    assert read_beir(flat) == rs


def test_read_beir_unknown_doc_in_qrels(tmp_path):
    root = _beir(tmp_path / "b", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\tdX\t1\n")
    with pytest.raises(DataError) as err:
        read_beir(root)
    msg = str(err.value)
    assert msg.startswith(f"{root / 'qrels' / 'test.tsv'}:3:") and "'dX'" in msg and "\n" not in msg


def test_read_beir_unknown_query_and_bad_score(tmp_path):
    with pytest.raises(DataError, match=r"test\.tsv:2: query-id 'q9'"):
        read_beir(_beir(tmp_path / "a", "query-id\tcorpus-id\tscore\nq9\td1\t1\n"))
    with pytest.raises(DataError, match=r"test\.tsv:2: score '1\.5' is not an integer"):
        read_beir(_beir(tmp_path / "b", "query-id\tcorpus-id\tscore\nq1\td1\t1.5\n"))


def test_read_beir_missing_files(tmp_path):
    root = _beir(tmp_path / "b")
    (root / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match=r"corpus\.jsonl: file not found"):
        read_beir(root)
    root = _beir(tmp_path / "c")
    (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(DataError, match=r"test\.tsv: file not found"):
        read_beir(root)


def test_read_beir_duplicate_id_and_missing_key(tmp_path):
    root = _beir(tmp_path / "b")
    _jsonl(root / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}])
    with pytest.raises(DataError, match=r"corpus\.jsonl:3: duplicate _id 'd1' \(first on line 1\)"):
        read_beir(root)
    _jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"_id": "q2"}])
    _jsonl(root / "corpus.jsonl", [{"_id": "d1", "text": "a"}])
    with pytest.raises(DataError, match=r"queries\.jsonl:2: .*'text' missing"):
        read_beir(root)


# --------------------------------------------------------------------------- metrics
def test_retrieval_metrics_hand_computed():
    qrels = {"a": {"d1": 1}, "b": {"d2": 1, "d3": 1}, "c": {"d4": 1}}
    ranked = {"a": ["d1", "x"], "b": ["x", "d3", "y", "z", "w", "d2"], "c": ["x", "y"]}
    m = retrieval_metrics(ranked, qrels)
    assert m["recall@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert m["recall@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    ndcg_b = (1 / math.log2(3) + 1 / math.log2(7)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((1 + ndcg_b + 0) / 3)
    # a query missing from `ranked` counts as 0
    assert retrieval_metrics({"a": ["d1"]}, qrels)["recall@1"] == pytest.approx(1 / 3)


def test_retrieval_metrics_graded_gain_is_linear():
    m = retrieval_metrics({"q": ["lo", "hi"]}, {"q": {"hi": 3, "lo": 1}})
    assert m["ndcg@10"] == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))


def _textbook(ranked, qrels, k=10):
    """Independent re-implementation: per-query lists of gains, then the textbook formulas."""
    recall, mrr, ndcg = [], [], []
    for qid, rels in qrels.items():
        gains = [rels.get(d, 0) for d in ranked.get(qid, [])]
        rel_count = sum(1 for r in rels.values() if r > 0)
        recall.append(sum(1 for g in gains[:k] if g > 0) / rel_count)
        ranks = [i + 1 for i, g in enumerate(gains[:k]) if g > 0]
        mrr.append(1 / ranks[0] if ranks else 0.0)
        dcg = sum(g / np.log2(np.arange(2, k + 2))[i] for i, g in enumerate(gains[:k]))
        ideal = sorted(rels.values(), reverse=True)[:k]
        ndcg.append(dcg / sum(g / np.log2(i + 2) for i, g in enumerate(ideal)))
    return np.mean(recall), np.mean(mrr), np.mean(ndcg)


def test_retrieval_metrics_match_textbook_on_random_rankings():
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(30)]
    qrels = {f"q{i}": {d: rng.randint(1, 3) for d in rng.sample(docs, rng.randint(1, 4))} for i in range(40)}
    ranked = {q: rng.sample(docs, 15) for q in qrels if rng.random() < 0.9}
    m = retrieval_metrics(ranked, qrels)
    recall, mrr, ndcg = _textbook(ranked, qrels)
    assert 0 < m["mrr@10"] < 1 and 0 < m["ndcg@10"] < 1
    assert (m["recall@10"], m["mrr@10"], m["ndcg@10"]) == pytest.approx((recall, mrr, ndcg))


# ------------------------------------------------------------------------------ BM25
def test_bm25_rare_words_rank_first_and_quiet(capfd):
    texts = ["the cat sat on the mat", "the dog sat on the log", "a zebra grazes near the quagga herd",
             "the cat and the dog"]
    bm25 = BM25(texts)
    idx, scores = bm25.search(["Where do the Quagga and ZEBRA live?", "dog"], k=3)
    assert idx.shape == scores.shape == (2, 3)
    assert idx[0, 0] == 2 and scores[0, 0] > scores[0, 1]
    assert set(idx[1, :2]) == {1, 3} and np.all(np.diff(scores[1]) <= 0)
    assert capfd.readouterr() == ("", "")


def test_bm25_k_clipped_and_unknown_words():
    bm25 = BM25(["alpha beta", "gamma", ""])
    idx, scores = bm25.search(["beta", "nothing known"], k=10)
    assert idx.shape == (2, 3) and idx[0, 0] == 0
    assert sorted(idx[1]) == [0, 1, 2] and not scores[1].any()


def test_bm25_ranking_recall_one_when_queries_copy_passages():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(300)]
    corpus = {f"d{i}": " ".join(rng.sample(words, 12)) for i in range(60)}
    queries = {f"q{i}": corpus[f"d{i}"] for i in range(0, 60, 3)}
    rs = RetrievalSet(corpus, queries, {q: {"d" + q[1:]: 1} for q in queries})
    ranking = bm25_ranking(rs, 10)
    assert all(len(v) == 10 for v in ranking.values())
    assert retrieval_metrics(ranking, rs.qrels)["recall@10"] == 1.0


# ------------------------------------------------------------------------- negatives
def _pairs():
    return [
        PairExample("red apple pie recipe", "apple pie with red apples", (), 1),
        PairExample("red apple pie recipe", "a recipe for apple pie", (), 2),
        PairExample("green pear tart", "pear tart recipe with green pears", ("file negative",), 3),
        PairExample("banana bread", "banana bread with nuts", (), 4),
        PairExample("apple juice", "fresh apple juice", (), 5),
        PairExample("cherry pie", "cherry pie with red cherries", (), 6),
    ]


def test_mine_negatives_excludes_positives_keeps_file_negatives_first():
    pairs = _pairs()
    mined = mine_negatives(pairs, n=3, seed=0)
    same_query = {p.positive for p in pairs if p.query == "red apple pie recipe"}
    for before, after in zip(pairs, mined):
        assert after.query == before.query and after.positive == before.positive and after.line == before.line
        assert len(after.negatives) == 3 and len(set(after.negatives)) == 3
        assert after.positive not in after.negatives
        assert after.negatives[: len(before.negatives)] == before.negatives
    assert not same_query & set(mined[0].negatives) and not same_query & set(mined[1].negatives)
    assert set(mined[4].negatives[:2]) == {"apple pie with red apples", "a recipe for apple pie"}  # hardest first


def test_mine_negatives_deterministic_per_seed():
    pairs = _pairs()
    assert mine_negatives(pairs, 4, seed=3) == mine_negatives(pairs, 4, seed=3)
    runs = {tuple(p.negatives for p in mine_negatives(pairs, 4, seed=s)) for s in range(6)}
    assert len(runs) > 1  # random fallbacks depend on the seed


# ----------------------------------------------------------------------------- SQuAD
def _qa(qid, question, context, answer, impossible=False):
    qa = {"id": qid, "question": question, "is_impossible": impossible}
    if impossible:
        qa["answers"] = []
    else:
        qa["answers"] = [{"text": answer, "answer_start": context.index(answer)}]
    return qa


def _squad(path: Path) -> Path:
    c = ["Paris is the capital of France.", "Lyon is a city in France.", "Berlin is the capital of Germany.",
         "Rome is in Italy.", "Milan is in Italy too."]
    data = {"version": "v2.0", "data": [
        {"title": "France", "paragraphs": [
            {"context": c[0], "qas": [_qa("f1", "Capital of France?", c[0], "Paris"),
                                      _qa("f2", "Capital of Spain?", c[0], "", impossible=True)]},
            {"context": c[1], "qas": [_qa("f3", "Which city?", c[1], "Lyon")]}]},
        {"title": "Germany", "paragraphs": [{"context": c[2], "qas": [_qa("g1", "Capital of Germany?", c[2], "Berlin")]}]},
        {"title": "Italy", "paragraphs": [
            {"context": c[3], "qas": [_qa("i1", "Where is Rome?", c[3], "Italy")]},
            {"context": c[4], "qas": [_qa("i2", "Where is Milan?", c[4], "Italy"),
                                      _qa("i3", "Milan's river?", c[4], "", impossible=True)]}]},
    ]}
    return _write(path, json.dumps(data))


def test_squad_to_retrieval_default_holds_out_last_article(tmp_path):
    train, rs, titles = squad_to_retrieval(_squad(tmp_path / "s.json"))
    assert titles == ["Italy"]
    assert [(p.query, p.positive, p.line) for p in train] == [
        ("Capital of France?", "Paris is the capital of France.", 0), ("Which city?", "Lyon is a city in France.", 0),
        ("Capital of Germany?", "Berlin is the capital of Germany.", 0)]
    assert list(rs.corpus) == ["p0_0", "p0_1", "p1_0", "p2_0", "p2_1"] and rs.corpus["p2_1"] == "Milan is in Italy too."
    assert rs.queries == {"i1": "Where is Rome?", "i2": "Where is Milan?"}
    assert rs.qrels == {"i1": {"p2_0": 1}, "i2": {"p2_1": 1}}


def test_squad_to_retrieval_eval_titles_and_unknown_title(tmp_path):
    path = _squad(tmp_path / "s.json")
    train, rs, titles = squad_to_retrieval(path, eval_titles=["France", "Germany"])
    assert titles == ["France", "Germany"] and set(rs.queries) == {"f1", "f3", "g1"} and len(train) == 2
    with pytest.raises(DataError) as err:
        squad_to_retrieval(path, eval_titles=["Spain"])
    assert str(path) in str(err.value) and "'Spain'" in str(err.value) and "France, Germany, Italy" in str(err.value)


@pytest.mark.skipif(not SQUAD_SUBSET.exists(), reason=f"{SQUAD_SUBSET} not present")
def test_squad_to_retrieval_real_subset():
    train, rs, titles = squad_to_retrieval(SQUAD_SUBSET)
    doc = json.loads(SQUAD_SUBSET.read_text(encoding="utf-8"))
    assert len(doc["data"]) == 4 and titles == [doc["data"][-1]["title"]]
    assert len(rs.corpus) == 148
    last = {str(qa["id"]): qa for p in doc["data"][-1]["paragraphs"] for qa in p["qas"]}
    assert rs.queries and set(rs.queries) <= set(last)
    assert all(not last[q].get("is_impossible") for q in rs.queries)
    assert len(rs.queries) == sum(1 for qa in last.values() if not qa.get("is_impossible"))
    assert all(next(iter(r)).startswith("p3_") for r in rs.qrels.values())


# ------------------------------------------------------------------------- synthetic
def test_write_synthetic_retrieval(tmp_path):
    a = write_synthetic_retrieval(tmp_path / "a", n_train=30, n_eval=200, seed=5)
    b = write_synthetic_retrieval(tmp_path / "b", n_train=30, n_eval=200, seed=5)
    for name in ("train_pairs.jsonl", "eval/corpus.jsonl", "eval/queries.jsonl", "eval/qrels/test.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = write_synthetic_retrieval(tmp_path / "c", n_train=30, n_eval=200, seed=6)
    assert Path(c["train"]).read_bytes() != Path(a["train"]).read_bytes()
    pairs = read_pairs(a["train"])
    rs = read_beir(a["eval"])
    assert len(pairs) == 30 and len(rs.queries) == 200 and len(rs.corpus) == 400
    m = retrieval_metrics(bm25_ranking(rs, 10), rs.qrels)
    print(f"synthetic BM25: {m}", file=sys.stderr)
    assert 0.3 < m["recall@10"] < 1.0
    assert m["recall@1"] < m["recall@10"]
