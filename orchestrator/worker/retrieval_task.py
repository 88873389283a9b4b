"""Worker stage: retrieval tasks — task=embed (bi-encoder, in-batch negatives gathered over workers) and
task=rerank (cross-encoder, listwise or pointwise) — on the pretrained (or a random) encoder.

The embedding loss is sentence-transformers' MultipleNegativesRankingLoss (cosine similarity x scale as the logits
of a cross-entropy whose target is the query's own passage), written here on our model because the engine
(DeepSpeed or torch) owns the module and the batch: ST's loss wants its own SentenceTransformer forward. With
task.gather_negatives every worker's passages join every query's candidates through a differentiable all-gather
(torch.distributed.nn), so the gradient equals one process holding the whole global micro batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.worker.dist import Dist
from orchestrator.worker.finetune_task import FinetuneTask, _FeatureSource


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def ranking_loss(q: torch.Tensor, d: torch.Tensor, scale: float, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of scale x cos(q_i, d_j) over all passages d, target d_{offset + i}; returns (loss, correct)."""
    scores = scale * F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T
    target = torch.arange(len(q), device=q.device) + offset
    correct = (scores.argmax(-1) == target).sum().float()
    return F.cross_entropy(scores, target), correct


class EmbedModel(nn.Module):
    """An encoder (BertModel, RobertaModel, ...) and a pooling; forward(q_*, d_*) is the ranking loss, forward(input_ids, ...) embeds."""

    def __init__(self, hf, pooling: str, scale: float, gather: Optional[Callable] = None, rank: int = 0):
        super().__init__()
        self.hf, self.pooling, self.scale = hf, pooling, scale
        self.gather, self.rank = gather, rank  # gather: a differentiable all-gather (world > 1) or None

    def embed(self, input_ids, attention_mask) -> torch.Tensor:
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, q_input_ids=None,
                q_attention_mask=None, d_input_ids=None, d_attention_mask=None):
        if q_input_ids is None:
            return {"embeddings": self.embed(input_ids, attention_mask)}
        q = self.embed(q_input_ids, q_attention_mask)
        d = self.embed(d_input_ids, d_attention_mask)
        offset = 0
        if self.gather is not None:
            offset = self.rank * len(d)  # every rank holds the same number of passages
            d = self.gather(d)
        loss, correct = ranking_loss(q, d, self.scale, offset)
        return {"loss": loss, "correct": correct, "count": torch.tensor(float(len(q)), device=q.device)}


class RerankModel(nn.Module):
    """A one-label ...ForSequenceClassification; rows come in groups (positive first, then its negatives)."""

    def __init__(self, hf, group: int, loss: str):
        super().__init__()
        from orchestrator.model.families import family_of_config

        self.hf, self.group, self.loss_kind = hf, group, loss
        self.token_types = family_of_config(hf.config).token_types

    def forward(self, input_ids, token_type_ids, attention_mask, grouped: Optional[torch.Tensor] = None):
        types = {"token_type_ids": token_type_ids} if self.token_types else {}
        scores = self.hf(input_ids=input_ids, attention_mask=attention_mask, **types, return_dict=True).logits.squeeze(-1)
        if grouped is None:
            return {"logits": scores}
        s = scores.float().view(-1, self.group)
        if self.loss_kind == "listwise":
            loss = F.cross_entropy(s, torch.zeros(len(s), dtype=torch.long, device=s.device))
        else:
            target = torch.zeros_like(s)
            target[:, 0] = 1.0
            loss = F.binary_cross_entropy_with_logits(s, target)
        correct = (s.argmax(-1) == 0).sum().float()
        return {"loss": loss, "logits": scores, "correct": correct,
                "count": torch.tensor(float(len(s)), device=s.device)}


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = -(-max(len(s) for s in seqs) // 8) * 8
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class _EmbedPairs(_FeatureSource):
    """Micro batch of B queries: q_* [B, Lq]; d_* [B (1 + k), Ld], the B positives first, then the negatives."""

    def batch(self, idx, epoch: int) -> dict[str, torch.Tensor]:
        rows = [self.rows[int(i)] for i in idx]
        q_ids, q_mask = _pad([r["q"] for r in rows], self.pad_id)
        docs = [r["d"][j] for j in range(len(rows[0]["d"])) for r in rows]
        d_ids, d_mask = _pad(docs, self.pad_id)
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "d_input_ids": d_ids, "d_attention_mask": d_mask,
                "n_tokens": q_mask.sum() + d_mask.sum()}


