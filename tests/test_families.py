"""Model families (issue 17): every family's own HF classes, driven by our batches (packed rows, sparse MLM head),
exported so that the Auto classes reload them, fine-tuned by the same tasks, and refused where a pairing cannot work."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import compose, read_jsonl, train_in_one_worker_group
from orchestrator.config.schema import ModelConfig
from orchestrator.model.families import FAMILIES, SPECS

V = 64  # vocabulary of the unit tests
SPECIAL = {"pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3}


def _tiny(family: str) -> ModelConfig:
    return ModelConfig(family=family, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _model(family: str, seed: int = 0):
    from orchestrator.model.build import build_pretraining_model

    return build_pretraining_model(_tiny(family), V, 0, nsp=False, seed=seed, special=SPECIAL).eval()


def _sample(n: int, gen: torch.Generator):
    ids = torch.randint(5, V, (n,), generator=gen)
    ids[0], ids[-1] = SPECIAL["cls_token_id"], SPECIAL["sep_token_id"]
    labels = torch.full((n,), -100)
    labels[[2, n - 3]] = ids[[2, n - 3]]
    return ids, labels


def _rows(samples, T: int):
    """One row per sample list: samples packed back to back, block-diagonal mask, positions restarting."""
    B = len(samples)
    ids = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100)
    pos = torch.zeros((B, T), dtype=torch.long)
    seq = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(samples):
        at = 0
        for k, (s, lab) in enumerate(row):
            n = len(s)
            ids[b, at:at + n], labels[b, at:at + n], pos[b, at:at + n] = s, lab, torch.arange(n)
            seq[b, at:at + n] = k + 1
            at += n
    same = (seq[:, :, None] == seq[:, None, :]) & (seq > 0)[:, :, None]
    mask = (same | torch.eye(T, dtype=torch.bool)[None])[:, None]
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), position_ids=pos, attention_mask=mask,
                mlm_labels=labels)


def _sparse_logits(model, batch) -> torch.Tensor:
    from orchestrator.model.families import backbone, encode, mlm_head

    h = encode(model.family, backbone(model.hf), batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
               batch["position_ids"])
    flat = batch["mlm_labels"].reshape(-1)
    return mlm_head(model.family, model.hf)(h.reshape(-1, h.shape[-1])[flat != -100])


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_scores_each_sample_as_if_alone(family):
    """Packing is exact in every family: two samples in one row (block-diagonal attention, positions restarting;
    DeBERTa's relative positions, RoBERTa's offset ones, ModernBERT's rotary ones) give the MLM logits each gets in
    a row of its own."""
    gen = torch.Generator().manual_seed(1)
    a, b = _sample(9, gen), _sample(12, gen)
    model = _model(family)
    with torch.no_grad():
        packed = _sparse_logits(model, _rows([[a, b]], 24))
        alone = torch.cat([_sparse_logits(model, _rows([[a]], 16)), _sparse_logits(model, _rows([[b]], 16))])
        other = _sparse_logits(model, _rows([[b, a]], 24))
    assert packed.shape == (4, V)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(packed, other[[2, 3, 0, 1]] + 1e-3), "the comparison can fail"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_holding_one_sample_scores_as_the_models_own_padding_mask_path(family):
    """A packed row (our [B, 1, T, T] mask) holding one whole sample gives the logits transformers gives the same
    sample with a [B, T] mask, from which it builds each layer's own mask: ModernBERT's local-attention layers see
    only their window (shrunk to 4 here, so it matters at 20 tokens) in both."""
    from orchestrator.model.families import backbone, encode, mlm_head

    gen = torch.Generator().manual_seed(2)
    a = _sample(20, gen)
    model = _model(family)
    if family == "modernbert":
        model.hf.config.sliding_window = 4
    batch = _rows([[a]], 20)
    with torch.no_grad():
        packed = _sparse_logits(model, batch)
        h = encode(model.family, backbone(model.hf), batch["input_ids"], torch.ones(1, 20, dtype=torch.long),
                   batch["token_type_ids"])
        flat = batch["mlm_labels"].reshape(-1)
        own = mlm_head(model.family, model.hf)(h.reshape(-1, h.shape[-1])[flat != -100])
    torch.testing.assert_close(packed, own, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deberta_v2"])
def test_manual_cpu_bf16_attention_gives_the_sdpa_logits_in_every_family(family):
    """Every family on transformers' SDPA path, switched to the manual attention (engine.attention=auto on a CPU
    under bf16): packed rows under bf16 autocast give SDPA's logits within bf16 rounding, without an SDPA op."""
    from torch.profiler import profile

    from orchestrator.model.attention import NAME, use_cpu_bf16_attention
    from orchestrator.worker.hardware import attention_context

    gen = torch.Generator().manual_seed(3)
    batch = _rows([[_sample(9, gen), _sample(12, gen)], [_sample(20, gen)]], 24)
    model = _model(family)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with attention_context("math"):
            sdpa = _sparse_logits(model, batch).float()
        assert use_cpu_bf16_attention(model) and model.hf.config._attn_implementation == NAME
        with profile() as prof:
            manual = _sparse_logits(model, batch).float()
    assert "aten::scaled_dot_product_attention" not in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(manual, sdpa, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_with_auto_class_and_gives_the_same_logits(family, tmp_path):
    """A few optimizer steps on a fixed batch lower the loss; the exported HF dir reloads with
    AutoModelForMaskedLM as the family's own class, whose full-sequence logits at the masked positions are the
    training model's sparse-head logits."""
    from transformers import AutoModelForMaskedLM

    gen = torch.Generator().manual_seed(2)
    batch = _rows([[_sample(10, gen), _sample(14, gen)], [_sample(20, gen)]], 24)
    model = _model(family).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch)["loss"]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    model.hf.save_pretrained(str(tmp_path), safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == SPECS[family].model_type
    loaded = AutoModelForMaskedLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert type(loaded).__name__ == f"{SPECS[family].prefix}ForMaskedLM"
    gen = torch.Generator().manual_seed(3)
    ids, labels = _sample(16, gen)
    one = _rows([[(ids, labels)]], 16)
    with torch.no_grad():
        ours = _sparse_logits(model, one)
        theirs = loaded(input_ids=ids[None], attention_mask=torch.ones(1, 16, dtype=torch.long)).logits[0][labels != -100]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["classify", "ner", "qa"])
