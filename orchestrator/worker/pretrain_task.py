"""Worker stage: the pretraining task — MLM (+NSP) rows from the prepared data, sparse-MLM model, held-out eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.data.pretraining import open_split
from orchestrator.data.rows import EVAL_EPOCH
from orchestrator.worker.dist import Dist


def collate(rows: list[dict[str, np.ndarray]], pad_id: int, nsp: bool) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest row (multiple of 8); block-diagonal attention when rows are packed."""
    longest = max(len(r["input_ids"]) for r in rows)
    T = (longest + 7) // 8 * 8
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    sequence_ids = torch.zeros((B, T), dtype=torch.long)
    mlm_labels = torch.full((B, T), -100, dtype=torch.long)
    cls_index: list[int] = []
    nsp_labels: list[int] = []
    packed = False
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.from_numpy(r["input_ids"])
        token_type_ids[b, :n] = torch.from_numpy(r["token_type_ids"])
        position_ids[b, :n] = torch.from_numpy(r["position_ids"])
        sequence_ids[b, :n] = torch.from_numpy(r["sequence_ids"])
        mlm_labels[b, :n] = torch.from_numpy(r["mlm_labels"])
        cls_index.extend(int(b * T + c) for c in r["cls_positions"])
        packed = packed or len(r["cls_positions"]) > 1
        if nsp:
            nsp_labels.extend(int(x) for x in r["nsp_labels"])
    if packed:
        same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
        real = (sequence_ids > 0)[:, :, None]
        eye = torch.eye(T, dtype=torch.bool)[None]  # padding queries attend to themselves: no empty rows
        attention_mask = ((same & real) | eye)[:, None]
    else:
        attention_mask = (sequence_ids > 0).long()
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "mlm_labels": mlm_labels,
        "n_tokens": torch.tensor(int((sequence_ids > 0).sum())),
    }
    if nsp:
        batch["cls_index"] = torch.tensor(cls_index, dtype=torch.long)
        batch["nsp_labels"] = torch.tensor(nsp_labels, dtype=torch.long)
    if "sbo_left" in rows[0]:  # span boundaries as flat indices b * T + position, as the model gathers them
        for key in ("sbo_left", "sbo_right"):
            flat = torch.full((B, T), -1, dtype=torch.long)
            for b, r in enumerate(rows):
                pos = torch.from_numpy(r[key])
                flat[b, : len(pos)] = torch.where(pos >= 0, pos + b * T, pos)
            batch[key] = flat
    return batch


class _RowSource:
    """Training rows: masks re-drawn per (epoch, row), so any rank, world size or resume sees the same batch."""

    def __init__(self, rows, pad_id: int, nsp: bool):
        self.rows, self.pad_id, self.nsp = rows, pad_id, nsp

    def __len__(self) -> int:
        return len(self.rows)

    def step_order(self, global_batch_size: int, seed: int):
        return self.rows.step_order(global_batch_size, seed)

    def batch(self, idx, epoch: int) -> dict[str, torch.Tensor]:
        return collate([self.rows.row(int(i), epoch) for i in idx], self.pad_id, self.nsp)


