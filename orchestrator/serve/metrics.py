"""Serving stage: two backends' outputs compared — max abs diff on real tokens, and task-level agreement — and
each backend scored against the gold answers the eval rows carry (when they carry any).

Outputs are per example: outs[k][i] is output k of example i (token tasks cut to the row's length).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import numpy as np

TOKEN_TASKS = ("ner", "qa")
AGREEMENT = {  # what "agreement" measures, per task (serving.json says it)
    "classify": "same argmax label per example",
    "ner": "same argmax tag per real (attention_mask=1) token",
    "qa": "same argmax start and end (over real tokens) per feature",
    "embed": "same top-1 nearest neighbour (cosine) among the other eval rows",
    "rerank": "same top-scored row per group; without groups, (1 + Kendall tau) / 2 over all rows",
}


def _mask(row: dict) -> np.ndarray:
    return np.asarray(row["attention_mask"]) == 1


def max_abs_diff(task: str, a: list[list[np.ndarray]], b: list[list[np.ndarray]], rows: list[dict]) -> float:
    worst = 0.0
    for out_a, out_b in zip(a, b):
        for i, (x, y) in enumerate(zip(out_a, out_b)):
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            if task in TOKEN_TASKS:
                d = d[_mask(rows[i])]
            worst = max(worst, float(d.max()) if d.size else 0.0)
    return worst


def predictions(task: str, outs: list[list[np.ndarray]], rows: list[dict]) -> Any:
    """classify: label ids; ner: tag ids per token; qa: (start, end) per feature; embed: the embeddings;
    rerank: the scores."""
    if task == "classify":
        return np.array([int(o.argmax()) for o in outs[0]])
    if task == "rerank":
        return np.array([float(o.reshape(-1)[0]) for o in outs[0]])
    if task == "embed":
        return np.stack(outs[0]).astype(np.float64)
    if task == "ner":
        return [o.argmax(-1) for o in outs[0]]
    masked = [[np.where(_mask(r), o, -np.inf) for o, r in zip(out, rows)] for out in outs]
    return np.array([[int(s.argmax()), int(e.argmax())] for s, e in zip(*masked)])


def nearest(emb: np.ndarray, among: Optional[np.ndarray] = None, chunk: int = 1024) -> np.ndarray:
    """Index of each row's top-1 cosine neighbour: among the other rows of emb, or among the rows of `among`."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    other = unit if among is None else among / np.maximum(np.linalg.norm(among, axis=1, keepdims=True), 1e-12)
    out = np.empty(len(unit), dtype=np.int64)
    for i in range(0, len(unit), chunk):
        sims = unit[i:i + chunk] @ other.T
        if among is None:
            idx = np.arange(i, min(i + chunk, len(unit)))
            sims[idx - i, idx] = -np.inf
        out[i:i + chunk] = sims.argmax(1)
    return out


