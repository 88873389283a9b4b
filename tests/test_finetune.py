"""Fine-tuning jobs end to end (local launcher, CPU): classification, NER, QA; export reload; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose, read_jsonl
from orchestrator.driver import make_plan, train
from orchestrator.errors import ConfigError, DataError

LOCAL = ["launcher=local", "compute=cpu1", "engine=torch", "model=tiny"]


def _ft(task: str, synthetic: str, *extra: str) -> list[str]:
    return [*LOCAL, f"task={task}", f"task.synthetic={synthetic}", "train.max_steps=null", "train.eval_every_steps=null",
            "train.checkpoint_every_steps=1000", "train.log_every_steps=5", *extra]


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cls") / "run"
    summary = train(compose(_ft("classify", "sentiment", "task.max_seq_length=32", "train.epochs=4",
                                "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32", "optim.lr=1e-3",
                                "task.synthetic_train=600", "task.synthetic_eval=200")),
                    run_dir=str(run_dir), interactive=False)
    return run_dir, summary


@pytest.mark.slow  # trains a real model
def test_classification_learns_and_keeps_best(classify_run):
    run_dir, summary = classify_run
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"]
    ev = summary["final_eval"]
    assert ev["eval_accuracy"] > ev["eval_majority_baseline"] + 0.25, ev
    assert {"eval_macro_f1", "eval_mcc"} <= ev.keys()
    evals = [r["eval_accuracy"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_accuracy" in r]
    assert len(evals) == 4, "evaluated every epoch"
    assert ev["eval_accuracy"] == pytest.approx(max(evals)) and summary["best_metric"] == pytest.approx(max(evals))


@pytest.mark.slow  # trains a real model
def test_classification_export_reloads_and_predicts_the_same_labels(classify_run):
    from transformers import pipeline

    run_dir, _ = classify_run
    preds = read_jsonl(run_dir / "predictions_eval.jsonl")
    assert len(preds) == 200 and {"text", "label", "prediction", "line"} <= preds[0].keys()
    clf = pipeline("text-classification", model=str(run_dir / "export"), tokenizer=str(run_dir / "export"), device="cpu")
    out = clf([p["text"] for p in preds[:50]])
    assert [o["label"] for o in out] == [p["prediction"] for p in preds[:50]]
    cfg = json.loads((run_dir / "export" / "config.json").read_text())
    assert set(cfg["label2id"]) == {"0", "1"}


@pytest.mark.slow  # trains a real model
def test_ner_learns_entities_and_export_predicts_the_same_tags(tmp_path):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from orchestrator.data.finetuning import decode_ner

    run_dir = tmp_path / "ner"
    summary = train(compose(_ft("ner", "ner", "task.max_seq_length=48", "train.epochs=6", "train.global_batch_size=16",
                                "train.micro_batch_size_per_gpu=16", "optim.lr=2e-3")), run_dir=str(run_dir),
                    interactive=False)
    ev = summary["final_eval"]
    assert ev["eval_f1"] > 0.6, ev
    recs = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], "training loss falls"
    f1s = [r["eval_f1"] for r in recs if "eval_f1" in r]
    assert len(f1s) == 6 and max(f1s) > f1s[0], f"entity F1 rises over the epochs: {f1s}"
    per_type = summary["final_eval_details"]["eval_per_type"]
    assert {"PER", "LOC", "ORG"} <= per_type.keys() and all("f1" in v for v in per_type.values())
    preds = read_jsonl(run_dir / "predictions_eval.jsonl")
    tok = AutoTokenizer.from_pretrained(str(run_dir / "export"))
    model = AutoModelForTokenClassification.from_pretrained(str(run_dir / "export")).eval()
    id2tag = {int(k): v for k, v in model.config.id2label.items()}
    for p in preds[:20]:
        enc = tok(p["tokens"], is_split_into_words=True, return_tensors="pt", truncation=True, max_length=48)
        with torch.no_grad():
            ids = model(**enc).logits[0].argmax(-1).numpy()
        assert decode_ner(ids, enc.word_ids(0), id2tag, len(p["tokens"])) == p["predictions"]


QA = ["task.max_seq_length=64", "task.doc_stride=16", "task.max_query_length=20", "train.global_batch_size=32",
      "train.micro_batch_size_per_gpu=32", "optim.lr=1e-3", "task.synthetic_eval=60"]


@pytest.mark.slow  # trains a real model
def test_qa_windows_beat_the_first_window_baseline(tmp_path):
    """Long contexts are split into windows; reading all windows beats reading only the first one."""
    run_dir = tmp_path / "squad"
    summary = train(compose(_ft("qa", "squad", *QA, "task.synthetic_train=300", "train.epochs=8")),
                    run_dir=str(run_dir), interactive=False)
    ev = summary["final_eval"]
    print("QA v1.1:", {k: round(v, 2) for k, v in ev.items()})
    assert ev["eval_windows_per_question"] > 3, "contexts are split into several windows"
    assert ev["eval_f1"] > 25, ev
    assert ev["eval_f1"] > ev["eval_first_window_f1"] + 10, ev
    assert ev["eval_exact"] > ev["eval_first_window_exact"] + 10, ev
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], "training loss falls"
    preds = read_jsonl(run_dir / "predictions_eval.jsonl")
    assert preds and {"id", "prediction", "answers"} <= preds[0].keys()
    _qa_export_predicts_the_same_spans(run_dir, preds)


def _qa_export_predicts_the_same_spans(run_dir: Path, preds: list[dict]) -> None:
    """The export reloads as a transformers QA model whose logits, post-processed the job's way, give the
    answers the job wrote."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from orchestrator.data.finetuning import featurize_qa_eval, postprocess_qa, read_squad

    t = json.loads((run_dir / "plan.json").read_text())["config"]["task"]
    dev = next(p for p in run_dir.rglob("dev.json") if p.parent.name == "synthetic")
    examples = read_squad(dev)[:15]
    tok = AutoTokenizer.from_pretrained(str(run_dir / "export"))
    model = AutoModelForQuestionAnswering.from_pretrained(str(run_dir / "export")).eval()
    feats = featurize_qa_eval(examples, tok, t["max_seq_length"], t["doc_stride"], t["max_query_length"])
    starts, ends = [], []
    with torch.no_grad():
        for i in range(len(feats["input_ids"])):
            out = model(**{k: torch.tensor([feats[k][i]]) for k in ("input_ids", "token_type_ids", "attention_mask")})
            starts.append(out.start_logits[0].numpy())
            ends.append(out.end_logits[0].numpy())
    answers = postprocess_qa(examples, feats, starts, ends, n_best_size=t["n_best_size"],
                             max_answer_length=t["max_answer_length"], version_2=t["version_2"],
                             null_score_diff_threshold=t["null_score_diff_threshold"])
    by_id = {p["id"]: p["prediction"] for p in preds}
    assert answers == {ex.qid: by_id[ex.qid] for ex in examples}


