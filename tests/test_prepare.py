"""Corpus preparation (python -m orchestrator.prepare) and training from prepared, sharded datasets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, compose, read_jsonl
from orchestrator.errors import ConfigError, DataError

PREP_CONF = str(REPO / "conf")


def prep_compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=PREP_CONF, version_base="1.3"):
        return hcompose(config_name="prepare", overrides=list(overrides))


def run(overrides: list[str]) -> dict:
    from orchestrator.prepare import run_prepare

    return run_prepare(prep_compose(overrides), echo=lambda s: None)


def write_corpus(d: Path, n_text: int = 400, n_jsonl: int = 200, dups: int = 0, seed: int = 1) -> Path:
    from orchestrator.data.corpus import synthetic_documents

    d.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(x) for x in synthetic_documents(n_text + n_jsonl, seed)]
    with open(d / "a.txt", "w") as f:
        for t in docs[:n_text] + docs[:dups]:
            f.write(t.replace(" . ", " .\n", 2) + "\n\n")  # multi-line documents
    with open(d / "b.jsonl", "w") as f:
        for i, t in enumerate(docs[n_text:]):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
    return d


def base(src: Path, out: Path, *extra: str) -> list[str]:
    return [f"sources=[{src}]", f"output_dir={out}", "launcher=local", "tokenizer.vocab_size=600",
            "shard_bytes=40000", "max_seq_length=64", *extra]


# ------------------------------------------------------------------------------------------------ config
def test_prepare_config_refuses_unknown_key_and_wrong_type(tmp_path):
    from orchestrator.config.prepare_schema import to_prepare_config

    with pytest.raises(ConfigError, match="shard_bytez"):
        to_prepare_config(prep_compose(["sources=[x]", f"output_dir={tmp_path}", "+shard_bytez=1"]))
    with pytest.raises(ConfigError, match="min_chars"):
        to_prepare_config(prep_compose(["sources=[x]", f"output_dir={tmp_path}", "min_chars=many"]))
    with pytest.raises(ConfigError, match="on_invalid_utf8"):
        to_prepare_config(prep_compose(["sources=[x]", f"output_dir={tmp_path}", "on_invalid_utf8=ignore"]))
    cfg = to_prepare_config(prep_compose(["sources=[x]", f"output_dir={tmp_path}", "launcher=local"]))
    assert cfg.launcher.name == "local" and cfg.num_workers == 2


# ---------------------------------------------------------------------------------------- prepare + stats
def test_prepare_writes_shards_manifest_and_stats_with_dedup(tmp_path):
    src = write_corpus(tmp_path / "src", dups=25)
    st = run(base(src, tmp_path / "out"))
    out = tmp_path / "out"
    m = json.loads((out / "manifest.json").read_text())
    assert st["duplicates_dropped"] == 25 and st["documents"] == 600 and st["documents_read"] == 625
    assert st["unknown_token_rate"] < 0.01 and st["tokens"] == st["train_tokens"] + st["eval_tokens"]
    assert sum(st["row_length_histogram"]["train_rows"]) == st["train_rows"]
    assert len(m["splits"]["train"]["shards"]) >= 5, "several blocks -> several shards"
    assert m["splits"]["train"]["rows"] == sum(s["rows"] for s in m["splits"]["train"]["shards"])
    assert json.loads((out / "stats.json").read_text())["timing"]["blocks_skipped"] == 0
    # every shard's checksum and the sentence / document boundaries of the token dataset
    import hashlib

    import pyarrow as pa

    for sh in m["splits"]["train"]["shards"]:
        assert hashlib.sha256((out / sh["rows_file"]).read_bytes()).hexdigest() == sh["rows_sha256"]
        docs = pa.ipc.open_file(pa.memory_map(str(out / sh["docs_file"]))).read_all()
        assert docs.num_rows == sh["documents"]
        assert sum(len(x) for x in docs.column("sentence_lengths").to_pylist()) == sh["sentences"]
    # a re-run skips every block and leaves the manifest byte-identical
    before = (out / "manifest.json").read_bytes()
    st2 = run(base(src, tmp_path / "out"))
    assert st2["timing"]["blocks_skipped"] == st2["timing"]["blocks"]
    assert (out / "manifest.json").read_bytes() == before


def test_pass_2_tokenises_pass_1s_record_of_the_text_or_reads_the_source_again_alike(tmp_path, monkeypatch):
    """Pass 1 keeps each block's normalised documents, so pass 2 (and the vocabulary's sample) reads no source
    file again; the record is removed once its block's shards are written. Without the record
    (keep_normalised_text=false) pass 2 reads the sources again: the same manifest."""
    from orchestrator.data.prepare_sources import DocumentReader

    src = write_corpus(tmp_path / "src", dups=25)
    reads = []
    real_iter = DocumentReader.__iter__
    monkeypatch.setattr(DocumentReader, "__iter__", lambda self: (reads.append(self.b.index), real_iter(self))[1])
    run(base(src, tmp_path / "record"))
    n_blocks = len(json.loads((tmp_path / "record" / "work" / "plan.json").read_text())["blocks"])
    assert sorted(reads) == list(range(n_blocks)), "each block read once, by pass 1"
    assert not list((tmp_path / "record" / "work" / "pass1").glob("*.txt"))
    reads.clear()
    run(base(src, tmp_path / "source", "keep_normalised_text=false"))
    assert len(reads) > 2 * n_blocks, "pass 1, the vocabulary's sample and pass 2 each read the source"
    assert (tmp_path / "source" / "manifest.json").read_bytes() == (tmp_path / "record" / "manifest.json").read_bytes()


def test_a_pass_1_record_of_another_size_is_passed_over_and_one_of_another_count_refused(tmp_path):
    """Pass 2 uses a block's record only when it has the size pass 1 wrote (else it reads the source: the same
    documents); a record of that size holding another number of documents is refused naming the file."""
    from orchestrator.config.prepare_schema import to_prepare_config
    from orchestrator.data.prepare_job import DOC_SEP, SENT_SEP, _load_or_plan, _pass1_file, content_config, dedup, \
        kept_texts, pass1_block

    src = write_corpus(tmp_path / "src", n_text=60, n_jsonl=0, dups=5)
    out = tmp_path / "out"
    out.mkdir()
    cfg = to_prepare_config({"sources": [str(src)], "output_dir": str(out), "launcher": {"name": "local"},
                             "shard_bytes": 40000})
    _, blocks = _load_or_plan(cfg, out)
    ctx = {"out": str(out), "cfg": content_config(cfg), "verify_existing": True, "keep_text": True}
    kept = {b.index: pass1_block(b, ctx)["documents_kept"] for b in blocks}
    assert dedup(blocks, out, True, 10**6, kept) == 5
    block = blocks[-1]  # the duplicates are at the end: some of its documents are dropped
    record = _pass1_file(out, block.index, ".txt")
    text = record.read_text(encoding="utf-8")
    from_record = list(kept_texts(block, ctx))
    assert 1 < len(from_record) < text.count(DOC_SEP) + 1
    record.unlink()
    assert list(kept_texts(block, ctx)) == from_record, "the source gives the same documents"
    record.write_text(text[:-1], encoding="utf-8")
    assert list(kept_texts(block, ctx)) == from_record, "a record cut short is passed over"
    record.write_text(text.replace(DOC_SEP, SENT_SEP, 1), encoding="utf-8")  # same size, one document fewer
    with pytest.raises(DataError, match="pass 1 hashed"):
        list(kept_texts(block, ctx))


def test_each_pass_prints_a_line_per_block_with_an_eta_and_a_finished_run_none(tmp_path):
    import re

    from orchestrator.prepare import run_prepare

    src = write_corpus(tmp_path / "src", n_text=150, n_jsonl=50)
    lines: list[str] = []
    run_prepare(prep_compose(base(src, tmp_path / "out")), echo=lines.append)
    n = len(json.loads((tmp_path / "out" / "work" / "plan.json").read_text())["blocks"])
    for what in ("block", "shard"):
        shown = [x for x in lines if x.startswith(f"  {what} ")]
        assert len(shown) == n > 2, lines
        assert all(re.fullmatch(rf"  {what} +\d+ (read|written) \(\d+/{n}, eta \d+:\d\d\)", x) for x in shown), shown
        assert shown[-1].endswith(f"({n}/{n}, eta 0:00)")
    lines.clear()
    run_prepare(prep_compose(base(src, tmp_path / "out")), echo=lines.append)
    assert not [x for x in lines if x.startswith(("  block ", "  shard "))], "nothing to do, nothing printed"


def test_other_settings_on_a_finished_output_dir_are_refused(tmp_path):
    src = write_corpus(tmp_path / "src", n_text=100, n_jsonl=0)
    run(base(src, tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"output_dir.*max_seq_length"):
        run(base(src, tmp_path / "out", "max_seq_length=32"))


def test_parquet_and_file_url_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.corpus import synthetic_documents

    docs = [" ".join(x) for x in synthetic_documents(300, 5)]
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=50)
    st = run(base(f"file://{tmp_path}/c.parquet", tmp_path / "out", "text_field=body"))
    assert st["documents"] == 300
    with pytest.raises(DataError, match="no column 'text'"):
        run(base(tmp_path / "c.parquet", tmp_path / "out2"))


# ------------------------------------------------------------------------------------------- bad inputs
def test_invalid_utf8_is_refused_with_line_and_byte_or_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = "the cat sleeps in the basket . the dog barks at night .\n"
    lines = [good] * 3000 + [b"the \xff\xfe owl hoots .\n"] + [good] * 10  # far past the first block
    with open(src / "bad.txt", "wb") as f:
        offset = 0
        for i, ln in enumerate(lines):
            raw = ln if isinstance(ln, bytes) else ln.encode()
            if isinstance(ln, bytes):
                bad_line, bad_byte = i + 1, offset + 4
            f.write(raw + (b"\n" if i % 5 == 4 else b""))  # blank line every 5 lines: documents
            offset += len(raw) + (1 if i % 5 == 4 else 0)
    with pytest.raises(DataError) as exc:
        run(base(src, tmp_path / "out"))
    text = str(exc.value)
    # line numbers count the blank separator lines as well
    n_blank_before = (bad_line - 1) // 5
    assert f"bad.txt:{bad_line + n_blank_before}:" in text and f"byte {bad_byte}" in text, text
    st = run(base(src, tmp_path / "out2", "on_invalid_utf8=skip"))
    assert st["invalid_utf8_lines_skipped"] == 1
    ex = st["skipped_examples"][0]
    assert ex["line"] == bad_line + n_blank_before and ex["byte"] == bad_byte


def test_jsonl_line_without_text_field_names_the_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = [json.dumps({"text": "a sentence about a cat and a dog . another one ."})] * 5
    rows.insert(3, json.dumps({"body": "no text here"}))
    (src / "x.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:4: JSON line has no text field 'text'"):
        run(base(src, tmp_path / "out", "dedup=false"))
    st = run(base(src, tmp_path / "out2", "dedup=false", "on_bad_record=skip"))
    assert st["bad_records_skipped"] == 1 and st["documents"] == 5


def test_unreadable_and_missing_files_are_named(tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "src", n_text=20, n_jsonl=0)
    with pytest.raises(DataError, match="no such file"):
        run(base(tmp_path / "nope.txt", tmp_path / "out"))
    path = str(src / "a.txt")
    os.chmod(path, 0)
    real_access = os.access
    if os.geteuid() == 0:  # root reads anything: make the permission check see what a user would
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == path else real_access(p, m))
    try:
        with pytest.raises(DataError, match=r"a\.txt: file is not readable"):
            run(base(src / "a.txt", tmp_path / "out"))
    finally:
        os.chmod(path, 0o644)


def test_corpus_empty_after_filtering_is_refused(tmp_path):
    src = write_corpus(tmp_path / "src", n_text=30, n_jsonl=0)
    with pytest.raises(DataError, match=r"empty after filtering: 30 documents read.*30 shorter than min_chars"):
        run(base(src, tmp_path / "out", "min_chars=100000"))


# ---------------------------------------------------------------------------------------- kill + resume
def _vocab(src: Path, tmp_path: Path) -> list[str]:
    """A vocabulary trained once: the tokenizers WordPiece trainer breaks count ties in hash-map order, so two
    trainings may differ; within one output_dir the trained vocabulary is saved before any shard and reused."""
    run(base(src, tmp_path / "vocab"))
    return ["tokenizer.source=dir", f"tokenizer.path={tmp_path / 'vocab' / 'tokenizer'}"]


@pytest.mark.slow
def test_killed_preparation_resumes_to_the_manifest_of_an_uninterrupted_run(tmp_path):
    src = write_corpus(tmp_path / "src", n_text=600, n_jsonl=300, dups=10)
    vocab = _vocab(src, tmp_path)
    ref = tmp_path / "ref"
    run(base(src, ref, *vocab))
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "orchestrator.prepare", *base(src, out, *vocab)]
    env = {**os.environ, "BERT_ORCH_PREPARE_BLOCK_DELAY_S": "1.5"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(list((out / "work" / "blocks").glob("block_*.json"))) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = sorted((out / "work" / "blocks").glob("block_*.json"))
    n_blocks = len(json.loads((out / "work" / "plan.json").read_text())["blocks"])
    assert 2 <= len(done) < n_blocks
    finished = [out / s["rows_file"] for d in done for s in json.loads(d.read_text())["splits"].values() if s]
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(done)}/{n_blocks} blocks already done" in res.stdout, res.stdout[-2000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == mtimes, "finished shards were not rewritten"
    assert json.loads((out / "manifest.json").read_text()) == json.loads((ref / "manifest.json").read_text())


@pytest.mark.slow
def test_ray_data_preparation_with_two_workers_equals_local(ray_cluster, tmp_path, capfd):
    """Same manifest on Ray Data's actors as in one process; and Ray Data's console stays quiet: no INFO line
    per pass, no note on progress bars, no deprecation warning, no core-worker error line about actor restarts."""
    src = write_corpus(tmp_path / "src", n_text=600, n_jsonl=300, dups=10)
    vocab = _vocab(src, tmp_path)
    run(base(src, tmp_path / "local", *vocab))
    capfd.readouterr()
    st = run([*base(src, tmp_path / "ray", *vocab), "launcher=ray", "num_workers=2"])
    console = "".join(capfd.readouterr())
    for noise in ("streaming_executor", "Progress bars disabled", "deprecated", "core_worker", "UserWarning"):
        assert noise not in console, console[-3000:]
    assert st["timing"]["launcher"] == "ray"
    a = json.loads((tmp_path / "local" / "manifest.json").read_text())
    b = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert a == b, "shards do not depend on the executor or the number of workers"


# -------------------------------------------------------------------------------------- order and reads
@pytest.mark.parametrize("world_size,micro,accum", [(1, 8, 1), (2, 4, 2), (4, 2, 2), (8, 1, 2)])
def test_two_level_order_covers_every_row_once_per_epoch(world_size, micro, accum):
    from orchestrator.data.sharded import ShardedStepOrder

    shard_rows = np.asarray([37, 50, 12, 64, 1, 29, 44, 80, 16])
    g = world_size * micro * accum
    order = ShardedStepOrder(shard_rows, g, seed=3, window_shards=3)
    for epoch in (0, 1):
        seen = []
        for step in range(epoch * order.steps_per_epoch, (epoch + 1) * order.steps_per_epoch):
            for r in range(world_size):
                for m in order.rank_micro_rows(step, r, world_size, micro, accum):
                    seen.extend(m.tolist())
        assert len(seen) == len(set(seen)) == order.steps_per_epoch * g
        assert len(set(range(shard_rows.sum())) - set(seen)) == shard_rows.sum() % g
    # the same global rows per step whatever the world size (a resize keeps the data position)
    o1 = ShardedStepOrder(shard_rows, g, seed=3, window_shards=3)
    assert all((o1.global_rows(s) == order.global_rows(s)).all() for s in range(0, 30, 7))


def _prepared(tmp_path, name="prep", **kw) -> Path:
    src = write_corpus(tmp_path / "src", n_text=kw.pop("n_text", 700), n_jsonl=kw.pop("n_jsonl", 0))
    out = tmp_path / name
    run(base(src, out, "shard_bytes=20000", "shuffle_window_shards=2", *kw.pop("extra", [])))
    return out


def _rows(out: Path, split="train", task_overrides=()):
    from transformers import BertTokenizer

    from orchestrator.config.schema import to_job_config
    from orchestrator.data.pretraining import open_split, prepare_pretraining_data

    job = to_job_config(compose(["experiment=quickstart_pretrain", "data=prepared", f"data.prepared_dir={out}",
                                 *task_overrides]))
    pd = prepare_pretraining_data(job)
    tok = BertTokenizer.from_pretrained(pd.tokenizer_dir, local_files_only=True)
    return open_split(pd.data_dir, split, job, tok), tok


def test_rows_of_a_prepared_dataset_and_a_resume_reads_only_later_shards(tmp_path):
    from orchestrator.data.sharded import ShardedRows

    out = _prepared(tmp_path)
    rows, tok = _rows(out)
    assert isinstance(rows, ShardedRows) and len(rows) > 200
    r = rows.row(3, 0)
    assert r["input_ids"][0] == tok.cls_token_id and len(r["input_ids"]) <= 64
    assert (r["mlm_labels"] != -100).any()
    assert (rows.row(3, 0)["input_ids"] == r["input_ids"]).all(), "masks are a function of (seed, epoch, row)"
    g = 16
    order = rows.step_order(g, 42)
    _, group_start = order.layout(0)
    resume = int(group_start[2] // g) + 1  # two windows of shards consumed before the resume step
    rows2, _ = _rows(out)
    order2 = rows2.step_order(g, 42)
    needed = set()
    for step in range(resume, order2.steps_per_epoch):
        for rk in range(2):
            for mb in order2.rank_micro_rows(step, rk, 2, 4, 2):
                for i in mb:
                    rows2.row(int(i), order2.epoch_of(step))
                    needed.add(order2.shard_of(int(i)))
    opened = set(rows2.shard_opens)
    assert opened == needed and all(n == 1 for n in rows2.shard_opens.values())
    perm, _ = order.layout(0)
    early = set(perm[:4].tolist())  # the first two windows (2 shards each), all consumed before `resume`
    assert early and not (early & opened), "a resume must not open shards it has already consumed"


def test_job_refuses_a_prepared_dataset_of_another_task(tmp_path):
    out = _prepared(tmp_path, n_text=60)
    with pytest.raises(ConfigError, match=r"data\.prepared_dir.*max_seq_length=64.*task\.max_seq_length=128"):
        _rows(out, task_overrides=["task.max_seq_length=128"])
    with pytest.raises(ConfigError, match=r"data\.prepared_dir.*nsp"):
        _rows(out, task_overrides=["task=pretrain_nsp", "task.max_seq_length=64"])


# ------------------------------------------------------------------------- pretraining on Ray from shards
@pytest.mark.slow
def test_ray_pretraining_from_prepared_dataset_sees_each_row_once_and_resumes_mid_epoch(ray_cluster, tmp_path):
    """2 DeepSpeed workers on Ray; the ledger shows every row of the epoch exactly once across a resume that
    runs with the shards it had already consumed removed (so it cannot have read them)."""
    from orchestrator.driver import train

    out = _prepared(tmp_path, n_text=500)
    rows, _ = _rows(out)
    g = 16
    order = rows.step_order(g, 42)
    spe = order.steps_per_epoch
    _, group_start = order.layout(0)
    resume = int(group_start[2] // g) + 1
    assert resume < spe
    common = ["experiment=quickstart_pretrain", "launcher=ray", "compute=cpu2", "model=tiny", "data=prepared",
              f"data.prepared_dir={out}", f"train.global_batch_size={g}", "train.micro_batch_size_per_gpu=4",
              "train.write_ledger=true", "train.log_every_steps=5", "train.eval_every_steps=1000",
              "data.eval_max_samples=32", "schedule.warmup_steps=2", "train.keep_last=5"]
    run_dir = tmp_path / "run"
    train(compose([*common, f"train.max_steps={resume}", f"train.checkpoint_every_steps={resume}"]),
          run_dir=str(run_dir), interactive=False)
    perm, _ = order.layout(0)
    consumed = perm[:4].tolist()  # shards of the first two windows: every row of them lies before `resume`
    positions_before = set(order.rows_at(0, np.arange(resume * g)).tolist())
    for k in consumed:
        assert set(range(order.row_start[k], order.row_start[k + 1])) <= positions_before
    m = json.loads((out / "manifest.json").read_text())
    hidden = []
    for k in consumed:
        p = out / m["splits"]["train"]["shards"][k]["rows_file"]
        p.rename(p.with_name(p.name + ".hidden"))
        hidden.append(p)
    try:
        summary = train(compose([*common, f"train.max_steps={spe}", f"train.checkpoint_every_steps={spe}"]),
                        run_dir=str(run_dir), interactive=False)
    finally:
        for p in hidden:
            p.with_name(p.name + ".hidden").rename(p)
    assert summary["world_size"] == 2 and summary["resumed_from"] and summary["steps"] == spe
    seen: list[int] = []
    per_step: dict[int, list[int]] = {}
    for rank in (0, 1):
        for rec in read_jsonl(run_dir / "ledger" / f"rank{rank}.jsonl"):
            per_step.setdefault(rec["step"], []).extend(rec["rows"])
            seen.extend(rec["rows"])
    assert sorted(per_step) == list(range(1, spe + 1))
    assert len(seen) == len(set(seen)) == spe * g, "every row of the epoch exactly once"
    assert set(seen) == set(order.rows_at(0, np.arange(spe * g)).tolist())
    assert len(set(range(len(rows))) - set(seen)) == len(rows) % g  # only the dropped partial batch is unseen
