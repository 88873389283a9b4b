"""Worker stage: fine-tuning tasks — classification, NER, extractive QA — on the pretrained (or a random) encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from orchestrator.worker.dist import Dist

DEFAULT_MAIN_METRIC = {"classify": "eval_accuracy", "ner": "eval_f1", "qa": "eval_f1", "embed": "eval_ndcg_at_10",
                       "rerank": "eval_ndcg_at_10"}


class FinetuneModel(nn.Module):
    """An HF head model of the job's family (sequence / token classification, QA) whose forward returns loss and
    stats."""

    def __init__(self, hf, task: str):
        super().__init__()
        from orchestrator.model.families import family_of_config

        self.hf = hf
        self.task = task
        self.token_types = family_of_config(hf.config).token_types

    def forward(self, input_ids, token_type_ids, attention_mask, labels=None, start_positions=None, end_positions=None):
        kw: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask)
        if self.token_types:  # RoBERTa, DeBERTa-v3 and ModernBERT have no segment embeddings
            kw["token_type_ids"] = token_type_ids
        if self.task == "qa":
            out = self.hf(**kw, start_positions=start_positions, end_positions=end_positions, return_dict=True)
            res = {"start_logits": out.start_logits, "end_logits": out.end_logits}
            res["correct"] = torch.tensor(0.0)
            res["count"] = torch.tensor(float(len(input_ids)))
        else:
            out = self.hf(**kw, labels=labels, return_dict=True)
            res = {"logits": out.logits}
            with torch.no_grad():
                if labels is not None:
                    valid = labels != -100
                    res["correct"] = ((out.logits.argmax(-1) == labels) & valid).sum().float()
                    res["count"] = valid.sum().float()
        if out.loss is not None:
            res["loss"] = out.loss
        return res


def build_head_model(task: str, model_cfg, vocab_size: int, labels: Optional[list], pad_id: int, seed: int,
                     config_dir: Optional[str]):
    from orchestrator.model.families import family_of_config, set_attention

    torch.manual_seed(seed)
    config = encoder_config(model_cfg, vocab_size, pad_id, config_dir)
    fam = family_of_config(config)
    set_attention(config, fam)
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = {i: str(l) for i, l in enumerate(labels)}
        config.label2id = {str(l): i for i, l in enumerate(labels)}
    suffix = {"classify": "ForSequenceClassification", "ner": "ForTokenClassification", "qa": "ForQuestionAnswering"}[task]
    return FinetuneModel(fam.hf_class(suffix)(config), task)


def encoder_config(model_cfg, vocab_size: int, pad_id: int, config_dir: Optional[str]):
    """The checkpoint's config (its family and shape), else the job's `model=` of `model.family`."""
    from transformers import AutoConfig

    from orchestrator.model.build import bert_config

    if config_dir:
        return AutoConfig.from_pretrained(config_dir, local_files_only=True)
    return bert_config(model_cfg, vocab_size, pad_id)


class _FeatureSource:
    def __init__(self, rows: list[dict[str, Any]], pad_id: int, keys: tuple[str, ...]):
        self.rows, self.pad_id, self.keys = rows, pad_id, keys

    def __len__(self) -> int:
        return len(self.rows)

    def step_order(self, global_batch_size: int, seed: int):
        from orchestrator.data.order import StepOrder

        return StepOrder(len(self.rows), global_batch_size, seed)

    def batch(self, idx, epoch: int) -> dict[str, torch.Tensor]:
        from orchestrator.data.finetuning import pad_batch

        arrays = pad_batch([self.rows[int(i)] for i in idx], self.pad_id, pad_to_multiple_of=8)
        out = {k: torch.from_numpy(v) for k, v in arrays.items() if k in self.keys}
        out["n_tokens"] = torch.tensor(int(arrays["attention_mask"].sum()))
        return out


class FinetuneTask:
    stat_keys = ("correct", "count")

    def __init__(self, plan, d: Dist):
        from orchestrator.data.tokenizer import open_tokenizer

        from orchestrator.data.finetune_prep import load_features

        self.plan, self.job, self.d = plan, plan.job, d
        self.dataset = plan.dataset
        self.name = self.job.task.name
        self.tokenizer = open_tokenizer(self.dataset["tokenizer_dir"])
        self.pad_id = self.tokenizer.pad_token_id
        self.labels = self.dataset.get("labels")
        self.main_metric = self.job.task.main_metric or DEFAULT_MAIN_METRIC[self.name]
        if not self.main_metric.startswith("eval_"):
            self.main_metric = "eval_" + self.main_metric
        feats = load_features(self.dataset["data_dir"])
        self.eval_rows = feats["eval"]
        self.eval_extra = feats["eval_extra"]
        self.eval_file = feats["eval_file"]
        keys = ("input_ids", "token_type_ids", "attention_mask", "labels", "start_positions", "end_positions")
        self.model_keys = keys
        self._train = _FeatureSource(feats["train"], self.pad_id, keys)
        self._eval = _FeatureSource(self.eval_rows, self.pad_id, keys)
        self.predictions: list[dict[str, Any]] = []

    def build_model(self):
        return build_head_model(self.name, self.job.model, self.dataset["vocab_size"], self.labels, self.pad_id,
                                self.job.train.seed, self.dataset.get("model_config_dir"))

    def init_weights(self, model, init_from: str) -> None:
        from orchestrator.model.build import load_encoder_weights

        load_encoder_weights(model.hf, init_from, keep_heads=False)

    def enable_activation_checkpointing(self, model) -> None:
        model.hf.gradient_checkpointing_enable()

    def train_source(self):
        return self._train

    def train_record(self, s: dict[str, float]) -> dict[str, float]:
        return {} if self.name == "qa" else {"train_acc": s["correct"] / max(s["count"], 1)}

    def model_inputs(self, batch, device):
        return {k: batch[k].to(device, non_blocking=True) for k in self.model_keys if k in batch}

    # ------------------------------------------------------------------------------ evaluation
    def eval_outputs(self, engine, take) -> dict[int, Any]:
        """take(out, j, i) of every eval row i (row j of its batch), computed in equal rounds over ranks and gathered
        on every rank."""
        mine: dict[int, Any] = {}
        for idx, weight in self.d.eval_rounds(len(self.eval_rows), self.plan.micro_batch_size_per_gpu):
            batch = self._eval.batch(idx, 0)
            inputs = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()
                      if k in ("input_ids", "token_type_ids", "attention_mask")}
            out = engine.forward(**inputs)
            if weight:
                mine.update((i, take(out, j, i)) for j, i in enumerate(idx))
        merged: dict[int, Any] = {}
        for part in self.d.gather(mine):
            merged.update(part)
        return merged

    def _logits(self, engine) -> dict[int, Any]:
        """Every eval feature's logits (QA: start and end; NER: the argmax tags) on every rank."""
        def take(out, j: int, i: int):
            length = len(self.eval_rows[i]["input_ids"])
            if self.name == "qa":
                return (out["start_logits"][j, :length].float().cpu().numpy(),
                        out["end_logits"][j, :length].float().cpu().numpy())
            lg = out["logits"][j]
            return lg.float().cpu().numpy() if self.name == "classify" else lg[:length].argmax(-1).cpu().numpy()

        return self.eval_outputs(engine, take)

    def evaluate(self, engine) -> dict[str, Any]:
        from orchestrator.data import finetune_metrics as fm
        from orchestrator.data import finetuning as ft

        logits = self._logits(engine)
        n = len(self.eval_rows)
        if self.name == "classify":
            preds = np.asarray([int(np.argmax(logits[i])) for i in range(n)])
            gold = np.asarray([r["labels"] for r in self.eval_rows])
            m = fm.classification_metrics(preds, gold)
            majority = float(np.bincount(gold).max() / len(gold))
            res = {"eval_accuracy": m["accuracy"], "eval_macro_f1": m["macro_f1"], "eval_mcc": m["mcc"],
                   "eval_majority_baseline": majority}
            self.predictions = [
                {"line": ex.line, "text": ex.text, **({"text_pair": ex.text_pair} if ex.text_pair else {}),
                 "label": ex.label, "prediction": str(self.labels[p])}
                for ex, p in zip(self.eval_extra["examples"], preds)
            ]
            return res
        if self.name == "ner":
            id2tag = dict(enumerate(self.labels))
            sents = self.eval_extra["sentences"]
            pred_tags = [ft.decode_ner(logits[i], self.eval_extra["word_ids"][i], id2tag, self.eval_extra["num_words"][i])
                         for i in range(n)]
            m = fm.ner_metrics([s.tags for s in sents], pred_tags)
            self.predictions = [{"line": s.line, "tokens": s.tokens, "tags": s.tags, "predictions": p}
                                for s, p in zip(sents, pred_tags)]
            return {"eval_precision": m["precision"], "eval_recall": m["recall"], "eval_f1": m["f1"],
                    "eval_per_type": m["per_type"]}
        feats = self.eval_extra["features"]
        examples = self.eval_extra["examples"]
        width = max(len(r["input_ids"]) for r in self.eval_rows)
        start = np.full((n, width), -1e9, dtype=np.float32)
        end = np.full((n, width), -1e9, dtype=np.float32)
        for i in range(n):
            s, e = logits[i]
            start[i, : len(s)], end[i, : len(e)] = s, e
        t = self.job.task
        answers = ft.postprocess_qa(examples, feats, start, end, n_best_size=t.n_best_size,
                                    max_answer_length=t.max_answer_length, version_2=t.version_2,
                                    null_score_diff_threshold=t.null_score_diff_threshold)
        m = ft.squad_metrics(answers, examples, version_2=t.version_2)
        # Baseline: the same model reading only each context's first window (no document stride)
        first = sorted({feats["example_index"][i]: i for i in reversed(range(n))}.values())
        first_feats = {k: [feats[k][i] for i in first] for k in feats}
        first_answers = ft.postprocess_qa(examples, first_feats, start[first], end[first], n_best_size=t.n_best_size,
                                          max_answer_length=t.max_answer_length, version_2=t.version_2,
                                          null_score_diff_threshold=t.null_score_diff_threshold)
        mf = ft.squad_metrics(first_answers, examples, version_2=t.version_2)
        self.predictions = [{"id": ex.qid, "question": ex.question, "prediction": answers.get(ex.qid, ""),
                             "answers": [a.text for a in ex.answers]} for ex in examples]
        res = {"eval_exact": m["exact"], "eval_f1": m["f1"],
               "eval_first_window_exact": mf["exact"], "eval_first_window_f1": mf["f1"],
               "eval_windows_per_question": n / max(len(examples), 1)}
        res.update({f"eval_{k}": v for k, v in m.items() if k.startswith(("HasAns", "NoAns"))})
        if t.version_2:  # the baseline every SQuAD 2.0 score sits beside: answer "no answer" to every question
            m0 = ft.squad_metrics({ex.qid: "" for ex in examples}, examples, version_2=True)
            res.update(eval_no_answer_baseline_exact=m0["exact"], eval_no_answer_baseline_f1=m0["f1"])
        return res

    def write_predictions(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as fh:
            for p in self.predictions:
                fh.write(json.dumps(p) + "\n")
        tmp.replace(path)

    def export(self, module, out_dir: Path) -> None:
        module.hf.save_pretrained(str(out_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out_dir))