def test_every_finetuning_head_of_every_family_trains(family, task):
    """Each fine-tuning task builds the family's own head class and backpropagates a finite loss (RoBERTa,
    DeBERTa-v3 and ModernBERT get no segment ids: they have no segment embeddings)."""
    from orchestrator.worker.finetune_task import build_head_model

    model = build_head_model(task, _tiny(family), V, [0, 1, 2] if task != "qa" else None, 0, 0, None)
    assert type(model.hf).__name__.startswith(SPECS[family].prefix)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(5, V, (2, 12), generator=gen)
    types = torch.cat([torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], 1)
    kw = dict(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids))
    if task == "classify":
        kw["labels"] = torch.tensor([0, 2])
    elif task == "ner":
        kw["labels"] = torch.randint(0, 3, (2, 12), generator=gen)
    else:
        kw["start_positions"], kw["end_positions"] = torch.tensor([3, 4]), torch.tensor([5, 4])
    out = model(**kw)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


# ---------------------------------------------------------------- bad input: one line naming the key


@pytest.mark.parametrize("overrides, key, says", [
    (["model.family=gpt2"], "model.family", "'gpt2' is not one of bert, roberta"),
    (["model.family=roberta", "task=pretrain_nsp"], "task.nsp", "RoBERTa dropped next-sentence prediction"),
    (["model.family=albert", "task=pretrain_nsp"], "task.nsp", "sentence-order prediction"),
    (["model.family=bert", "model.embedding_size=64"], "model.embedding_size", "only albert and electra"),
    (["model.family=bert", "task.sop=true"], "task.sop", "sentence-order prediction is ALBERT's head"),
])
def test_a_family_pairing_that_cannot_work_is_refused_naming_the_key(overrides, key, says):
    from orchestrator.config.schema import check_job, to_job_config
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        check_job(to_job_config(compose(["experiment=none", *overrides])))
    assert err.value.key == key and says in str(err.value), str(err.value)


