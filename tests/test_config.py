"""Config and plan validation: every config composes; bad input is refused with one line naming the key/file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONF_DIR, REPO, compose, run_cli
from orchestrator.driver import make_plan
from orchestrator.errors import ConfigError, DataError


def _plan(overrides, tmp_path, prepare=False):
    cfg = compose(overrides)
    return make_plan(cfg, run_dir=str(tmp_path / "run"), prepare=prepare)[0]


@pytest.mark.slow  # every option of every group: ~55 Hydra compositions
@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in sorted(os.listdir(CONF_DIR)) if os.path.isdir(os.path.join(CONF_DIR, g))
     for p in sorted(Path(CONF_DIR, g).glob("*.yaml"))],
)
def test_every_config_composes_and_plans(group, option, tmp_path):
    """No config file rots: each option of each group composes, validates and plans."""
    extra = []
    if group == "data" and option == "text" or group == "experiment" and option.endswith(("_pretrain", "_phase2")):
        corpus = tmp_path / "c.txt"
        corpus.write_text("a b c.\n\nd e f.\n")
        extra.append(f"data.paths=[{corpus}]")
    if group == "data" and option == "prepared":  # a prepare job's output_dir (read when data is prepared)
        extra.append(f"data.prepared_dir={tmp_path / 'prepared'}")
    if group == "experiment" and option.endswith("phase2"):  # a phase-1 run dir's export
        (tmp_path / "export").mkdir()
        (tmp_path / "export" / "config.json").write_text("{}")
        (tmp_path / "export" / "model.safetensors").write_bytes(b"")
        extra.append(f"train.init_from={tmp_path}")
    if group == "task" and option == "distill":  # a teacher: a 2-layer BERT dir with its tokenizer
        from orchestrator.config.schema import ModelConfig
        from orchestrator.data.tokenizer import train_wordpiece
        from orchestrator.model.build import build_pretraining_model

        tok = train_wordpiece(["the cat sat on the mat ."] * 20, 64, 1, True)
        teacher = build_pretraining_model(ModelConfig(), len(tok.get_vocab()), tok.pad_token_id, nsp=False, seed=0)
        teacher.hf.save_pretrained(str(tmp_path / "teacher"))
        tok.save_pretrained(str(tmp_path / "teacher"))
        extra.append(f"task.distill_from={tmp_path / 'teacher'}")
    if group == "tokenizer" and option == "dir":
        from orchestrator.data.tokenizer import train_wordpiece

        train_wordpiece(["the cat sat on the mat ."] * 20, 64, 1, True).save_pretrained(str(tmp_path / "tok"))
        extra.append(f"tokenizer.path={tmp_path / 'tok'}")
    if group == "task" and option in ("classify", "ner", "qa", "embed", "rerank"):
        extra.append("task.synthetic=" + {"classify": "category", "ner": "ner", "qa": "squad", "embed": "retrieval",
                                          "rerank": "retrieval"}[option])
        extra.append("task.max_seq_length=256")
    if group == "optim" and option == "lamb":
        extra.append("engine=zero0")
    if group == "compute":
        extra += ["train.global_batch_size=null", "train.grad_accum_steps=1"]
    if group == "launcher" and option == "local" or group == "engine" and option == "torch":
        extra.append("compute=cpu1")
    plan = _plan([f"{group}={option}", *extra], tmp_path)
    ds_config = plan.deepspeed_config
    assert ds_config["train_batch_size"] == ds_config["train_micro_batch_size_per_gpu"] * ds_config["gradient_accumulation_steps"] * plan.world_size


BAD_INPUTS = [
    # (overrides, expected key or file in the message)
    (["train.global_batch_size=100", "train.micro_batch_size_per_gpu=32"], "train.global_batch_size"),
    (["engine.zero_stage=4"], "engine.zero_stage"),
    (["engine.attention=flashy"], "engine.attention"),
    (["engine.attention=efficient"], "engine.attention"),
    (["compute=gpu_1x8", "engine.attention=manual", "train.global_batch_size=null", "train.grad_accum_steps=1"],
     "engine.attention"),
    (["engine.bf16=true", "engine.fp16=true"], "engine.fp16"),
    (["task.max_seq_length=1024"], "task.max_seq_length"),
    (["task.mlm_probability=1.5"], "task.mlm_probability"),
    (["task.mlm_probability=0.0"], "task.mlm_probability"),
    (["compute.workers_per_node=0"], "compute.workers_per_node"),
    (["+model.hiden_size=3"], "model.hiden_size"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["model.num_attention_heads=3"], "model.num_attention_heads"),
    (["optim=lamb", "engine=zero2"], "optim.name"),
    (["task.masking=sentence"], "task.masking"),
    (["launcher=local"], "launcher.name"),
    (["train.epochs=2"], "train.max_steps"),
    (["engine.fp16=true"], "engine.fp16"),
    (["compute.use_gpu=true", "compute.gpus_per_node=8", "compute.workers_per_node=12"], "compute.workers_per_node"),
    (["engine.offload_param=true"], "engine.offload_param"),
    (["compute=gpu_1x8", "compute.gpus_per_node=12", "train.global_batch_size=null", "train.grad_accum_steps=1"],
     "compute.gpus_per_node"),
    (["compute.network=carrier_pigeon"], "compute.network"),
    (["model=large", "compute=gpu_1x8", "compute.gpu_memory_gib=4", "train.global_batch_size=null",
      "train.grad_accum_steps=1", "train.micro_batch_size_per_gpu=64", "task.max_seq_length=512"],
     "train.micro_batch_size_per_gpu"),
]


@pytest.mark.parametrize("overrides,key", BAD_INPUTS, ids=[k + ":" + ",".join(o) for o, k in BAD_INPUTS])
def test_bad_config_refused_naming_key(overrides, key, tmp_path):
    with pytest.raises(ConfigError) as ei:
        _plan(overrides, tmp_path)
    msg = str(ei.value)
    assert key in msg and "\n" not in msg, msg


def test_lamb_with_offload_refused_naming_offload_key(tmp_path):
    """ZeRO-Offload steps AdamW on the host: lamb is refused at plan time; adamw plans, with a DeepSpeed config that
    lets DeepSpeed take torch's fused AdamW there."""
    for overrides, key in ((["engine=zero2", "engine.offload_optimizer=true"], "engine.offload_optimizer"),
                           (["engine=zero3", "engine.offload_param=true"], "engine.offload_param")):
        with pytest.raises(ConfigError) as ei:
            _plan(["optim=lamb", *overrides], tmp_path)
        msg = str(ei.value)
        assert key in msg and "optim=adamw" in msg and "\n" not in msg, msg
    plan = _plan(["optim=adamw", "engine=zero2", "engine.offload_optimizer=true"], tmp_path)
    assert plan.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert plan.deepspeed_config["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in _plan(["optim=adamw", "engine=zero2"], tmp_path).deepspeed_config


def test_unknown_model_names_the_option():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as ei:
        compose(["model=gigantic"])
    assert "model/gigantic" in str(ei.value)


def test_missing_corpus_names_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as ei:
        _plan(["data=text", f"data.paths=[{missing}]"], tmp_path)
    assert str(missing) in str(ei.value) and "\n" not in str(ei.value)


def test_empty_corpus_file_names_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError) as ei:
        _plan(["data=text", f"data.paths=[{empty}]"], tmp_path)
    assert str(empty) in str(ei.value)


