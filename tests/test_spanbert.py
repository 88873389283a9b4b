"""SpanBERT (issue 17): span masking's boundary positions, the span-boundary head training on them, and the model
card's sentence on each pretraining objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose
from orchestrator.config.schema import check_job, to_job_config
from orchestrator.errors import ConfigError


def _rows(*overrides):
    from transformers import BertTokenizer

    from orchestrator.data.pretraining import open_split, prepare_pretraining_data

    job = to_job_config(compose(["data.synthetic_documents=400", "tokenizer.vocab_size=150", *overrides]))
    prepared = prepare_pretraining_data(job)
    tok = BertTokenizer.from_pretrained(prepared.tokenizer_dir, local_files_only=True)
    return job, prepared, tok, open_split(prepared.data_dir, "train", job, tok)


def test_every_span_token_carries_the_positions_bordering_its_span():
    """x_{s-1} and x_{e+1} of SpanBERT: every token strictly between a token's boundaries is masked with it, the
    boundaries themselves are real positions of the row, and tokens outside spans carry -1."""
    _, _, tok, rows = _rows("task.masking=span", "task.sbo=true")
    widths = []
    for i in range(150):
        r = rows.row(i, epoch=1)
        sel = r["mlm_labels"] != -100
        left, right = r["sbo_left"], r["sbo_right"]
        assert ((left >= 0) == sel).all() and ((right >= 0) == sel).all()
        for p in np.flatnonzero(sel):
            assert 0 <= left[p] < p < right[p] < len(sel)
            assert sel[left[p] + 1 : right[p]].all(), "the whole span between the boundaries is masked"
            assert (left[left[p] + 1 : right[p]] == left[p]).all(), "one span, one pair of boundaries"
        widths += list((right - left - 1)[sel])
    assert np.mean(widths) > 2.0  # spans of whole words, geometric lengths
    plain = _rows("task.masking=span")[3].row(0, epoch=1)
    assert "sbo_left" not in plain


def test_span_boundary_objective_trains_and_is_left_out_of_the_export(tmp_path):
    """Real span-masked rows through collate: the SBO head's loss falls with the MLM's on a fixed batch, its
    accuracy is counted over the same tokens as the MLM's, and the export (the family's HF model) has no SBO
    weights and reloads with the Auto class."""
    from transformers import AutoModelForMaskedLM

    from orchestrator.config.schema import ModelConfig
    from orchestrator.model.build import build_pretraining_model
    from orchestrator.worker.pretrain_task import collate

    job, prepared, tok, rows = _rows("task.masking=span", "task.sbo=true", "task.max_seq_length=64")
    batch = collate([rows.row(i, 0) for i in range(8)], tok.pad_token_id, nsp=False)
    assert (batch["sbo_left"] >= 0).sum() == (batch["mlm_labels"] != -100).sum()
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = build_pretraining_model(cfg, prepared.vocab_size, tok.pad_token_id, nsp=False, seed=0,
                                    sbo_positions=job.task.max_seq_length).train()
    inputs = {k: v for k, v in batch.items() if k != "n_tokens"}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = model(**inputs)
    assert first["sbo_count"] == first["mlm_count"] > 0
    assert torch.allclose(first["loss"], first["mlm_loss"] + first["sbo_loss"])
    for _ in range(15):
        out = model(**inputs)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["sbo_loss"]) < float(first["sbo_loss"]) - 0.5 and float(out["mlm_loss"]) < float(first["mlm_loss"])
    assert model.sbo.fc1.weight.grad is not None and model.sbo.positions.weight.grad.abs().sum() > 0
    without = {k: v for k, v in inputs.items() if not k.startswith("sbo_")}
    assert "sbo_loss" not in model(**without)  # no boundaries given (e.g. an evaluation batch without them): MLM only
    model.hf.save_pretrained(str(tmp_path))
    state = AutoModelForMaskedLM.from_pretrained(str(tmp_path)).state_dict()
    assert not any("sbo" in k or "positions.weight" == k for k in state)


@pytest.mark.parametrize("overrides, says", [
    (["task.sbo=true"], "task.masking=span"),
    (["task.masking=span", "task.sbo=true", "task.objective=rtd"], "replaced-token"),
])
def test_span_boundary_objective_without_spans_is_refused_naming_the_key(overrides, says):
    with pytest.raises(ConfigError) as err:
        check_job(to_job_config(compose(["experiment=none", *overrides])))
    assert err.value.key == "task.sbo" and says in str(err.value)


@pytest.mark.slow
def test_spanbert_job_logs_and_evaluates_the_boundary_objective(tmp_path):
    """task.masking=span task.sbo=true on launcher=local: the loss (MLM + SBO) falls, every log step has sbo_acc,
    and the held-out evaluation scores the same span tokens from their boundaries (eval_sbo_acc)."""
    from conftest import read_jsonl
    from orchestrator.driver import train
    from test_families import SMOKE

    over = [*SMOKE, "launcher=local", "compute=cpu1", "engine=torch", "train.global_batch_size=16",
            "train.micro_batch_size_per_gpu=16", "task.masking=span", "task.sbo=true"]
    summary = train(compose(over), run_dir=str(tmp_path), interactive=False)
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r and "event" not in r]
    losses = [r["loss"] for r in recs]
    assert summary["status"] == "completed" and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    assert all(0.0 <= r["sbo_acc"] <= 1.0 for r in recs)
    ev = summary["final_eval"]
    assert ev["eval_rows"] > 0 and 0.0 < ev["eval_sbo_acc"] <= 1.0 and 0.0 < ev["eval_mlm_acc"] <= 1.0


@pytest.mark.parametrize("task, says", [
    ({"masking": "span", "sbo": True}, "Masked LM (15% of tokens in span units, 80/10/10) with SpanBERT's span-boundary"),
    ({"nsp": True}, "Masked LM (15% of tokens in token units, 80/10/10) with next-sentence prediction."),
    ({"objective": "rtd"}, "Replaced-token detection (ELECTRA / DeBERTa-v3): this is the discriminator"),
    ({"distill_from": "runs/teacher"}, "Distilled from `runs/teacher`"),
])
def test_model_card_says_the_pretraining_objective(task, says):
    from orchestrator.worker.model_card import model_card

    plan = {"config": {"run_name": "r", "model": {"family": "bert", "num_hidden_layers": 2, "hidden_size": 32,
                                                  "num_attention_heads": 2},
                       "task": {"name": "pretrain", "mlm_probability": 0.15, "masking": "token", **task},
                       "data": {"source": "synthetic", "synthetic_documents": 10, "synthetic_seed": 0},
                       "train": {"init_from": None}},
            "global_batch_size": 8, "tokens_per_step": 256}
    card = model_card(plan, {"steps": 4, "world_size": 1, "final_eval": {}})
    assert says in card
    assert ("from its teacher." in card) == bool(task.get("distill_from"))
