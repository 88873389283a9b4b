"""Data stage, driver side: fine-tuning files -> validated, tokenised features in the run dir (no torch).

Every file error (missing column, unseen label, bad CoNLL line, bad SQuAD span) is raised here, before
any worker starts. Workers load the features (JSON, never pickle); they never re-read or re-tokenise the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from orchestrator.config.schema import RETRIEVAL_TASKS
from orchestrator.errors import ConfigError, DataError

FEATURES_FILE = "features.json"  # JSON, never pickle: whoever can write a run dir must not run code in its workers


@dataclass(frozen=True)
class FinetuneData:
    data_dir: str
    tokenizer_dir: str
    train_rows: int
    eval_rows: int
    train_tokens: int
    vocab_size: int
    labels: Optional[list]
    model_config_dir: Optional[str]


def _synthetic_files(task, data_dir: Path, seed: int) -> tuple[str, str]:
    from orchestrator.data import synthetic_tasks as st
    from orchestrator.data.corpus import write_category_task

    kind, n_tr, n_ev = task.synthetic, task.synthetic_train, task.synthetic_eval
    out = data_dir / "synthetic"
    if kind == "category":
        p = write_category_task(out, n_tr, n_ev, seed)
    elif kind in ("sentiment", "pair"):
        p = st.write_synthetic_classification(out, n_tr, n_ev, seed, pair=kind == "pair")
    elif kind == "ner":
        p = st.write_synthetic_ner(out, n_tr, n_ev, seed)
    elif kind == "retrieval":
        from orchestrator.data.retrieval import write_synthetic_retrieval

        p = write_synthetic_retrieval(out, n_tr, n_ev, seed)
        return str(p["train"]), str(p["eval"])
    else:
        p = st.write_synthetic_squad(out, n_tr, n_ev, seed, version_2=kind == "squad_v2")
    return str(p["train"]), str(p["dev"])


def _texts(task, split: Any) -> list[str]:
    if task.name in RETRIEVAL_TASKS:
        from orchestrator.data.retrieval_prep import texts

        return texts(split)
    if task.name == "classify":
        return [e.text for e in split] + [e.text_pair for e in split if e.text_pair]
    if task.name == "ner":
        return [" ".join(s.tokens) for s in split]
    return [e.context for e in split] + [e.question for e in split]


def _tokenizer_for(job, train_texts: list[str], cache_dir: Path):
    """init_from's tokenizer (it must match the encoder), else tokenizer.dir, else WordPiece on the train texts."""
    import hashlib

    from orchestrator.data.tokenizer import load_tokenizer_dir, open_tokenizer, train_tokenizer
    from orchestrator.io import atomic_save_dir
    from orchestrator.plan.inputs import resolve_init_dir

    if job.train.init_from:
        src = resolve_init_dir(job.train.init_from)
        cfg = json.loads((src / "config.json").read_text())
        if job.tokenizer.source == "dir":
            tok, tok_dir = load_tokenizer_dir(job.tokenizer.path, need_mask=False), Path(job.tokenizer.path).expanduser()
        elif any((src / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json", "vocab.txt")):
            tok, tok_dir = load_tokenizer_dir(str(src), need_mask=False), src
        else:
            raise ConfigError("tokenizer.path", f"'{src}' has no tokenizer: give tokenizer=dir tokenizer.path=...")
        if len(tok.get_vocab()) != cfg["vocab_size"]:
            raise ConfigError(
                "tokenizer.path",
                f"tokenizer in '{tok_dir}' has {len(tok.get_vocab())} tokens but the checkpoint '{src}'"
                f" was trained with vocab_size={cfg['vocab_size']}",
            )
        return tok, tok_dir, src
    if job.tokenizer.source == "dir":
        return load_tokenizer_dir(job.tokenizer.path, need_mask=False), Path(job.tokenizer.path).expanduser(), None
    h = hashlib.sha256()
    for t in train_texts:
        h.update(t.encode("utf-8", "replace"))
    key = hashlib.sha256(
        f"ft|{h.hexdigest()}|{job.tokenizer.vocab_size}|{job.tokenizer.min_frequency}|{job.tokenizer.lowercase}".encode()
    ).hexdigest()[:16]
    out = cache_dir / "tokenizers" / key
    if (out / "tokenizer.json").is_file():
        return open_tokenizer(out), out, None
    tok = train_tokenizer(train_texts, job.tokenizer)
    atomic_save_dir(lambda d: tok.save_pretrained(str(d)), out)
    return tok, out, None


def _read(t, train_file: str, eval_file: str, seed: int) -> tuple[Any, Any]:
    """The task's (training, evaluation) examples; every file error names the file and line."""
    from orchestrator.data import finetuning as ft

    if t.name in RETRIEVAL_TASKS:
        from orchestrator.data import retrieval_prep

        return retrieval_prep.read(t, train_file, eval_file, seed)
    if t.name == "classify":
        read = lambda p: ft.read_classification(  # noqa: E731
            p, t.text_column, t.text_pair_column, t.label_column, t.file_format, t.header
        )
    elif t.name == "ner":
        read = lambda p: ft.read_conll(p, t.token_column, t.tag_column)  # noqa: E731
    else:
        read = ft.read_squad
    return read(train_file), read(eval_file)


def _featurize(t, train, evals, tok, train_file: str, eval_file: str):
    """(train rows, eval rows, labels, eval_extra) of the task's examples."""
    from orchestrator.data import finetuning as ft

    if t.name in RETRIEVAL_TASKS:
        from orchestrator.data import retrieval_prep

        tr_rows, ev_rows, extra_eval = retrieval_prep.featurize(t, train, evals, tok)
        return tr_rows, ev_rows, None, extra_eval
    seq = t.max_seq_length
    labels: Optional[list] = None
    extra_eval: dict[str, Any] = {}
    if t.name == "classify":
        labels = ft.build_label_map(train)
        tr = ft.featurize_classification(train, tok, seq, labels, train_file)
        ev = ft.featurize_classification(evals, tok, seq, labels, eval_file)
        extra_eval = {"examples": evals}
    elif t.name == "ner":
        labels = ft.build_tag_map(train)
        unseen = sorted({tag for s in evals for tag in s.tags} - set(labels))
        if unseen:
            bad = next(s for s in evals if unseen[0] in s.tags)
            raise DataError(eval_file, f"tag '{unseen[0]}' was not seen in the training file {train_file}", line=bad.line)
        tr = ft.featurize_ner(train, tok, labels, seq, train_file)
        ev = ft.featurize_ner(evals, tok, labels, seq, eval_file)
        extra_eval = {"sentences": evals}
    else:
        tr = ft.featurize_qa_train(train, tok, seq, t.doc_stride, t.max_query_length)
        ev = ft.featurize_qa_eval(evals, tok, seq, t.doc_stride, t.max_query_length)
        extra_eval = {"examples": evals, "features": ev}
    tr_rows = ft.feature_rows(tr, [k for k in tr if k not in ("example_index",)])
    ev_keys = [k for k in ev if k in ("input_ids", "token_type_ids", "attention_mask", "labels")]
    ev_rows = ft.feature_rows(ev, ev_keys)
    if t.name == "ner":
        extra_eval.update(word_ids=ev["word_ids"], num_words=ev["num_words"])
    return tr_rows, ev_rows, labels, extra_eval


def prepare_finetune_data(job, run_dir: str) -> FinetuneData:
    t = job.task
    data_dir = Path(run_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if t.synthetic:
        train_file, eval_file = _synthetic_files(t, data_dir, job.train.seed)
    else:
        train_file, eval_file = os.path.expanduser(t.train_file), os.path.expanduser(t.eval_file)
    train, evals = _read(t, train_file, eval_file, job.train.seed)
    if t.name == "qa" and not t.version_2:  # v1.1 scoring has no "no answer": refuse before any step, not at eval
        for path, examples in ((train_file, train), (eval_file, evals)):
            bad = next((ex for ex in examples if ex.is_impossible), None)
            if bad is not None:
                raise DataError(path, f"question {bad.qid} ({bad.location}) has no answer (SQuAD 2.0) but"
                                      " task.version_2=false: set task.version_2=true")
    cache_dir = Path(os.path.expanduser(job.data.cache_dir)).resolve()
    tok, tok_dir, model_src = _tokenizer_for(job, _texts(t, train), cache_dir)

    tr_rows, ev_rows, labels, extra_eval = _featurize(t, train, evals, tok, train_file, eval_file)
    if not tr_rows:
        raise DataError(train_file, "no training examples")
    if not ev_rows:
        raise DataError(eval_file, "no evaluation examples")
    payload = {"train": tr_rows, "eval": ev_rows, "eval_extra": extra_eval, "labels": labels,
               "train_file": train_file, "eval_file": eval_file}
    from orchestrator.io import write_text_atomic

    write_text_atomic(data_dir / FEATURES_FILE, json.dumps(payload, default=_encode, separators=(",", ":")))
    return FinetuneData(
        data_dir=str(data_dir),
        tokenizer_dir=str(tok_dir),
        train_rows=len(tr_rows),
        eval_rows=len(ev_rows),
        train_tokens=int(sum(_row_tokens(r) for r in tr_rows)),
        vocab_size=len(tok.get_vocab()),
        labels=labels,
        model_config_dir=str(model_src) if model_src else None,
    )


def _row_tokens(row: dict[str, Any]) -> int:
    """Tokens of one training row: a feature, a rerank group of pairs, or an embed query and its passages."""
    if "q" in row:
        return len(row["q"]) + sum(len(d) for d in row["d"])
    ids = row["input_ids"]
    return sum(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)


def _example_types() -> dict[str, type]:
    from orchestrator.data import finetuning as ft

    return {c.__name__: c for c in (ft.ClassificationExample, ft.NerSentence, ft.SquadAnswer, ft.QAExample)}


def _encode(obj: Any) -> Any:
    """JSON for what featurising yields beyond lists and numbers: the example dataclasses (tagged by type) and
    numpy values."""
    if is_dataclass(obj) and type(obj).__name__ in _example_types():
        return {"__type__": type(obj).__name__, **{f.name: getattr(obj, f.name) for f in fields(obj)}}
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"cannot store a {type(obj).__name__} in {FEATURES_FILE}")


def load_features(data_dir: str) -> dict[str, Any]:
    """The driver's featurised data; only the example types above are rebuilt (no code runs from the file)."""
    types = _example_types()

    def decode(d: dict[str, Any]) -> Any:
        name = d.get("__type__")
        if name is None:
            return d
        if name not in types:
            raise DataError(str(Path(data_dir) / FEATURES_FILE), f"unknown record type {name!r}")
        return types[name](**{k: v for k, v in d.items() if k != "__type__"})

    return json.loads((Path(data_dir) / FEATURES_FILE).read_text(), object_hook=decode)