def test_pretraining_from_another_familys_checkpoint_is_refused_at_plan_time(tmp_path):
    """train.init_from of a RoBERTa export into a BERT pretraining job: refused before any data or worker, naming
    model.family."""
    from orchestrator.errors import ConfigError
    from orchestrator.plan.inputs import check_inputs
    from orchestrator.config.schema import to_job_config

    _model("roberta").hf.save_pretrained(str(tmp_path / "rob"), safe_serialization=True)
    job = to_job_config(compose(["experiment=none", f"train.init_from={tmp_path / 'rob'}"]))
    with pytest.raises(ConfigError) as err:
        check_inputs(job)
    assert err.value.key == "model.family" and "holds a roberta model" in str(err.value)
    job.model.family = "roberta"
    check_inputs(job)  # the matching family passes


def test_identity_of_a_bert_job_is_unchanged_by_the_family_keys():
    """Runs made before model.family existed keep their run name and resume: the new keys at their defaults are
    not part of the identity; another family is."""
    from orchestrator.config.schema import to_job_config
    from orchestrator.plan.identity import job_identity
    from dataclasses import asdict

    bert = job_identity(asdict(to_job_config(compose(["experiment=none"]))))
    assert not any(k.startswith(("model.family", "model.embedding_size")) for k in bert)
    rob = job_identity(asdict(to_job_config(compose(["experiment=none", "model.family=roberta"]))))
    assert rob["model.family"] == "roberta"


# ---------------------------------------------------------------- real jobs (integration tier)

