"""Every command the docs show is planned: each `python -m orchestrator ...`, `bert-orch ...`,
`bert-orch-submit ...`, `ray job submit ... -- python -m orchestrator ...`, `python -m orchestrator.prepare ...`
and `sbatch ... ray_job.sbatch ...` in README.md, cluster/README.md and bench/README.md, and the job
entrypoints written in cluster/ files (cluster YAML and KubeRay comments, the RayJob entrypoint, the sbatch
usage line). Placeholders (corpora, fine-tuning files, checkpoints, run dirs on /shared) are replaced by small
local ones made here; sweeps (`-m`) are expanded and every member is planned. A documented command that does
not plan is a failing test."""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO, compose

DOCS = ["README.md", "cluster/README.md", "bench/README.md"]
# files whose comments (or entrypoint) hold a job command
CLUSTER_FILES = ["cluster/ray-aws-p4d.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
                 "cluster/slurm/ray_job.sbatch"]


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    kind: str  # train | sweep | submit | submit_control | prepare | doctor | sbatch
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.kind} {' '.join(self.args)}"


def _lines_of_code(path: Path) -> list[tuple[int, str]]:
    """Shell lines of a doc's ```bash blocks (continuations joined), or of a cluster file's comments."""
    text = path.read_text()
    out: list[tuple[int, str]] = []
    if path.suffix == ".md":
        for m in re.finditer(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
            first = text[: m.start(1)].count("\n") + 1
            out += _join(first, m.group(1).splitlines())
    else:
        comment = [ln[1:] if ln.startswith("#") else "" for ln in text.splitlines()]
        out += _join(1, comment)
        if path.name == "rayjob.yaml":
            entry = yaml.safe_load(text)["spec"]["entrypoint"]
            line = next(i for i, ln in enumerate(text.splitlines(), 1) if "entrypoint:" in ln)
            out.append((line, entry))
    return out


def _join(first: int, lines: list[str]) -> list[tuple[int, str]]:
    out, buf, start = [], "", first
    for i, ln in enumerate(lines, first):
        if not buf:
            start = i
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        out.append((start, (buf + ln).strip()))
        buf = ""
    return [(n, s) for n, s in out if s]


def _classify(where: str, line: str) -> list[Command]:
    cmds = []
    for segment in re.split(r"\s&&\s", line):
        try:
            argv = shlex.split(segment, comments=True)
        except ValueError:
            continue
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value prefixes
            argv = argv[1:]
        if not argv:
            continue
        if argv[0] == "ray" and argv[1:3] == ["job", "submit"]:
            if "--" not in argv:
                continue
            argv = argv[argv.index("--") + 1:]
        name = Path(argv[0]).name
        if name in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
            module, rest = argv[2], argv[3:]
        elif name in ("bert-orch", "bert-orch-submit", "bert-orch-prepare", "bert-orch-doctor"):
            module, rest = {"bert-orch": "orchestrator", "bert-orch-submit": "orchestrator.submit",
                            "bert-orch-prepare": "orchestrator.prepare", "bert-orch-doctor": "orchestrator.doctor"}[name], argv[1:]
        elif name == "sbatch" and any(a.endswith("ray_job.sbatch") for a in argv):
            i = next(i for i, a in enumerate(argv) if a.endswith("ray_job.sbatch"))
            cmds.append(Command(where, "sbatch", tuple(argv[i + 1:])))
            continue
        else:
            continue
        if module == "orchestrator":
            if rest == ["..."]:
                continue  # `bert-orch ...`: "the same app as a console script", nothing to plan
            if rest[:1] in (["report"], ["push"], ["export"]):
                cmds.append(Command(where, rest[0], tuple(rest[1:])))
                continue
            kind = "sweep" if ("-m" in rest or "--multirun" in rest) else "train"
            cmds.append(Command(where, kind, tuple(a for a in rest if a not in ("-m", "--multirun"))))
        elif module == "orchestrator.submit":
            kind = "submit_control" if any(a in ("--logs", "--status", "--stop") for a in rest) else "submit"
            cmds.append(Command(where, kind, tuple(rest)))
        elif module == "orchestrator.prepare":
            cmds.append(Command(where, "prepare", tuple(rest)))
        elif module == "orchestrator.doctor":
            cmds.append(Command(where, "doctor", tuple(rest)))
        elif module.startswith("orchestrator"):
            raise AssertionError(f"{where}: a documented command of an unknown entry point: {segment}")
    return cmds


def documented_commands() -> list[Command]:
    cmds = []
    for rel in [*DOCS, *CLUSTER_FILES]:
        path = REPO / rel
        for line_no, line in _lines_of_code(path):
            cmds += _classify(f"{rel}:{line_no}", line)
    return cmds


COMMANDS = documented_commands()


def test_the_docs_yield_every_kind_of_command():
    """The extraction itself: nothing documented is silently skipped (a doc rewrite that hides commands from
    this test fails here)."""
    kinds = {c.kind for c in COMMANDS}
    assert {"train", "sweep", "submit", "submit_control", "prepare", "doctor", "sbatch", "report", "push",
            "export"} <= kinds, kinds
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert set(CLUSTER_FILES) <= where and {"README.md", "cluster/README.md"} <= where, where
    readme_train = [c for c in COMMANDS if c.where.startswith("README.md") and c.kind in ("train", "sweep")]
    assert len(readme_train) >= 15, [str(c) for c in readme_train]


# ----------------------------------------------------------------------------------------- placeholders
@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Small local stand-ins for every path the docs name."""
    from orchestrator.data.synthetic_tasks import (write_synthetic_classification, write_synthetic_ner,
                                                   write_synthetic_squad)

    root = tmp_path_factory.mktemp("docs")
    words = "the cat sat on a mat and then it ran to the dog who was not there at all today".split()
    corpus = root / "corpus"
    corpus.mkdir()
    import random

    rng = random.Random(0)
    (corpus / "a.txt").write_text("\n\n".join(
        " ".join(" ".join(rng.choice(words) for _ in range(10)).capitalize() + "." for _ in range(3))
        for _ in range(300)) + "\n")
    files = {
        "tsv": write_synthetic_classification(root / "cls", 200, 20, seed=1),
        "conll": write_synthetic_ner(root / "ner", 200, 20, seed=2),
        "json": write_synthetic_squad(root / "qa", 80, 5, seed=3, version_2=True),
    }
    from orchestrator.data.retrieval import write_synthetic_retrieval

    retrieval = write_synthetic_retrieval(root / "retrieval", 100, 20, seed=4)
    files["jsonl"], files["beir"] = {"train": retrieval["train"]}, {"dev": retrieval["eval"]}
    prepared = root / "prepared"
    from orchestrator.prepare import run_prepare

    run_prepare(_compose_prepare([f"sources=[{corpus}]", f"output_dir={prepared}", "launcher=local",
                                  "tokenizer.vocab_size=300", "max_seq_length=128"]), echo=lambda *a: None)
    return {"root": root, "corpus": corpus, "files": files, "prepared": prepared, "bert": _bert_dir(root / "bert")}


def _bert_dir(d: Path) -> Path:
    """A Hugging Face BERT directory made here (what `train.init_from=/models/bert-base-cased` stands for)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    d.mkdir(parents=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(d))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertForMaskedLM(cfg).save_pretrained(str(d))
    return d


def _substitute(args: tuple[str, ...], local: dict, run_dir: Path) -> list[str]:
    out = []
    for a in args:
        if a == "...":
            continue  # "and the rest of your overrides"
        key, eq, val = a.partition("=")
        k = key.lstrip("+~")
        if not eq:
            out.append(a)
        elif k == "data.paths":
            out.append(f"{key}=[{local['corpus']}]")
        elif k == "data.prepared_dir":
            out.append(f"{key}={local['prepared']}")
        elif k in ("train.init_from", "task.distill_from"):
            out.append(f"{key}={local['bert']}")
        elif k in ("task.train_file", "task.eval_file"):
            ext = "beir" if val.endswith("/") else val.rsplit(".", 1)[-1]  # a BEIR dir
            split = "train" if k == "task.train_file" else "dev"
            out.append(f"{key}={local['files'][ext][split]}")
        elif k in ("hydra.run.dir", "output_dir"):
            out.append(f"{key}={run_dir}")
        elif k == "sources":
            out.append(f"{key}=[{local['corpus']}]")
        else:
            out.append(a)
    return out


# ------------------------------------------------------------------------------------------------ plans
def _compose_prepare(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose(config_name="prepare", overrides=overrides)


def _members(overrides: list[str]) -> list[list[str]]:
    """A sweep's members as Hydra expands them (choice and range sweeps; an interval stands for its start)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    axes = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes.append([f"{key}={o.get_value_element_as_str()}"])
        elif isinstance(o.value(), IntervalSweep):
            axes.append([f"{key}={o.value().start}"])
        else:
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
    return [list(m) for m in itertools.product(*axes)]


def _plan_job(overrides: list[str], run_dir: Path) -> dict:
    from orchestrator.driver import train

    job_overrides = [o for o in overrides if not o.startswith(("hydra.", "hydra/"))]
    cfg = compose(["experiment=quickstart", *job_overrides, "plan_only=true"]
                  if not any(o.startswith("experiment=") for o in job_overrides) else [*job_overrides, "plan_only=true"])
    return train(cfg, run_dir=str(run_dir), interactive=False, passed=job_overrides)


PLANNED = [c for c in COMMANDS if c.kind != "submit_control"]


@pytest.mark.slow  # ~35 Hydra compositions and plans, with prepared local stand-ins
@pytest.mark.parametrize("cmd", PLANNED, ids=[c.where for c in PLANNED])
def test_documented_command_plans(cmd, local, tmp_path):
    args = _substitute(cmd.args, local, tmp_path / "run")
    if cmd.kind == "train":
        assert _plan_job(args, tmp_path / "run")["status"] == "planned", cmd
    elif cmd.kind == "sweep":
        members = _members(args)
        assert 1 <= len(members) <= 16, (cmd, members)
        for i, member in enumerate(members):
            assert _plan_job(member, tmp_path / f"m{i}")["status"] == "planned", (cmd, member)
    elif cmd.kind == "submit":
        from orchestrator.submit import _parser

        ns = _parser().parse_args(args)  # the helper's own options parse ...
        assert _plan_job(list(ns.overrides), tmp_path / "run")["status"] == "planned", cmd  # ... and its job plans
    elif cmd.kind == "sbatch":
        # the script runs `python -m orchestrator launcher=ray <its arguments>` (tests/test_cluster_defs.py)
        assert _plan_job(["launcher=ray", *args], tmp_path / "run")["status"] == "planned", cmd
    elif cmd.kind == "prepare":
        from orchestrator.config.prepare_schema import to_prepare_config

        to_prepare_config(_compose_prepare(args))
    elif cmd.kind == "doctor":
        from orchestrator.doctor import parse_args

        parse_args(args)
    elif cmd.kind == "push":
        from unittest import mock

        from orchestrator.push import main as push_main

        with mock.patch("orchestrator.push.push", return_value="url") as pushed:  # its arguments parse; no upload
            push_main(list(args))
        assert pushed.call_args.args[:2] == tuple(args[:2]), cmd
    elif cmd.kind == "export":
        from unittest import mock

        from orchestrator.serve.onnx_export import main as export_main

        with mock.patch("orchestrator.serve.onnx_export.export_run", return_value={"files": {}}) as exported, \
                mock.patch("orchestrator.serve.onnx_export.table", return_value=""):
            export_main(list(args))  # its arguments parse; the export itself is tests/test_onnx_export.py's
        assert exported.call_args.args[0] == args[0], cmd
    elif cmd.kind == "report":
        from orchestrator.report import write_report

        assert args and not any(a.startswith("-") for a in args), cmd
        for a in args:  # a finished run of two logged steps stands in for the documented dir
            d = tmp_path / a
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.0, "lr": 0.1}\n')
            assert write_report(d).is_file(), cmd
    else:
        raise AssertionError(cmd)


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.kind == "submit_control"],
                         ids=[c.where for c in COMMANDS if c.kind == "submit_control"])
def test_documented_job_control_commands_parse(cmd):
    from orchestrator.submit import _parser

    ns = _parser().parse_args(list(cmd.args))
    assert ns.logs or ns.status or ns.stop