class _RerankGroups(_FeatureSource):
    """Micro batch of B queries: B x (1 + k) (query, passage) pairs, each group's positive first."""

    def batch(self, idx, epoch: int) -> dict[str, torch.Tensor]:
        rows = [self.rows[int(i)] for i in idx]
        ids, mask = _pad([s for r in rows for s in r["input_ids"]], self.pad_id)
        types, _ = _pad([s for r in rows for s in r["token_type_ids"]], 0)
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
                "grouped": torch.ones(1), "n_tokens": mask.sum()}


class RetrievalTask(FinetuneTask):
    """task=embed and task=rerank: FinetuneTask's data, metric and best-model keeping; their own model, batches,
    evaluation (retrieval metrics beside BM25) and export (a sentence-transformers dir / a cross-encoder)."""

    def __init__(self, plan, d: Dist):
        super().__init__(plan, d)
        t = self.job.task
        keys = (("q_input_ids", "q_attention_mask", "d_input_ids", "d_attention_mask") if self.name == "embed"
                else ("input_ids", "token_type_ids", "attention_mask", "grouped"))
        self.model_keys = keys
        rows = self._train.rows
        self._train = (_EmbedPairs if self.name == "embed" else _RerankGroups)(rows, self.pad_id, keys)
        self.group = 1 + t.hard_negatives

    def build_model(self):
        from orchestrator.model.families import family_of_config, no_pooler, set_attention
        from orchestrator.worker.finetune_task import encoder_config

        t = self.job.task
        torch.manual_seed(self.job.train.seed)
        config = encoder_config(self.job.model, self.dataset["vocab_size"], self.pad_id, self.dataset.get("model_config_dir"))
        fam = family_of_config(config)
        set_attention(config, fam)
        if self.name == "rerank":
            config.num_labels = 1
            return RerankModel(fam.hf_class("ForSequenceClassification")(config), self.group, t.rerank_loss)
        gather = self.d.all_gather_grad if (t.gather_negatives and self.d.world_size > 1) else None
        return EmbedModel(fam.hf_class("Model")(config, **no_pooler(fam)), t.pooling, t.similarity_scale, gather, self.d.rank)

    def enable_activation_checkpointing(self, model) -> None:
        model.hf.gradient_checkpointing_enable()

    def train_record(self, s: dict[str, float]) -> dict[str, float]:
        return {"train_acc": s["correct"] / max(s["count"], 1)}  # the positive ranked first among the batch's

    def _scores(self, engine) -> np.ndarray:
        """Embeddings (embed) or pair scores (rerank) of every eval row, gathered on every rank."""
        key = "embeddings" if self.name == "embed" else "logits"
        merged = self.eval_outputs(engine, lambda out, j, i: out[key][j].float().cpu().numpy())
        return np.stack([merged[i] for i in range(len(self.eval_rows))])

    def _rankings(self, values: np.ndarray) -> dict[str, list[str]]:
        x = self.eval_extra
        if self.name == "embed":
            n_docs = len(x["doc_ids"])
            e = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
            sims = e[n_docs:] @ e[:n_docs].T
            top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
            return {q: [x["doc_ids"][j] for j in row] for q, row in zip(x["query_ids"], top)}
        per_query: dict[str, list[tuple[float, str]]] = {}
        for (q, doc), s in zip(x["candidates"], values):
            per_query.setdefault(q, []).append((-float(s), doc))
        return {q: [doc for _, doc in sorted(c, key=lambda p: p[0])] for q, c in per_query.items()}

    def evaluate(self, engine) -> dict[str, Any]:
        from orchestrator.data.retrieval import retrieval_metrics
        from orchestrator.data.retrieval_prep import metric_names

        ranked = self._rankings(self._scores(engine))
        res = {**metric_names(retrieval_metrics(ranked, self.eval_extra["qrels"])), **self.eval_extra["baseline"]}
        self.predictions = [{"query_id": q, "ranked": docs[:10], "relevant": sorted(self.eval_extra["qrels"][q])}
                            for q, docs in ranked.items()]
        return res

    def export(self, module, out_dir: Path) -> None:
        if self.name == "rerank":
            return super().export(module, out_dir)
        from sentence_transformers import SentenceTransformer, models

        hf_dir = out_dir / ".hf"
        module.hf.save_pretrained(str(hf_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(hf_dir))
        encoder = models.Transformer(str(hf_dir), max_seq_length=self.job.task.max_seq_length)
        pooling = models.Pooling(module.hf.config.hidden_size, pooling_mode=self.job.task.pooling)
        SentenceTransformer(modules=[encoder, pooling], device="cpu").save(str(out_dir))
        import shutil

        shutil.rmtree(hf_dir)