SMOKE = ["experiment=none", "data.synthetic_documents=200", "data.eval_max_samples=32", "tokenizer.vocab_size=256",
         "task.max_seq_length=32", "train.max_steps=16", "train.log_every_steps=1", "train.eval_every_steps=null",
         "train.checkpoint_every_steps=16", "optim.lr=2e-3", "schedule.warmup_steps=2"]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "event" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_pretrains_on_the_local_launcher_then_finetunes_from_it(family, tmp_path):
    """launcher=local: a few pretraining steps with the loss falling; then `task=classify` from that run takes its
    family and shape from the checkpoint, trains, and exports a dir the Auto class reloads as the family's own
    classifier; the model card names the family."""
    from transformers import AutoModelForSequenceClassification

    from orchestrator.driver import train
    from orchestrator.worker.model_card import FAMILY_NAMES

    pre = tmp_path / "pre"
    summary = train(compose([*SMOKE, "launcher=local", "compute=cpu1", "engine=torch", "train.global_batch_size=16",
                             "train.micro_batch_size_per_gpu=16", f"model.family={family}"]),
                    run_dir=str(pre), interactive=False)
    losses = _losses(pre)
    assert summary["status"] == "completed" and len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    ft = tmp_path / "ft"
    summary = train(compose(["experiment=none", "launcher=local", "compute=cpu1", "engine=torch", "task=classify",
                             "task.synthetic=sentiment", "task.synthetic_train=64", "task.synthetic_eval=32",
                             "task.max_seq_length=32", "train.max_steps=null", "train.epochs=1",
                             "train.global_batch_size=16", "train.micro_batch_size_per_gpu=16",
                             f"train.init_from={pre}"]),  # model.family not given: the checkpoint's is taken
                    run_dir=str(ft), interactive=False)
    assert summary["status"] == "completed"
    assert json.loads((ft / "plan.json").read_text())["config"]["model"]["family"] == family
    loaded = AutoModelForSequenceClassification.from_pretrained(str(ft / "export"), local_files_only=True)
    assert type(loaded).__name__ == f"{SPECS[family].prefix}ForSequenceClassification"
    assert f"A {FAMILY_NAMES[family]} encoder" in (ft / "export" / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_the_same_losses_under_every_zero_stage(family, tmp_path):
    """launcher=local with DeepSpeed ZeRO-0, 1, 2 and 3 (world 1, fp32): every stage runs the family's own code
    paths (ZeRO-3 gathers each module's partitioned weights around its forward, the tied decoder included) and
    gives the same losses as ZeRO-0 step by step, with the loss falling."""
    from orchestrator.driver import train

    losses = {}
    for stage in range(4):
        run_dir = tmp_path / f"zero{stage}"
        summary = train(compose([*SMOKE, "launcher=local", "compute=cpu1", f"engine=zero{stage}", "engine.bf16=false",
                                 "train.global_batch_size=16", "train.micro_batch_size_per_gpu=16",
                                 "train.max_steps=10", "train.checkpoint_every_steps=10", f"model.family={family}"]),
                        run_dir=str(run_dir), interactive=False)
        assert summary["status"] == "completed"
        losses[stage] = _losses(run_dir)
    assert len(losses[0]) == 10 and sum(losses[0][-3:]) / 3 < sum(losses[0][:3]) / 3 - 0.15, losses[0]
    for stage in (1, 2, 3):
        assert losses[stage] == pytest.approx(losses[0], rel=1e-4), (stage, losses[stage], losses[0])


@pytest.mark.slow
def test_every_family_trains_under_ray_with_zero2_and_zero3_on_two_workers(ray_cluster, tmp_path):
    """launcher=ray, DeepSpeed ZeRO-2 and ZeRO-3 on 2 workers, one job per family and stage (ZeRO-3 partitions each
    weight across the workers: ALBERT's one shared layer is gathered at every depth, DeBERTa takes its own encode
    path, the decoder is tied); one Ray Train worker group runs them in turn (the
    assertion is about each family under ZeRO, not the launcher). Each completes with the loss falling and exports
    its family's masked-LM class. A ZeRO-3 distillation in the same group holds about half its teacher per worker."""
    from orchestrator.data.tokenizer import train_wordpiece
    from orchestrator.model.build import build_pretraining_model

    runs = [(f, stage) for stage in (2, 3) for f in FAMILIES]
    on_ray = [*SMOKE, "launcher=ray", "compute=cpu2", "train.global_batch_size=16", "train.micro_batch_size_per_gpu=4",
           "train.max_steps=10", "train.checkpoint_every_steps=10"]  # 10 steps: the loss falls by ~0.6 in them
    jobs = [(compose([*on_ray, f"engine=zero{stage}", f"model.family={f}"]), tmp_path / f"{f}_zero{stage}")
            for f, stage in runs]
    # and a distillation at ZeRO-3, whose frozen teacher is partitioned across the two workers as well
    tok = train_wordpiece([s for s in SENTENCES for _ in range(3)], 256, 1, True)
    teacher = build_pretraining_model(_tiny("bert"), len(tok.get_vocab()), tok.pad_token_id, nsp=False, seed=0)
    teacher.hf.save_pretrained(str(tmp_path / "teacher"))
    tok.save_pretrained(str(tmp_path / "teacher"))
    jobs.append((compose([*on_ray, "engine=zero3", "task=distill", f"task.distill_from={tmp_path / 'teacher'}"]),
                 tmp_path / "distill_zero3"))
    summaries = train_in_one_worker_group(jobs)
    distill = summaries.pop()
    assert distill["status"] == "completed" and distill["world_size"] == 2
    sharded = [r for r in read_jsonl(tmp_path / "distill_zero3" / "metrics.jsonl") if r.get("event") == "teacher_sharded"]
    assert sharded and sharded[0]["teacher_params_held"] <= 0.55 * sharded[0]["teacher_params"], sharded
    assert json.loads((tmp_path / "distill_zero3" / "export" / "config.json").read_text())["num_hidden_layers"] == 1
    for (family, stage), summary in zip(runs, summaries):
        run_dir = tmp_path / f"{family}_zero{stage}"
        plan = json.loads((run_dir / "plan.json").read_text())
        assert plan["deepspeed_config"]["zero_optimization"]["stage"] == stage
        assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["steps"] == 10
        losses = _losses(run_dir)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, (family, losses)
        cfg = json.loads((run_dir / "export" / "config.json").read_text())
        assert cfg["model_type"] == SPECS[family].model_type
        assert cfg["architectures"] == [f"{SPECS[family].prefix}For{'PreTraining' if family == 'bert' else 'MaskedLM'}"]


def test_sentence_order_pairs_are_one_documents_segments_swapped_half_the_time():
    """ALBERT's SOP samples: both segments from one document, adjacent in it; label 1 = the later one comes first."""
    import numpy as np

    from orchestrator.data.pretraining import build_samples

    rng = np.random.default_rng(0)
    sent_lengths = rng.integers(3, 12, size=4000)
    sent_off = np.concatenate([[0], np.cumsum(sent_lengths)])
    doc_off = np.arange(0, 4001, 8)  # 500 documents of 8 sentences
    samples = build_samples(sent_off, doc_off, 64, nsp=False, short_seq_prob=0.1, seed=3, sop=True)
    doc_of = lambda tok: int(np.searchsorted(sent_off[doc_off], tok, side="right") - 1)  # noqa: E731
    assert len(samples) > 500
    for a0, a1, b0, b1, label in samples:
        assert a1 > a0 and b1 > b0 and (a1 - a0) + (b1 - b0) <= 61
        assert doc_of(a0) == doc_of(a1 - 1) == doc_of(b0) == doc_of(b1 - 1)
        first, second = ((a0, a1), (b0, b1)) if label == 0 else ((b0, b1), (a0, a1))
        assert first[1] <= second[0], "the in-order reading has the first segment before the second"
    assert 0.43 < samples[:, 4].mean() < 0.57  # ~550 fair coin flips: 3 standard deviations


@pytest.mark.slow
def test_albert_pretrains_with_sentence_order_prediction(tmp_path):
    """model.family=albert task.sop=true: the SOP head trains and is scored (sop_acc, eval_sop_acc), and the export
    (AlbertForPreTraining) reloads as a masked LM."""
    from transformers import AutoModelForMaskedLM

    from orchestrator.driver import train

    summary = train(compose([*SMOKE, "launcher=local", "compute=cpu1", "engine=torch", "train.global_batch_size=16",
                             "train.micro_batch_size_per_gpu=16", "model.family=albert", "task.sop=true"]),
                    run_dir=str(tmp_path), interactive=False)
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r and "event" not in r]
    assert all(0.0 <= r["sop_acc"] <= 1.0 for r in recs) and "nsp_acc" not in recs[0]
    assert 0.0 <= summary["final_eval"]["eval_sop_acc"] <= 1.0 and summary["final_eval"]["eval_rows"] > 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == ["AlbertForPreTraining"]
    assert type(AutoModelForMaskedLM.from_pretrained(str(tmp_path / "export"))).__name__ == "AlbertForMaskedLM"


