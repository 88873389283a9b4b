"""Evaluation metrics for classification and NER fine-tuning (sklearn / seqeval).

QA metrics (official SQuAD EM/F1) live in :func:`orchestrator.data.finetuning.squad_metrics`.
scikit-learn comes in as a dependency of seqeval.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def classification_metrics(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> dict[str, float]:
    """``{"accuracy", "macro_f1", "mcc"}`` (fractions in [0, 1]; mcc in [-1, 1]).

    ``preds`` are predicted label ids (argmax of the logits), ``labels`` the gold ids.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = np.asarray(preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"classification_metrics: {preds.size} predictions for {labels.size} labels")
    if labels.size == 0:
        raise ValueError("classification_metrics: no examples")
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }


def ner_metrics(true_tag_seqs: Sequence[Sequence[str]], pred_tag_seqs: Sequence[Sequence[str]]) -> dict:
    """Entity-level CoNLL scores with seqeval's default (conlleval-compatible) mode.

    Returns ``{"precision", "recall", "f1", "per_type": {TYPE: {"precision", "recall",
    "f1", "support"}}}``; overall values are micro averages over entities, ``support`` is
    the number of gold entities of that type.  Sequences must align word for word.
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    true = [list(s) for s in true_tag_seqs]
    pred = [list(s) for s in pred_tag_seqs]
    if len(true) != len(pred):
        raise ValueError(f"ner_metrics: {len(pred)} predicted sentences for {len(true)} gold sentences")
    for i, (t, p) in enumerate(zip(true, pred)):
        if len(t) != len(p):
            raise ValueError(f"ner_metrics: sentence {i} has {len(t)} gold tags but {len(p)} predicted tags")
    report = classification_report(true, pred, output_dict=True, mode=None, scheme=None, zero_division=0)
    per_type = {
        name: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for name, v in report.items()
        if not name.endswith(" avg")
    }
    return {
        "precision": float(precision_score(true, pred, mode=None, scheme=None, zero_division=0)),
        "recall": float(recall_score(true, pred, mode=None, scheme=None, zero_division=0)),
        "f1": float(f1_score(true, pred, mode=None, scheme=None, zero_division=0)),
        "per_type": per_type,
    }
