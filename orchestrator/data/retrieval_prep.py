"""Data stage, driver side, for task=embed (bi-encoder) and task=rerank (cross-encoder): a pairs file and a BEIR
dir -> tokenised features in the run dir, with BM25's scores on the same queries as the baseline.

embed   train row: {"q": query ids, "d": [positive ids, negative ids...]}; eval rows: every corpus passage, then
        every query (single texts), with their ids in eval_extra.
rerank  train row: {"input_ids": [(query, positive), (query, negative)...], "token_type_ids": [...]}: one group;
        eval rows: the (query, passage) pairs of BM25's top task.rerank_top_k per query, reranked at evaluation.
Every query or passage is tokenised once, in batch calls of the Rust tokenizer.
"""

from __future__ import annotations

from typing import Any

from orchestrator.data import retrieval as rt
from orchestrator.errors import DataError


def read(t, train_file: str, eval_file: str, seed: int) -> tuple[list[rt.PairExample], rt.RetrievalSet]:
    pairs = rt.read_pairs(train_file, t.query_column, t.positive_column, t.negative_prefix)
    if t.hard_negatives:
        pairs = rt.mine_negatives(pairs, t.hard_negatives, seed)
        short = next((p for p in pairs if len(p.negatives) < t.hard_negatives), None)
        if short is not None:
            raise DataError(train_file, f"task.hard_negatives={t.hard_negatives} but only {len(short.negatives)} could"
                                        " be found for a query (too few distinct passages)", line=short.line or None)
    return pairs, rt.read_beir(eval_file)


def texts(pairs: list[rt.PairExample]) -> list[str]:
    """What a WordPiece vocabulary is trained on when no tokenizer is given."""
    return [p.query for p in pairs] + [p.positive for p in pairs]


def metric_names(metrics: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
    """recall@10 -> eval_recall_at_10 (a Hydra override value and a W&B key without '@')."""
    return {prefix + k.replace("@", "_at_"): float(v) for k, v in metrics.items()}


def _ids(tok, strings: list[str], max_length: int) -> dict[str, list[int]]:
    """Each distinct string tokenised once (one batch call): string -> input ids."""
    unique = list(dict.fromkeys(strings))
    enc = tok(unique, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    return dict(zip(unique, enc))


def _pairs(tok, queries: list[str], passages: list[str], t) -> tuple[list[list[int]], list[list[int]]]:
    from orchestrator.data.finetuning import _truncate_questions

    short = dict(zip(queries, _truncate_questions(queries, tok, t.max_query_length))) if queries else {}
    enc = tok([short[q] for q in queries], passages, truncation="only_second", max_length=t.max_seq_length,
              return_token_type_ids=True)
    return enc["input_ids"], enc["token_type_ids"]


def _single_row(ids: list[int]) -> dict[str, Any]:
    return {"input_ids": ids, "token_type_ids": [0] * len(ids)}


def featurize_embed(t, pairs: list[rt.PairExample], rs: rt.RetrievalSet, tok):
    k = t.hard_negatives
    q_ids = _ids(tok, [p.query for p in pairs] + list(rs.queries.values()), t.max_query_length)
    d_ids = _ids(tok, [x for p in pairs for x in (p.positive, *p.negatives[:k])] + list(rs.corpus.values()),
                 t.max_seq_length)
    train = [{"q": q_ids[p.query], "d": [d_ids[x] for x in (p.positive, *p.negatives[:k])]} for p in pairs]
    evals = [_single_row(d_ids[x]) for x in rs.corpus.values()] + [_single_row(q_ids[x]) for x in rs.queries.values()]
    extra = {"doc_ids": list(rs.corpus), "query_ids": list(rs.queries), "qrels": rs.qrels,
             "baseline": metric_names(rt.retrieval_metrics(rt.bm25_ranking(rs, 10), rs.qrels), "eval_bm25_")}
    return train, evals, extra


def featurize_rerank(t, pairs: list[rt.PairExample], rs: rt.RetrievalSet, tok):
    k = t.hard_negatives
    groups = [(p.query, (p.positive, *p.negatives[:k])) for p in pairs]
    ids, types = _pairs(tok, [q for q, ps in groups for _ in ps], [x for _, ps in groups for x in ps], t)
    train = [{"input_ids": ids[i * (k + 1):(i + 1) * (k + 1)], "token_type_ids": types[i * (k + 1):(i + 1) * (k + 1)]}
             for i in range(len(groups))]
    ranking = rt.bm25_ranking(rs, max(t.rerank_top_k, 10))
    candidates = [(qid, doc) for qid in rs.queries for doc in ranking.get(qid, [])[: t.rerank_top_k]]
    ids, types = _pairs(tok, [rs.queries[q] for q, _ in candidates], [rs.corpus[d] for _, d in candidates], t)
    evals = [{"input_ids": i, "token_type_ids": ty} for i, ty in zip(ids, types)]
    extra = {"candidates": candidates, "query_ids": list(rs.queries), "qrels": rs.qrels,
             "baseline": metric_names(rt.retrieval_metrics(ranking, rs.qrels), "eval_bm25_")}
    return train, evals, extra


def featurize(t, pairs: list[rt.PairExample], rs: rt.RetrievalSet, tok):
    """(train rows, eval rows, eval_extra) of task t."""
    return (featurize_embed if t.name == "embed" else featurize_rerank)(t, pairs, rs, tok)