SENTENCES = [f"the {a} {b} sat on the {c} mat, and {a}s watched." for a in ("cat", "dog", "owl", "fox")
             for b in ("quietly", "happily", "slowly") for c in ("red", "blue", "green")]


def test_byte_level_bpe_is_trained_deterministically_with_robertas_special_tokens():
    """tokenizer.kind=bpe: RoBERTa's byte-level BPE (no unknown token ever: "é" and "☃" encode), the same vocabulary
    from the same sentences, `<s> A </s></s> B </s>` pairs; word starts carry "Ġ", so whole-word masking knows which
    pieces continue a word."""
    from orchestrator.data.rows import continuation_mask
    from orchestrator.data.tokenizer import train_bpe

    a, b = (train_bpe(SENTENCES, 300, 2, lowercase=True) for _ in range(2))
    assert a.get_vocab() == b.get_vocab()
    assert (a.cls_token, a.sep_token, a.pad_token, a.mask_token) == ("<s>", "</s>", "<pad>", "<mask>")
    enc = a("the owl sat", "café ☃")["input_ids"]
    assert a.unk_token_id not in enc and a.convert_ids_to_tokens(enc)[0] == "<s>"
    assert a.decode(enc, skip_special_tokens=True).strip() == "the owl sat café ☃"
    cont = continuation_mask(a)
    pieces = a.convert_ids_to_tokens(a("foxes watched", add_special_tokens=False)["input_ids"])
    starts = [not cont[a.convert_tokens_to_ids(p)] for p in pieces]
    assert pieces[0].startswith("\u0120") and starts[0] and starts.count(True) == 2, pieces
    assert not cont[a.convert_tokens_to_ids("<mask>")]


