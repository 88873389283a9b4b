"""Distillation (task=distill, issue 17): the student's initialisation from the teacher, the loss, the frozen teacher
kept out of the trained module, the plan-time refusals, and a real distillation job whose student is fine-tuned."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose, read_jsonl
from test_families import SMOKE, V, _model, _rows, _sample

from orchestrator.model.distill import DistillModel, kept_layers, student_of


def test_kept_layers_spread_evenly_keeping_first_and_last():
    assert kept_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice for BERT-base
    assert kept_layers(4, 2) == [0, 3] and kept_layers(6, 3) == [0, 2, 5] and kept_layers(4, 1) == [0]


@pytest.mark.parametrize("family", ["bert", "roberta", "albert", "deberta_v2", "modernbert", "electra"])
def test_student_is_the_teacher_with_every_other_layer(family):
    """Every student weight comes from the teacher: shared ones as they are, layer j from teacher layer kept[j]."""
    from orchestrator.model.build import build_pretraining_model
    from test_families import SPECIAL, _tiny

    cfg = _tiny(family)
    cfg.num_hidden_layers = 4
    teacher = build_pretraining_model(cfg, V, 0, nsp=False, seed=5, special=SPECIAL)
    student = student_of(teacher, 2, seed=0)
    assert student.hf.config.num_hidden_layers == 2 and type(student.hf) is type(teacher.hf)
    t_sd, s_sd = teacher.hf.state_dict(), student.hf.state_dict()
    layered = [k for k in s_sd if ".layer.1." in k or ".layers.1." in k]
    assert bool(layered) != (family == "albert"), "ALBERT shares one layer group: nothing to pick"
    for k in layered:
        torch.testing.assert_close(s_sd[k], t_sd[k.replace(".layer.1.", ".layer.3.").replace(".layers.1.", ".layers.3.")])
    for k, v in s_sd.items():
        if k not in layered and ".layer.0." not in k and ".layers.0." not in k:
            torch.testing.assert_close(v, t_sd[k])


def test_distillation_lowers_its_loss_and_keeps_the_teacher_frozen_and_out_of_the_module():
    gen = torch.Generator().manual_seed(6)
    batch = _rows([[_sample(10, gen), _sample(14, gen)], [_sample(20, gen)]], 24)
    teacher = _model("bert", seed=1).train()
    t_opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for _ in range(15):  # a teacher with confident predictions, which its 1-layer student does not yet share
        t_loss = teacher(**batch)["loss"]
        t_opt.zero_grad()
        t_loss.backward()
        t_opt.step()
    student = student_of(teacher, 1, seed=0)
    for p in student.parameters():  # a student that starts far from its teacher: distillation must close the gap
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    model = DistillModel(student, teacher, 0, temperature=2.0, alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=1.0).train()
    before = {k: v.clone() for k, v in teacher.hf.state_dict().items()}
    assert all(k.startswith("student.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in student.parameters())
    assert not teacher.training
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        out = model(**batch)
        first = first if first is not None else (float(out["loss"].detach()), float(out["distill_kl"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss"].detach()) < 0.7 * first[0] and float(out["distill_kl"]) < first[1], (first, out)
    for k, v in teacher.hf.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher weight {k} moved"
    assert model.hf is student.hf


# ---------------------------------------------------------------- plan time


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny BERT pretrained for a few steps here (a real run dir: export/ with the tokenizer)."""
    from orchestrator.driver import train

    run = tmp_path_factory.mktemp("teacher") / "run"
    train(compose([*SMOKE, "launcher=local", "compute=cpu1", "engine=torch", "train.global_batch_size=16",
                   "train.micro_batch_size_per_gpu=16", "model.num_hidden_layers=4", "train.max_steps=30"]),
          run_dir=str(run), interactive=False)
    return run


@pytest.mark.slow
def test_plan_gives_the_student_half_the_teachers_layers_and_its_tokenizer(teacher_dir):
    from orchestrator.config.schema import to_job_config
    from orchestrator.plan.inputs import check_inputs

    job = to_job_config(compose(["experiment=none", "task=distill", f"task.distill_from={teacher_dir}", "model=mini"]))
    check_inputs(job)
    assert (job.model.num_hidden_layers, job.model.hidden_size, job.model.family) == (2, 128, "bert")
    assert job.tokenizer.source == "dir" and job.tokenizer.path == str(teacher_dir / "export")


@pytest.mark.slow
@pytest.mark.parametrize("overrides, key, says", [
    (["task.distill_layers=4"], "task.distill_layers", "not fewer than the teacher's 4"),
    (["task.nsp=true"], "task.nsp", "distillation trains the masked LM only"),
    (["task.distill_from={classifier}"], "task.distill_from", "without a masked-LM head"),
    (["tokenizer=dir", "tokenizer.path={other}"], "tokenizer.path", "is not the vocabulary of the teacher"),
])
def test_a_distillation_that_cannot_work_is_refused_naming_the_key(teacher_dir, tmp_path, overrides, key, says):
    from orchestrator.config.schema import check_job, to_job_config
    from orchestrator.errors import ConfigError
    from orchestrator.plan.inputs import check_inputs

    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]) + "\n")
    from transformers import BertConfig, BertForSequenceClassification

    classifier = tmp_path / "classifier"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64)).save_pretrained(str(classifier))
    job = to_job_config(compose(["experiment=none", "task=distill", f"task.distill_from={teacher_dir}",
                                 *[o.format(other=other, classifier=classifier) for o in overrides]]))
    with pytest.raises(ConfigError) as err:
        check_job(job)
        check_inputs(job)
    assert err.value.key == key and says in str(err.value), str(err.value)


@pytest.mark.slow
def test_a_distilled_student_trains_exports_and_is_fine_tuned(teacher_dir, tmp_path):
    """task=distill on launcher=local: the loss falls, the export is the student (half the layers, the teacher's
    tokenizer and family), and the same fine-tuning command takes it."""
    from transformers import AutoModelForMaskedLM

    from orchestrator.driver import train

    student = tmp_path / "student"
    summary = train(compose([*SMOKE, "launcher=local", "compute=cpu1", "engine=torch", "task=distill",
                             f"task.distill_from={teacher_dir}", "train.global_batch_size=16",
                             "train.micro_batch_size_per_gpu=16"]), run_dir=str(student), interactive=False)
    assert summary["status"] == "completed"
    losses = [r["loss"] for r in read_jsonl(student / "metrics.jsonl") if "loss" in r and "event" not in r]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    loaded = AutoModelForMaskedLM.from_pretrained(str(student / "export"), local_files_only=True)
    assert loaded.config.num_hidden_layers == 2
    from orchestrator.data.tokenizer import open_tokenizer

    assert open_tokenizer(student / "export").get_vocab() == open_tokenizer(teacher_dir / "export").get_vocab()
    ft = train(compose(["experiment=none", "launcher=local", "compute=cpu1", "engine=torch", "task=classify",
                        "task.synthetic=sentiment", "task.synthetic_train=64", "task.synthetic_eval=32",
                        "task.max_seq_length=32", "train.max_steps=null", "train.epochs=1",
                        "train.global_batch_size=16", "train.micro_batch_size_per_gpu=16",
                        f"train.init_from={student}"]), run_dir=str(tmp_path / "ft"), interactive=False)
    assert ft["status"] == "completed"
    plan = json.loads((tmp_path / "ft" / "plan.json").read_text())
    assert plan["config"]["model"]["num_hidden_layers"] == 2