def _groups(keys: list) -> list[np.ndarray]:
    by: dict[Any, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by[str(k)].append(i)
    return [np.array(v) for v in by.values()]


def agreement(task: str, pa: Any, pb: Any, rows: list[dict], groups: Optional[list] = None) -> float:
    if task == "classify":
        return float(np.mean(pa == pb))
    if task == "qa":
        return float(np.mean(np.all(pa == pb, axis=1)))
    if task == "ner":
        same = np.concatenate([(x == y)[_mask(r)] for x, y, r in zip(pa, pb, rows)])
        return float(same.mean())
    if task == "embed":
        return float(np.mean(nearest(pa) == nearest(pb))) if len(pa) > 1 else 1.0
    if groups is not None:
        return float(np.mean([pa[g].argmax() == pb[g].argmax() for g in _groups(groups)]))
    from scipy.stats import kendalltau

    tau = kendalltau(pa, pb).statistic
    return 1.0 if np.isnan(tau) and np.ptp(pa) == np.ptp(pb) == 0 else float((1 + np.nan_to_num(tau)) / 2)


def rerank_groups(rows: list[dict], extra: dict) -> Optional[list]:
    """Group key per row: the rows' own "group", else eval_extra "candidates" [(query id, doc id), ...]."""
    if all("group" in r for r in rows):
        return [r["group"] for r in rows]
    cands = extra.get("candidates")
    if isinstance(cands, list) and len(cands) == len(rows):
        return [c[0] for c in cands]
    return None


def _qa_spans(extra: dict, n: int) -> Optional[np.ndarray]:
    """Gold (start, end) token per eval feature from eval_extra (the examples' first answer and each feature's
    offset_mapping); (0, 0), the [CLS] token, when the answer is not inside the feature's window."""
    feats, examples = extra.get("features") or {}, extra.get("examples") or []
    offsets, index = feats.get("offset_mapping"), feats.get("example_index")
    if not offsets or not index or len(offsets) != n or not examples:
        return None
    spans = []
    for ex_i, offs in zip(index, offsets):
        answers = getattr(examples[ex_i], "answers", None) or []
        if not answers:
            spans.append((0, 0))
            continue
        s_char = answers[0].answer_start
        e_char = s_char + len(answers[0].text)
        s = next((t for t, o in enumerate(offs) if o and o[0] <= s_char < o[1]), None)
        e = next((t for t, o in enumerate(offs) if o and o[0] < e_char <= o[1]), None)
        spans.append((s, e) if s is not None and e is not None else (0, 0))
    return np.array(spans)


def _relevance(rows: list[dict], extra: dict) -> Optional[np.ndarray]:
    if all(isinstance(r.get("labels"), (int, float)) for r in rows):
        return np.array([float(r["labels"]) for r in rows])
    cands, qrels = extra.get("candidates"), extra.get("qrels")
    if isinstance(cands, list) and len(cands) == len(rows) and isinstance(qrels, dict):
        return np.array([float((qrels.get(str(q)) or {}).get(str(d), 0)) for q, d in cands])
    return None


def gold(task: str, rows: list[dict], extra: dict, groups: Optional[list]) -> Optional[tuple[str, Any]]:
    """(what is scored, the gold answers) when the eval rows (or eval_extra) carry them, else None."""
    if task == "classify" and all(isinstance(r.get("labels"), int) for r in rows):
        return "accuracy vs labels", np.array([r["labels"] for r in rows])
    if task == "ner" and all(isinstance(r.get("labels"), list) for r in rows):
        return "token accuracy vs labels (-100 ignored)", [np.asarray(r["labels"]) for r in rows]
    if task == "qa":
        if all("start_positions" in r and "end_positions" in r for r in rows):
            return "exact start+end vs gold span", np.array([[r["start_positions"], r["end_positions"]] for r in rows])
        spans = _qa_spans(extra, len(rows))
        return ("exact start+end vs gold span", spans) if spans is not None else None
    if task == "rerank" and groups is not None and (rel := _relevance(rows, extra)) is not None:
        return "P@1: top-scored pair of each group relevant", (groups, rel)
    if task == "embed":
        docs, queries, qrels = extra.get("doc_ids"), extra.get("query_ids"), extra.get("qrels")
        if docs and queries and isinstance(qrels, dict) and len(docs) + len(queries) == len(rows):
            return "P@1: each query's nearest passage relevant", (list(docs), list(queries), qrels)
    return None


def accuracy(task: str, pred: Any, answers: Any) -> float:
    if task == "classify":
        return float(np.mean(pred == answers))
    if task == "qa":
        return float(np.mean(np.all(pred == answers, axis=1)))
    if task == "ner":
        p, g = np.concatenate(pred), np.concatenate(answers)
        keep = g != -100
        return float(np.mean(p[keep] == g[keep])) if keep.any() else float("nan")
    if task == "rerank":
        groups, rel = answers
        return float(np.mean([rel[g[pred[g].argmax()]] > 0 for g in _groups(groups)]))
    docs, queries, qrels = answers
    top = nearest(pred[len(docs):], among=pred[:len(docs)])
    return float(np.mean([(qrels.get(str(q)) or {}).get(str(docs[j]), 0) > 0 for q, j in zip(queries, top)]))