@pytest.mark.slow
def test_roberta_recipe_pretrains_with_its_own_byte_level_bpe(tmp_path):
    """model.family=roberta tokenizer.kind=bpe, whole-word masking: the loss falls and the export's tokenizer is
    the byte-level one (AutoTokenizer round-trips text it never saw)."""
    from transformers import AutoTokenizer

    from orchestrator.driver import train

    train(compose([*SMOKE, "launcher=local", "compute=cpu1", "engine=torch", "train.global_batch_size=16",
                   "train.micro_batch_size_per_gpu=16", "model.family=roberta", "tokenizer.kind=bpe",
                   "task.masking=whole_word"]), run_dir=str(tmp_path), interactive=False)
    losses = _losses(tmp_path)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert tok.mask_token == "<mask>" and tok.decode(tok("zebra café")["input_ids"], skip_special_tokens=True).strip() == "zebra café"


@pytest.mark.parametrize("family", ["electra", "deberta_v2", "bert"])
def test_replaced_token_detection_trains_generator_and_discriminator_on_shared_embeddings(family, tmp_path):
    """task.objective=rtd: a half-depth generator fills the masks, the discriminator tells replaced tokens from
    originals; both learn on a fixed batch (generator MLM loss and discriminator BCE fall), their word embeddings
    are one module, and the exported discriminator reloads with the Auto class (ELECTRA with its RTD head)."""
    from transformers import AutoModel, AutoModelForPreTraining

    from orchestrator.model.families import backbone
    from orchestrator.model.rtd import build_rtd_model

    cfg = _tiny(family)
    cfg.num_hidden_layers = 2
    task = SimpleNamespace(rtd_generator_layers=None, rtd_weight=50.0)
    model = build_rtd_model(cfg, V, SPECIAL, task, seed=0).train()
    assert model.gen.hf.config.num_hidden_layers == 1
    assert backbone(model.gen.hf).get_input_embeddings() is backbone(model.disc).get_input_embeddings()
    gen = torch.Generator().manual_seed(7)
    batch = _rows([[_sample(10, gen), _sample(14, gen)], [_sample(20, gen)]], 24)
    batch["mlm_labels"][batch["input_ids"] > 0] = batch["input_ids"][batch["input_ids"] > 0]  # every token masked
    batch["input_ids"][batch["mlm_labels"] != -100] = 4  # as [MASK]: the generator guesses, often wrong
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    first = model(**batch)
    for _ in range(25):
        out = model(**batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["mlm_loss"]) < float(first["mlm_loss"]) and float(out["rtd_loss"]) < float(first["rtd_loss"])
    assert 0 < float(first["rtd_replaced"]) <= float(first["rtd_count"])
    model.hf.save_pretrained(str(tmp_path))
    loaded = (AutoModelForPreTraining if family == "electra" else AutoModel).from_pretrained(str(tmp_path))
    assert type(loaded) is type(model.disc)