@pytest.mark.slow  # trains a real model
def test_qa_v2_handles_unanswerable_questions(tmp_path):
    run_dir = tmp_path / "squad_v2"
    summary = train(compose(_ft("qa", "squad_v2", *QA, "task.version_2=true", "task.synthetic_train=100",
                                "train.epochs=4")), run_dir=str(run_dir), interactive=False)
    ev = summary["final_eval"]
    assert {"eval_HasAns_f1", "eval_NoAns_f1", "eval_HasAns_total", "eval_NoAns_total"} <= ev.keys(), ev
    assert ev["eval_NoAns_total"] > 0 and ev["eval_HasAns_total"] > 0
    preds = read_jsonl(run_dir / "predictions_eval.jsonl")
    unanswerable = [p for p in preds if not p["answers"]]
    assert unanswerable, "v2 eval set has questions without answers"
    # an empty prediction is how v2 says "no answer"; the metric scores it against the empty gold
    assert ev["eval_NoAns_f1"] == pytest.approx(
        100 * sum(p["prediction"] == "" for p in unanswerable) / len(unanswerable))


# ------------------------------------------------------------------------------------------- bad input
def _plan(overrides, tmp_path):
    return make_plan(compose(overrides), run_dir=str(tmp_path / "run"), prepare=True)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_label_column_missing_names_file_and_column(tmp_path):
    tr = _write(tmp_path / "train.tsv", "sentence\tlabl\na b\t1\n")
    with pytest.raises(DataError) as ei:
        _plan([*LOCAL, "task=classify", f"task.train_file={tr}", f"task.eval_file={tr}"], tmp_path)
    assert str(tr) in str(ei.value) and "label" in str(ei.value)