def test_blank_only_corpus_refused_at_preparation(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(DataError) as ei:
        _plan(["data=text", f"data.paths=[{blank}]", "tokenizer.vocab_size=100"], tmp_path, prepare=True)
    assert str(blank) in str(ei.value)


def test_glob_matching_nothing_refused(tmp_path):
    with pytest.raises(DataError) as ei:
        _plan(["data=text", f"data.paths=[{tmp_path}/*.txt]"], tmp_path)
    assert "glob matches no file" in str(ei.value)


def test_unwritable_run_dir(tmp_path):
    cfg = compose([])
    with pytest.raises(ConfigError) as ei:
        make_plan(cfg, run_dir="/proc/definitely/not/writable", prepare=False)
    assert "run_dir" in str(ei.value) and "/proc/definitely/not/writable" in str(ei.value)


def test_tokenizer_dir_without_vocab(tmp_path):
    empty_dir = tmp_path / "tok"
    empty_dir.mkdir()
    with pytest.raises(ConfigError) as ei:
        _plan(["tokenizer=dir", f"tokenizer.path={empty_dir}"], tmp_path)
    assert "tokenizer.path" in str(ei.value) and "vocab.txt" in str(ei.value)


def test_cli_refuses_with_one_line_and_exit_2(tmp_path):
    res = run_cli(["engine.zero_stage=4", f"hydra.run.dir={tmp_path}/r"], timeout=120)
    assert res.returncode == 2, res.stderr
    err_lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert err_lines[-1].startswith("error: config key 'engine.zero_stage'"), res.stderr


@pytest.mark.parametrize("key", ["hydra.run.dir", "runs_root"])
def test_cli_refuses_a_run_dir_it_cannot_create_with_one_line(tmp_path, key):
    """Hydra makes the run dir before our code runs: the CLI refuses it first (a path under a file fails
    for root too, unlike permission bits)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = run_cli(["experiment=quickstart_pretrain", "plan_only=true", f"{key}={blocker}/run"], timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err_lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error: config key '{key}'"), res.stderr
    assert str(blocker) in err_lines[0]


def test_plan_only_is_fast_and_starts_no_ray(tmp_path):
    """plan_only=true prints the plan and writes plan.json without importing ray, torch or deepspeed."""
    code = (
        "import sys\n"
        f"sys.argv=['orchestrator','plan_only=true','hydra.run.dir={tmp_path}/p']\n"
        "from orchestrator.cli import main\n"
        "main()\n"
        "print('HEAVY', sorted(m for m in ('ray','torch','deepspeed') if m in sys.modules))\n"
    )
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout
    assert "global 64 = micro 32 x accum 1 x world 2" in res.stdout
    assert (tmp_path / "p" / "pretrain" / "plan.json").is_file()  # the default is the quickstart pipeline
    assert elapsed < 60, elapsed  # generous: seconds in practice; the point is no Ray start-up


def test_plan_only_bert_base_preset_prints_memory_and_time_estimate(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c.\n\nd e f.\n")
    res = run_cli(["experiment=bert_base_pretrain", f"data.paths=[{corpus}]", "plan_only=true",
                   f"hydra.run.dir={tmp_path}/p"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "GPU-hours on 8 x A100" in res.stdout and "memory/GPU" in res.stdout
    import json

    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["cost"]["hours"] > 0 and plan["cost"]["gpu_hours"] == pytest.approx(8 * plan["cost"]["hours"])
    assert plan["memory"]["zero_stage"] == 1 and plan["memory"]["world_size"] == 8


def test_plan_of_a_cpu_job_shows_no_gpu_as_its_own(tmp_path):
    """A CPU job's plan: its memory estimate is host memory per worker (no 'of 80 GiB' device), and the
    GPU time estimate says it is for hardware the job does not run on."""
    from orchestrator.driver import make_plan

    plan, _ = make_plan(compose(["experiment=quickstart_pretrain"]), str(tmp_path / "p"), prepare=False)
    text = "\n".join(plan.summary_lines())
    assert "memory/GPU" not in text and "of 80 GiB" not in text
    assert "memory/worker" in text and "host memory" in text
    assert "GPU-hours if run on 2 x A100" in text, text


def test_batch_arithmetic_is_refused_before_any_data_work(tmp_path, monkeypatch):
    """The README's BERT-Base command on 4 x 8 GPUs without its micro batch: refused, with the fix, before the
    corpus is tokenised (that can take hours)."""
    import orchestrator.driver as driver

    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c.\n\nd e f.\n")
    touched = []
    monkeypatch.setattr(driver, "prepare_data", lambda job: touched.append(job) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["experiment=bert_base_pretrain", f"data.paths=[{corpus}]", "compute=gpu_4x8"]),
                  str(tmp_path / "p"), prepare=True)
    assert not touched, "no data work before the batch arithmetic is checked"
    assert "train.global_batch_size" in str(err.value)
    assert "set train.micro_batch_size_per_gpu=8 or train.global_batch_size=1024" in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["experiment=bert_base_pretrain_phase2", "data.paths=[README.md]"], "train.init_from"),
    (["experiment=bert_large_pretrain_phase2", "data.paths=[README.md]"], "train.init_from"),
    (["experiment=none", "task=distill"], "task.distill_from"),
    (["experiment=none", "data=text"], "data.paths"),
])
def test_a_value_the_chosen_group_requires_is_refused_when_absent(overrides, key):
    """A phase-2 experiment without its phase-1 weights, a distillation without its teacher: refused naming the
    key, not silently run from a random start (OmegaConf keeps an earlier default when `???` is merged over it)."""
    from orchestrator.config.schema import to_job_config

    with pytest.raises(ConfigError) as err:
        to_job_config(compose(overrides))
    assert err.value.key == key and "has no value" in str(err.value), str(err.value)


def test_plan_counts_attention_scores_where_the_kernel_keeps_them(tmp_path):
    """The activation estimate holds the s^2 score matrices exactly where attention keeps them for backward: the
    manual and math kernels (auto on a CPU under bf16) and DeBERTa's eager attention; not flash, nor auto in fp32
    or on GPUs."""
    import dataclasses

    from orchestrator.plan.job_plan import _scores_kept

    def plan(*o):
        return _plan(["launcher=local", "compute=cpu1", "train.max_steps=2", "engine.bf16=true", *o], tmp_path)

    manual, flash = plan("engine.attention=manual"), plan("engine.attention=flash")
    m, t = manual.job.model, manual.job.task
    scores = m.num_hidden_layers * (2 * 2 + 1) * m.num_attention_heads * t.max_seq_length ** 2 * manual.micro_batch_size_per_gpu
    assert manual.memory["activations_bytes"] - flash.memory["activations_bytes"] == scores

    job = manual.job
    def kept(attention, bf16=True, gpu=False, family="bert"):
        return _scores_kept(dataclasses.replace(
            job, engine=dataclasses.replace(job.engine, attention=attention, bf16=bf16),
            compute=dataclasses.replace(job.compute, use_gpu=gpu), model=dataclasses.replace(job.model, family=family)))
    assert kept("manual") and kept("math") and kept("auto") and kept("auto", bf16=None)
    assert not kept("flash") and not kept("auto", bf16=False) and not kept("auto", gpu=True)
    assert kept("flash", family="deberta_v2") and kept("math", gpu=True)