def test_rtd_pairings_that_cannot_work_are_refused_naming_the_key():
    from orchestrator.config.schema import check_job, to_job_config
    from orchestrator.errors import ConfigError

    for overrides, key in ((["task=pretrain_nsp", "task.objective=rtd"], "task.nsp"),
                           (["task.objective=rtd", "task.rtd_generator_layers=2"], "task.rtd_generator_layers")):
        with pytest.raises(ConfigError) as err:
            check_job(to_job_config(compose(["experiment=none", *overrides])))
        assert err.value.key == key, str(err.value)


@pytest.mark.slow
def test_deberta_v3_style_rtd_job_runs_and_its_discriminator_is_fine_tuned(tmp_path):
    """model.family=deberta_v2 task.objective=rtd on launcher=local: the loss falls, the held-out RTD accuracy is
    reported with its all-original baseline, and task=classify fine-tunes the exported discriminator."""
    from orchestrator.driver import train

    pre = tmp_path / "pre"
    summary = train(compose([*SMOKE, "launcher=local", "compute=cpu1", "engine=torch", "train.global_batch_size=16",
                             "train.micro_batch_size_per_gpu=16", "model.family=deberta_v2", "task.objective=rtd"]),
                    run_dir=str(pre), interactive=False)
    losses = _losses(pre)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    ev = summary["final_eval"]
    assert 0.5 < ev["eval_rtd_baseline_all_original_acc"] < 1.0 and ev["eval_rtd_acc"] > 0.5
    assert json.loads((pre / "export" / "config.json").read_text())["architectures"] == ["DebertaV2Model"]
    ft = train(compose(["experiment=none", "launcher=local", "compute=cpu1", "engine=torch", "task=classify",
                        "task.synthetic=sentiment", "task.synthetic_train=64", "task.synthetic_eval=32",
                        "task.max_seq_length=32", "train.max_steps=null", "train.epochs=1",
                        "train.global_batch_size=16", "train.micro_batch_size_per_gpu=16", f"train.init_from={pre}"]),
               run_dir=str(tmp_path / "ft"), interactive=False)
    assert ft["status"] == "completed"


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_plan_counts_each_familys_own_parameters(family):
    """The plan's memory estimate counts the model the job builds (on the meta device): equal to the real model's
    parameters for every family, RTD's generator included; ALBERT's one shared layer makes it far smaller than BERT's
    closed form."""
    from orchestrator.model.build import build_pretraining_model
    from orchestrator.model.families import counted_parameters
    from orchestrator.model.rtd import build_rtd_model

    cfg = _tiny(family)
    cfg.num_hidden_layers = 4
    mlm = SimpleNamespace(objective="mlm", nsp=False, sop=False, sbo=False, max_seq_length=32)
    rtd = SimpleNamespace(objective="rtd", rtd_generator_layers=None, rtd_weight=50.0)
    real = sum(p.numel() for p in build_pretraining_model(cfg, V, 0, nsp=False, seed=0).parameters())
    assert counted_parameters(cfg, mlm, V)[0] == real
    real_rtd = sum(p.numel() for p in build_rtd_model(cfg, V, SPECIAL, rtd, seed=0).parameters())
    assert counted_parameters(cfg, rtd, V)[0] == real_rtd > real
    if family == "albert":  # at base shape (on the meta device: nothing allocated) ALBERT-base's ~12M, not 110M
        from orchestrator.plan.memory import parameter_count

        base = ModelConfig(family="albert", embedding_size=128, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)
        assert counted_parameters(base, mlm, 30000)[0] < 0.15 * parameter_count(768, 12, 3072, 30000)