class PretrainTask:
    model_keys = ("input_ids", "token_type_ids", "position_ids", "attention_mask", "mlm_labels", "cls_index", "nsp_labels",
                  "sbo_left", "sbo_right")
    main_metric = None  # pretraining keeps the newest checkpoint, not a "best" one

    def __init__(self, plan, d: Dist):
        from orchestrator.data.tokenizer import open_tokenizer

        self.plan = plan
        self.job = plan.job
        self.d = d
        self.dataset = plan.dataset
        self.tokenizer = open_tokenizer(self.dataset["tokenizer_dir"])
        self.pad_id = self.tokenizer.pad_token_id
        self.nsp = self.job.task.nsp or self.job.task.sop  # sample pairs with a label each (rows, collate, model)
        self.pair = "sop" if self.job.task.sop else "nsp"
        self.rtd = self.job.task.objective == "rtd"
        self.sbo = self.job.task.sbo
        self.stat_keys = (("mlm_correct", "mlm_count") + ((f"{self.pair}_correct", f"{self.pair}_count") if self.nsp else ())
                          + (("rtd_correct", "rtd_count") if self.rtd else ())
                          + (("sbo_correct", "sbo_count") if self.sbo else ()))
        self._train = _RowSource(open_split(self.dataset["data_dir"], "train", self.job, self.tokenizer), self.pad_id, self.nsp)
        self._eval_rows = open_split(self.dataset["data_dir"], "eval", self.job, self.tokenizer)

    def build_model(self):
        from orchestrator.model.build import build_pretraining_model, special_ids

        if self.job.task.distill_from:
            from orchestrator.model.distill import build_distill_model

            return build_distill_model(self.job, self.pad_id)
        if self.rtd:
            from orchestrator.model.rtd import build_rtd_model

            special = {"pad_token_id": self.pad_id, **special_ids(self.tokenizer)}
            return build_rtd_model(self.job.model, self.dataset["vocab_size"], special, self.job.task, self.job.train.seed)
        return build_pretraining_model(self.job.model, self.dataset["vocab_size"], self.pad_id, self.nsp, self.job.train.seed,
                                       special_ids(self.tokenizer), self.job.task.max_seq_length if self.sbo else 0)

    def init_weights(self, model, init_from: str) -> None:
        from orchestrator.model.build import load_encoder_weights

        load_encoder_weights(model.hf, init_from, keep_heads=True)

    def enable_activation_checkpointing(self, model) -> None:
        model.hf.gradient_checkpointing_enable()

    def train_source(self):
        return self._train

    def train_record(self, s: dict[str, float]) -> dict[str, float]:
        rec = {"mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1)}
        if self.nsp:
            rec[f"{self.pair}_acc"] = s[f"{self.pair}_correct"] / max(s[f"{self.pair}_count"], 1)
        if self.rtd:
            rec["rtd_acc"] = s["rtd_correct"] / max(s["rtd_count"], 1)
        if self.sbo:
            rec["sbo_acc"] = s["sbo_correct"] / max(s["sbo_count"], 1)
        return rec

    def evaluate(self, engine) -> dict[str, Any]:
        """Held-out MLM (and NSP / SOP; RTD: the generator's MLM, the discriminator's token accuracy next to that of
        calling every token original) with fixed masks; every rank runs the same number of forwards (ZeRO-3
        gathers)."""
        d, rows = self.d, self._eval_rows
        n = min(len(rows), self.job.data.eval_max_samples)
        if n == 0:  # no document fell into the held-out split (tiny or repetitive corpus): nothing to score
            return {"eval_rows": 0}
        micro = self.plan.micro_batch_size_per_gpu
        mft_id = self.dataset["most_frequent_token_id"]
        sums = np.zeros(11)  # loss*count, correct, count, pair correct, pair count, mft hits, rows, rtd correct/count/replaced,
        # span-boundary correct (its count is the MLM count)
        for idx, weight in d.eval_rounds(n, micro):
            batch = collate([rows.row(i, EVAL_EPOCH) for i in idx], self.pad_id, self.nsp)
            out = engine.forward(**self.model_inputs(batch, engine.device))
            cnt = float(out["mlm_count"])
            labels = batch["mlm_labels"]
            sums += weight * np.array(
                [
                    float(out["mlm_loss"]) * cnt,
                    float(out["mlm_correct"]),
                    cnt,
                    float(out.get(f"{self.pair}_correct", 0)),
                    float(out.get(f"{self.pair}_count", 0)),
                    float(((labels != -100) & (labels == mft_id)).sum()),
                    len(idx) * weight,
                    float(out.get("rtd_correct", 0)),
                    float(out.get("rtd_count", 0)),
                    float(out.get("rtd_replaced", 0)),
                    float(out.get("sbo_correct", 0)),
                ]
            )
        s = d.sum(sums.tolist())
        res = {
            "eval_mlm_loss": s[0] / max(s[2], 1),
            "eval_mlm_acc": s[1] / max(s[2], 1),
            "eval_mlm_ppl": float(np.exp(min(s[0] / max(s[2], 1), 50.0))),
            "eval_baseline_most_frequent_acc": s[5] / max(s[2], 1),
            "eval_rows": int(s[6]),
        }
        if self.nsp:
            res[f"eval_{self.pair}_acc"] = s[3] / max(s[4], 1)
        if self.rtd:
            res["eval_rtd_acc"] = s[7] / max(s[8], 1)
            res["eval_rtd_baseline_all_original_acc"] = 1.0 - s[9] / max(s[8], 1)
        if self.sbo:  # the same span tokens as eval_mlm_acc, predicted from their boundaries only
            res["eval_sbo_acc"] = s[10] / max(s[2], 1)
        return res

    def model_inputs(self, batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(device, non_blocking=True) for k in self.model_keys if k in batch}

    def export(self, module, out_dir: Path) -> None:
        module.hf.save_pretrained(str(out_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out_dir))