def test_empty_split_names_file(tmp_path):
    tr = _write(tmp_path / "train.tsv", "sentence\tlabel\na b\t1\nc d\t0\n")
    ev = _write(tmp_path / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError) as ei:
        _plan([*LOCAL, "task=classify", f"task.train_file={tr}", f"task.eval_file={ev}"], tmp_path)
    assert str(ev) in str(ei.value)


def test_dev_label_unseen_in_train_names_file_and_line(tmp_path):
    tr = _write(tmp_path / "train.tsv", "sentence\tlabel\na b\t1\nc d\t0\n")
    ev = _write(tmp_path / "dev.tsv", "sentence\tlabel\na b\t1\nc d\t2\n")
    with pytest.raises(DataError) as ei:
        _plan([*LOCAL, "task=classify", f"task.train_file={tr}", f"task.eval_file={ev}"], tmp_path)
    assert f"{ev}:3" in str(ei.value) and "'2'" in str(ei.value)


def test_conll_wrong_column_count_names_line(tmp_path):
    tr = _write(tmp_path / "train.conll", "John\tB-PER\nlives\tO\n\nParis\tB-LOC\textra\n")
    with pytest.raises(DataError) as ei:
        _plan([*LOCAL, "task=ner", f"task.train_file={tr}", f"task.eval_file={tr}"], tmp_path)
    assert f"{tr}:4" in str(ei.value)


def test_squad_answer_start_mismatch_names_question(tmp_path):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "The capital is Paris .", "qas": [
        {"id": "q1", "question": "What is the capital ?", "answers": [{"text": "Paris", "answer_start": 3}]}]}]}]}
    tr = _write(tmp_path / "train.json", json.dumps(data))
    with pytest.raises(DataError) as ei:
        _plan([*LOCAL, "task=qa", "task.max_seq_length=256", f"task.train_file={tr}", f"task.eval_file={tr}"], tmp_path)
    assert str(tr) in str(ei.value) and "q1" in str(ei.value) and "answer_start" in str(ei.value)