def _loss_and_grads(model, batch, extra):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws (ALBERT's sentence-order classifier keeps its dropout)
    out = model(**batch, **extra)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rows", ["packed", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_at_the_loss_positions_gives_the_full_layers_loss_and_gradients(family, rows, monkeypatch):
    """The last layer run only where the loss reads it (masked positions, their span boundaries, each sample's
    [CLS]: `encode_at`) gives the loss and every gradient of the whole last layer, on packed rows (block-diagonal
    mask) and on one padded sample per row (`task.packing=false`: a [B, T] mask), with the span-boundary head and
    the family's sentence-pair head; and for BERT-layer families it did run on fewer rows."""
    from orchestrator.model import families
    from orchestrator.model.build import build_pretraining_model

    gen = torch.Generator().manual_seed(4)
    if rows == "packed":
        batch = _rows([[_sample(9, gen), _sample(12, gen)], [_sample(20, gen)], [_sample(7, gen)]], 24)
        cls = [0, 9, 24, 48]
    else:
        batch = _rows([[_sample(21, gen)], [_sample(20, gen)], [_sample(7, gen)]], 24)
        batch.update(attention_mask=(batch["input_ids"] != 0).long(), position_ids=None)
        cls = [0, 24, 48]
    pair = family in ("bert", "albert")
    model = build_pretraining_model(_tiny(family), V, 0, nsp=pair, seed=0, special=SPECIAL, sbo_positions=8).train()
    flat = torch.arange(batch["input_ids"].numel()).view_as(batch["input_ids"])
    extra = dict(sbo_left=flat - 1, sbo_right=flat + 1)
    if pair:
        extra.update(cls_index=torch.tensor(cls), nsp_labels=torch.tensor([0, 1, 1, 0][: len(cls)]))
    rows_seen = []  # rows the last layer's FFN ran on: the fast path, then the whole layer
    if family in families.LAST_LAYER_AT:
        ffn_in = families.backbone(model.hf).encoder.layer[-1].intermediate.dense
        ffn_in.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[:-1].numel()))
    fast = _loss_and_grads(model, batch, extra)
    monkeypatch.setattr(families, "LAST_LAYER_AT", ())  # every family through `encode`: the whole last layer
    full = _loss_and_grads(model, batch, extra)
    torch.testing.assert_close(fast[0], full[0], rtol=1e-5, atol=1e-6)
    assert fast[1].keys() == full[1].keys()
    for name in full[1]:
        torch.testing.assert_close(fast[1][name], full[1][name], rtol=1e-4, atol=1e-6, msg=name)
    if family in families.LAST_LAYER_AT:
        assert rows_seen[0] < batch["input_ids"].numel() == rows_seen[1], rows_seen


def test_last_layer_at_under_the_cpu_bf16_attention_matches_the_whole_layer():
    """The manual CPU bf16 attention (what engine.attention=auto trains with on a CPU) reads per-query rows of the
    block-diagonal mask: the last layer at the masked positions gives the whole layer's logits within bf16
    rounding."""
    from orchestrator.model.attention import use_cpu_bf16_attention
    from orchestrator.model.families import backbone, encode_at, mlm_head

    gen = torch.Generator().manual_seed(5)
    batch = _rows([[_sample(9, gen), _sample(12, gen)], [_sample(20, gen)]], 24)
    model = _model("bert")
    assert use_cpu_bf16_attention(model)
    masked = (batch["mlm_labels"].reshape(-1) != -100).nonzero(as_tuple=True)[0]
    args = (model.family, backbone(model.hf), batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
            batch["position_ids"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = mlm_head(model.family, model.hf)(encode_at(*args, masked)).float()
        whole = _sparse_logits(model, batch).float()
    torch.testing.assert_close(fast, whole, rtol=0.05, atol=0.05)