def test_init_dir_without_weights(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as ei:
        _plan(_ft("classify", "sentiment", "train.epochs=1", f"train.init_from={d}"), tmp_path)
    assert "train.init_from" in str(ei.value) and "no weights" in str(ei.value)


def _hf_bert_dir(classify_run, d: Path, hidden: int = 64, layers: int = 1, weights: bool = True) -> Path:
    """A Hugging Face BERT directory not made by us: random weights of another shape than model=tiny,
    saved with save_pretrained, and a tokenizer (the classify run's, so the synthetic words are known)."""
    import shutil

    from transformers import BertConfig, BertForMaskedLM

    run_dir, _ = classify_run
    vocab = json.loads((run_dir / "export" / "config.json").read_text())["vocab_size"]
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(str(d))
    for f in (run_dir / "export").iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, d / f.name)
    if not weights:  # weights of something else: no BERT encoder key in the file
        from safetensors.torch import save_file
        import torch

        save_file({"other.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.slow  # trains a real model
def test_init_from_a_hugging_face_bert_dir_takes_its_shape_and_weights(classify_run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, BertForMaskedLM

    src = _hf_bert_dir(classify_run, tmp_path / "hf_bert")
    run_dir = tmp_path / "ft"
    summary = train(compose(_ft("classify", "sentiment", "task.max_seq_length=32", "train.epochs=1",
                                "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32",
                                "task.synthetic_train=32", "task.synthetic_eval=32", f"train.init_from={src}")),
                    run_dir=str(run_dir), interactive=False)
    assert summary["status"] == "completed"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["config"]["model"]["hidden_size"] == 64 and plan["config"]["model"]["num_hidden_layers"] == 1
    ft = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "export"), local_files_only=True)
    ref = BertForMaskedLM.from_pretrained(str(src), local_files_only=True)
    a, b = ft.bert.embeddings.word_embeddings.weight, ref.bert.embeddings.word_embeddings.weight
    # one warmup step moves a weight by at most ~lr; two random inits (std 0.02) differ by ~0.03
    assert a.shape == b.shape and torch.max(torch.abs(a - b)).item() < 5e-3


@pytest.mark.slow  # trains a real model
def test_init_from_a_dir_without_encoder_weights_is_refused(classify_run, tmp_path):
    src = _hf_bert_dir(classify_run, tmp_path / "not_bert", weights=False)
    with pytest.raises(ConfigError) as ei:
        train(compose(_ft("classify", "sentiment", "train.epochs=1", "task.synthetic_train=32", "task.synthetic_eval=32",
                          "train.global_batch_size=32", "train.micro_batch_size_per_gpu=32", f"train.init_from={src}")),
              run_dir=str(tmp_path / "r"), interactive=False)
    assert "train.init_from" in str(ei.value) and "lacks" in str(ei.value) and "encoder weights" in str(ei.value)


@pytest.mark.slow  # trains a real model
def test_init_checkpoint_vocabulary_mismatch_names_both(classify_run, tmp_path):
    run_dir, _ = classify_run
    tok = tmp_path / "other_tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]) + "\n")
    with pytest.raises(ConfigError) as ei:
        _plan(_ft("classify", "sentiment", "train.epochs=1", f"train.init_from={run_dir}", "tokenizer=dir",
                  f"tokenizer.path={tok}"), tmp_path)
    msg = str(ei.value)
    assert "tokenizer.path" in msg and "7 tokens" in msg and "vocab_size=" in msg and str(run_dir) in msg


# ------------------------------------------------------------------------- Hugging Face formats and tokenizers
def _bpe_tokenizer_dir(texts: list[str], out: Path) -> Path:
    """A byte-level BPE tokenizer saved as a Hugging Face dir (AutoTokenizer), with RoBERTa-style special tokens:
    not our WordPiece, not a vocab.txt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", 0), ("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    fast.save_pretrained(str(out))
    return out


@pytest.mark.slow  # trains a real model
def test_fine_tune_with_an_autotokenizer_dir_from_parquet_and_a_headerless_tsv(tmp_path):
    """A BPE AutoTokenizer dir (not our WordPiece), parquet train and eval files; the same eval split as a
    headerless tsv (label first) and as a datasets.save_to_disk dir reads to the same examples."""
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator.data.finetuning import read_classification
    from orchestrator.data.synthetic_tasks import write_synthetic_classification

    src = write_synthetic_classification(tmp_path / "src", 600, 200, seed=3)
    rows = {k: list(csv.DictReader(p.open(), delimiter="\t")) for k, p in src.items()}
    files = {}
    for split in ("train", "dev"):
        files[split] = tmp_path / f"{split}.parquet"
        pq.write_table(pa.table({"text": [r["sentence"] for r in rows[split]],
                                 "label": [int(r["label"]) for r in rows[split]]}), files[split])
    tok_dir = _bpe_tokenizer_dir([r["sentence"] for r in rows["train"]], tmp_path / "bpe")
    run_dir = tmp_path / "run"
    summary = train(compose([*LOCAL, "task=classify", f"task.train_file={files['train']}", f"task.eval_file={files['dev']}",
                             "task.text_column=text", "task.label_column=label", "tokenizer=dir", f"tokenizer.path={tok_dir}",
                             "task.max_seq_length=40", "train.max_steps=null", "train.epochs=4", "train.eval_every_steps=null",
                             "train.checkpoint_every_steps=1000", "train.global_batch_size=32",
                             "train.micro_batch_size_per_gpu=32", "optim.lr=1e-3"]), run_dir=str(run_dir), interactive=False)
    ev = summary["final_eval"]
    assert ev["eval_accuracy"] > ev["eval_majority_baseline"] + 0.2, ev
    tok = AutoTokenizer.from_pretrained(str(run_dir / "export"))
    assert tok.cls_token == "<s>" and "Bert" not in type(tok).__name__, "the BPE tokenizer is what was exported"
    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "export")).eval()
    assert model.config.vocab_size == len(tok)

    parquet = [(e.text, e.label) for e in read_classification(files["dev"], "text", label_column="label")]
    headerless = tmp_path / "dev.tsv"
    headerless.write_text("".join(f"{r['label']}\t{r['sentence']}\n" for r in rows["dev"]))
    assert [(e.text, e.label) for e in read_classification(headerless, "1", label_column="0", header=False)] == parquet
    datasets.Dataset.from_parquet(str(files["dev"])).save_to_disk(str(tmp_path / "dev_ds"))
    assert [(e.text, e.label) for e in read_classification(tmp_path / "dev_ds", "text", label_column="label")] == parquet
