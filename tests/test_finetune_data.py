"""Fine-tuning data layer: readers, featurizers, collation, QA post-processing, metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.data import finetuning as ft
from orchestrator.data.finetune_metrics import classification_metrics, ner_metrics
from orchestrator.data.synthetic_tasks import (
    write_synthetic_classification,
    write_synthetic_ner,
    write_synthetic_squad,
)
from orchestrator.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SST2_DEV = SHARED_DATA / "sst2" / "dev.tsv"
WNUT_DEV = SHARED_DATA / "wnut17" / "dev.conll"


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "cls": write_synthetic_classification(root / "cls", 120, 40, seed=1),
        "pair": write_synthetic_classification(root / "pair", 80, 20, seed=2, pair=True),
        "ner": write_synthetic_ner(root / "ner", 120, 40, seed=3),
        "qa": write_synthetic_squad(root / "qa", 40, 10, seed=4),
        "qa2": write_synthetic_squad(root / "qa2", 40, 10, seed=5, version_2=True),
    }


@pytest.fixture(scope="module")
def tokenizer(synthetic):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    texts = []
    for key in ("cls", "pair", "ner"):
        texts += synthetic[key]["train"].read_text(encoding="utf-8").splitlines()
    for key in ("qa", "qa2"):
        doc = json.loads(synthetic[key]["train"].read_text(encoding="utf-8"))
        for p in doc["data"][0]["paragraphs"]:
            texts.append(p["context"])
            texts += [q["question"] for q in p["qas"]]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _raises(exc_info, path: Path, *fragments: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


# -------------------------------------------------------------------- classification
def test_read_synthetic_classification(synthetic):
    train = ft.read_classification(synthetic["cls"]["train"], "sentence")
    dev = ft.read_classification(synthetic["cls"]["dev"], "sentence")
    assert len(train) == 120 and len(dev) == 40
    assert train[0].line == 2 and train[-1].line == 121
    assert all(ex.text_pair is None and ex.text.strip() for ex in train)
    labels = ft.build_label_map(train)
    assert labels == ["0", "1"]
    ids = ft.encode_labels(dev, labels, synthetic["cls"]["dev"])
    assert ids.dtype == np.int64 and set(ids.tolist()) <= {0, 1}
    assert [labels[i] for i in ids] == [ex.label for ex in dev]
    pair = ft.read_classification(synthetic["pair"]["train"], "sentence1", "sentence2")
    assert all(ex.text_pair for ex in pair)


def test_synthetic_sentiment_label_follows_content_words(synthetic):
    from orchestrator.data import synthetic_tasks as st

    for ex in ft.read_classification(synthetic["cls"]["train"], "sentence"):
        words = ex.text.split()
        positive = any(w in st._POSITIVE for w in words)
        negative = any(w in st._NEGATIVE for w in words)
        assert positive != negative
        assert ex.label == str(int(positive != ("not" in words)))


def test_synthetic_generators_are_deterministic(tmp_path):
    a = write_synthetic_squad(tmp_path / "a", 5, 2, seed=7, version_2=True)
    b = write_synthetic_squad(tmp_path / "b", 5, 2, seed=7, version_2=True)
    c = write_synthetic_squad(tmp_path / "c", 5, 2, seed=8, version_2=True)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    n1 = write_synthetic_ner(tmp_path / "n1", 5, 2, seed=7)
    n2 = write_synthetic_ner(tmp_path / "n2", 5, 2, seed=7)
    assert n1["dev"].read_bytes() == n2["dev"].read_bytes()


def test_read_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,other,label\n"hello, ""world""",x,pos\nbye,y,neg\n', encoding="utf-8")
    exs = ft.read_classification(csv_path, "text", label_column="label")
    assert [e.text for e in exs] == ['hello, "world"', "bye"]
    assert [e.line for e in exs] == [2, 3]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"q": "a b", "p": "c", "y": 10}\n\n{"q": "d", "p": "e", "y": 2}\n', encoding="utf-8")
    exs = ft.read_classification(jl, "q", "p", label_column="y")
    assert [(e.text, e.text_pair, e.label, e.line) for e in exs] == [("a b", "c", "10", 1), ("d", "e", "2", 3)]
    assert ft.build_label_map(exs) == ["2", "10"]  # numeric, not lexicographic
    assert ft.build_label_map([ft.ClassificationExample("t", None, l, 1) for l in ["neg", "pos", "b"]]) == [
        "b", "neg", "pos"]


def test_tsv_keeps_quotes(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\n"quoted" start and a " stray\t1\n', encoding="utf-8")
    (ex,) = ft.read_classification(path, "sentence")
    assert ex.text == '"quoted" start and a " stray'


def test_classification_label_column_missing(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tpolarity\nnice film\t1\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_classification(path, "sentence", label_column="label")
    _raises(e, path, ":1:", "'label'", "sentence, polarity")


def test_classification_text_column_missing_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "a", "label": 1}\n{"text": "b", "label": 0}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_classification(path, "sentence")
    _raises(e, path, ":2:", "'sentence'", "label, text")


def test_classification_empty_split(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\n\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_classification(path, "sentence")
    _raises(e, path, "empty split")
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_classification(empty, "sentence")
    _raises(e, empty, "empty")


def test_classification_missing_file_and_bad_rows(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError) as e:
        ft.read_classification(missing, "sentence")
    _raises(e, missing, "not found")
    path = tmp_path / "rows.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nno label here\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_classification(path, "sentence")
    _raises(e, path, ":3:", "1 fields")
    path.write_text("sentence\tlabel\ngood\t1\n   \t0\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_classification(path, "sentence")
    _raises(e, path, ":3:", "empty text")


def test_classification_unseen_dev_label(tmp_path):
    train = tmp_path / "train.tsv"
    dev = tmp_path / "dev.tsv"
    train.write_text("sentence\tlabel\na\t0\nb\t1\n", encoding="utf-8")
    dev.write_text("sentence\tlabel\nc\t1\nd\t2\n", encoding="utf-8")
    labels = ft.build_label_map(ft.read_classification(train, "sentence"))
    dev_examples = ft.read_classification(dev, "sentence")
    with pytest.raises(DataError) as e:
        ft.encode_labels(dev_examples, labels, dev)
    _raises(e, dev, ":3:", "'2'")
    with pytest.raises(DataError) as e:
        ft.featurize_classification(dev_examples, None, 16, label_list=labels, path=dev)
    _raises(e, dev, ":3:")


def test_classification_malformed_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_classification(path, "sentence")
    _raises(e, path, ":2:", "malformed JSON")


def test_featurize_classification_single_and_pair(synthetic, tokenizer):
    exs = ft.read_classification(synthetic["cls"]["train"], "sentence")[:10]
    feats = ft.featurize_classification(exs, tokenizer, max_seq_length=8)
    assert len(feats["input_ids"]) == 10
    assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id for ids in feats["input_ids"])
    assert max(len(ids) for ids in feats["input_ids"]) == 8  # truncated
    assert all(set(t) == {0} for t in feats["token_type_ids"])
    assert feats["labels"].tolist() == [int(e.label) for e in exs]

    pairs = ft.read_classification(synthetic["pair"]["train"], "sentence1", "sentence2")[:6]
    feats = ft.featurize_classification(pairs, tokenizer, max_seq_length=64, label_list=["0", "1"])
    for ex, ids, types, mask in zip(pairs, feats["input_ids"], feats["token_type_ids"], feats["attention_mask"]):
        a = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        b = tokenizer(ex.text_pair, add_special_tokens=False)["input_ids"]
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        assert ids == [cls] + a + [sep] + b + [sep]
        assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        assert mask == [1] * len(ids)
    short = ft.featurize_classification(pairs, tokenizer, max_seq_length=12, label_list=["0", "1"])
    for ids, types in zip(short["input_ids"], short["token_type_ids"]):
        assert len(ids) == 12 and ids.count(tokenizer.sep_token_id) == 2 and 1 in types


# ------------------------------------------------------------------------------- NER
def test_read_conll_blank_whitespace_and_docstart(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text(
        "-DOCSTART-\tO\n\nAlice\tB-PER\nSmith\tI-PER\nruns\tO\n \t \n\nin\tO\nParis\tB-LOC\n   \nok\tI-ORG\n",
        encoding="utf-8",
    )
    sents = ft.read_conll(path)
    assert [s.tokens for s in sents] == [["Alice", "Smith", "runs"], ["in", "Paris"], ["ok"]]
    assert [s.line for s in sents] == [3, 8, 11]
    assert sents[2].tags == ["I-ORG"]  # orphan I- kept as read by default
    assert ft.read_conll(path, repair_bio=True)[2].tags == ["B-ORG"]
    assert ft.build_tag_map(sents) == ["O", "B-LOC", "I-ORG", "B-PER", "I-PER"]


def test_read_conll_multi_column_space_delimited(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n", encoding="utf-8")
    sents = ft.read_conll(path)
    assert sents[0].tokens == ["EU", "rejects"] and sents[0].tags == ["B-ORG", "O"]
    assert ft.read_conll(path, tag_column=2)[1].tags == ["B-NP"]


def test_read_conll_wrong_column_count(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("Alice\tB-PER\nruns\tO\n\nin\tO\nParis\tB-LOC\textra\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_conll(path)
    _raises(e, path, ":5:", "expected 2 columns", "found 3")


def test_read_conll_bad_tag_and_empty(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("Alice\tB-PER\nruns\tE-PER\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_conll(path)
    _raises(e, path, ":2:", "'E-PER'")
    empty = tmp_path / "empty.conll"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_conll(empty)
    _raises(e, empty, "empty split")


def test_featurize_ner_first_subword_alignment(tokenizer):
    words = ["Zorbianization", "visited", "Paris", "yesterday"]
    tags = ["B-PER", "O", "B-LOC", "O"]
    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    assert len(pieces[0]) > 1, "test needs a word split into several subwords"
    tag_map = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    tag_to_id = {t: i for i, t in enumerate(tag_map)}
    sent = ft.NerSentence(words, tags, 1, [1, 2, 3, 4])
    feats = ft.featurize_ner([sent], tokenizer, tag_to_id, max_seq_length=64)
    ids, labels, word_ids = feats["input_ids"][0], feats["labels"][0], feats["word_ids"][0]
    expected_ids = [tokenizer.cls_token_id] + [i for p in pieces for i in p] + [tokenizer.sep_token_id]
    assert ids == expected_ids
    expected_labels = [-100]
    for p, t in zip(pieces, tags):
        expected_labels += [tag_to_id[t]] + [-100] * (len(p) - 1)
    expected_labels.append(-100)
    assert labels == expected_labels
    assert word_ids[0] is None and word_ids[-1] is None and word_ids[1 : 1 + len(pieces[0])] == [0] * len(pieces[0])
    assert feats["num_words"] == [4]
    # decoding: the first subword's prediction decides; other subwords are ignored
    preds = [0] * len(ids)
    preds[1] = tag_to_id["B-PER"]
    preds[2] = tag_to_id["B-LOC"]  # continuation subword of word 0: ignored
    preds[1 + len(pieces[0]) + len(pieces[1])] = tag_to_id["B-LOC"]
    assert ft.decode_ner(preds, word_ids, tag_map, 4) == tags
    # unknown tag (not in the training map) names the file and the token's line
    with pytest.raises(DataError) as e:
        ft.featurize_ner([ft.NerSentence(["x"], ["B-MISC"], 7, [7])], tokenizer, tag_to_id, 16, path="dev.conll")
    assert str(e.value).startswith("dev.conll:7:")


def test_featurize_ner_truncation_predicts_o_and_counts(synthetic, tokenizer):
    sents = ft.read_conll(synthetic["ner"]["dev"])
    tag_map = ft.build_tag_map(ft.read_conll(synthetic["ner"]["train"]))
    feats = ft.featurize_ner(sents, tokenizer, tag_map, max_seq_length=6)
    assert all(len(ids) <= 6 for ids in feats["input_ids"])
    truncated = 0
    pred_seqs = []
    for i, sent in enumerate(sents):
        # a perfect model: predict the gold id at every labelled position
        labels = feats["labels"][i]
        preds = [l if l != -100 else 0 for l in labels]
        decoded = ft.decode_ner(preds, feats["word_ids"][i], tag_map, feats["num_words"][i])
        covered = {w for w in feats["word_ids"][i] if w is not None}
        assert len(decoded) == len(sent.tokens)
        for w, tag in enumerate(decoded):
            assert tag == (sent.tags[w] if w in covered else "O")
        truncated += len(covered) < len(sent.tokens)
        pred_seqs.append(decoded)
    assert truncated > 0
    scores = ner_metrics([s.tags for s in sents], pred_seqs)
    assert scores["recall"] < 0.9  # entities in truncated words are counted as missed
    # without truncation the same perfect predictions score 1.0
    full = ft.featurize_ner(sents, tokenizer, tag_map, max_seq_length=128)
    decoded = [ft.decode_ner([l if l != -100 else 0 for l in labels], w, tag_map, n)
               for labels, w, n in zip(full["labels"], full["word_ids"], full["num_words"])]
    assert decoded == [s.tags for s in sents]
    assert ner_metrics([s.tags for s in sents], decoded)["f1"] == 1.0


# -------------------------------------------------------------------------------- QA
def _squad_doc(context, qas):
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Irrelevant .", "qas": []},
                                                                      {"context": context, "qas": qas}]}]}


def test_read_squad_synthetic(synthetic):
    v1 = ft.read_squad(synthetic["qa"]["train"])
    assert v1 and not any(e.is_impossible for e in v1)
    for e in v1:
        a = e.answers[0]
        assert e.context[a.answer_start : a.answer_start + len(a.text)] == a.text
    v2 = ft.read_squad(synthetic["qa2"]["dev"])
    impossible = [e for e in v2 if e.is_impossible]
    assert impossible and all(not e.answers for e in impossible)
    from orchestrator.data.synthetic_tasks import _COUNTRIES

    for e in v2:  # unanswerable questions ask about a country absent from the context
        (country,) = [w for w in e.question.split() if w in _COUNTRIES]
        assert (country in e.context) != e.is_impossible
    assert v2[0].location == "data[0].paragraphs[0].qas[0]"


def test_read_squad_answer_start_mismatch(tmp_path):
    path = tmp_path / "dev.json"
    context = "The capital of Zorbia is Quentar ."
    qas = [{"id": "q-ok", "question": "?", "answers": [{"text": "Zorbia", "answer_start": 15}]},
           {"id": "q-bad", "question": "What is the capital of Zorbia ?",
            "answers": [{"text": "Quentar", "answer_start": 24}]}]
    path.write_text(json.dumps(_squad_doc(context, qas)), encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_squad(path)
    _raises(e, path, "'q-bad'", "data[0].paragraphs[1].qas[1].answers[0]", "answer_start 24")


def test_read_squad_missing_key_and_bad_json(tmp_path):
    path = tmp_path / "dev.json"
    qas = [{"id": "q1", "answers": [{"text": "A", "answer_start": 0}]}]
    path.write_text(json.dumps(_squad_doc("A b", qas)), encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_squad(path)
    _raises(e, path, "'q1'", "data[0].paragraphs[1].qas[0]", "'question'")
    path.write_text('{"data": [\n  {"paragraphs": [}\n]}', encoding="utf-8")
    with pytest.raises(DataError) as e:
        ft.read_squad(path)
    _raises(e, path, ":2:", "malformed JSON")


def _long_example(qid="q1", impossible=False):
    filler = " ".join(f"The weather in Hollin is {w} in the spring ." for w in
                      ["cold", "warm", "wet", "dry", "windy", "mild", "sunny", "grey"] * 3)
    context = filler + " The capital of Zorbia is Quentar . " + filler
    start = context.index("Quentar")
    answers = [] if impossible else [ft.SquadAnswer("Quentar", start)]
    return ft.QAExample(qid, "What is the capital of Zorbia ?", context, answers, impossible)


def test_qa_windows_answer_beyond_first_window(tokenizer):
    ex = _long_example()
    n_tokens = len(tokenizer(ex.context, add_special_tokens=False)["input_ids"])
    assert n_tokens > 200
    kw = dict(max_seq_length=64, doc_stride=16, max_query_length=16)
    train = ft.featurize_qa_train([ex], tokenizer, **kw)
    evalf = ft.featurize_qa_eval([ex], tokenizer, **kw)
    n = len(train["input_ids"])
    assert n > 3 and len(evalf["input_ids"]) == n and evalf["example_id"] == ["q1"] * n
    assert train["input_ids"] == evalf["input_ids"]
    assert all(len(ids) <= 64 for ids in train["input_ids"])
    assert train["start_positions"][0] == 0 and train["end_positions"][0] == 0
    hits = [i for i in range(n) if train["start_positions"][i] > 0]
    assert hits and hits[0] > 0
    for i in hits:
        s, e = train["start_positions"][i], train["end_positions"][i]
        offsets = evalf["offset_mapping"][i]
        assert train["token_type_ids"][i][s] == 1 and offsets[s] is not None and offsets[e] is not None
        assert ex.context[offsets[s][0] : offsets[e][1]] == "Quentar"
    # windows overlap by doc_stride context tokens; question/special tokens have no offsets
    for i in range(n - 1):
        a = [o for o in evalf["offset_mapping"][i] if o is not None]
        b = [o for o in evalf["offset_mapping"][i + 1] if o is not None]
        assert a[-16:] == b[:16]
    first = evalf["offset_mapping"][0]
    assert first[0] is None and first[1] is None  # [CLS] and the first question token
    # end to end: logits peaked at the gold positions recover the exact answer
    width = max(len(ids) for ids in evalf["input_ids"])
    start_logits = np.zeros((n, width))
    end_logits = np.zeros((n, width))
    for i in range(n):
        start_logits[i, train["start_positions"][i]] += 5
        end_logits[i, train["end_positions"][i]] += 5
    preds = ft.postprocess_qa([ex], evalf, start_logits, end_logits)
    assert preds == {"q1": "Quentar"}
    assert ft.squad_metrics(preds, [ex])["exact"] == 100.0


def test_qa_impossible_and_long_question(tokenizer):
    ex = _long_example(impossible=True)
    train = ft.featurize_qa_train([ex], tokenizer, 64, 16, 16)
    assert set(train["start_positions"]) == {0} and set(train["end_positions"]) == {0}
    long_q = ft.QAExample("q2", " ".join(["capital"] * 40), "Zorbia is big .", [ft.SquadAnswer("Zorbia", 0)])
    feats = ft.featurize_qa_train([long_q], tokenizer, 64, 16, 8)
    assert feats["token_type_ids"][0].count(0) <= 8 + 2
    assert feats["start_positions"] == [feats["token_type_ids"][0].index(1)]
    with pytest.raises(ValueError):
        ft.featurize_qa_train([ex], tokenizer, 64, 60, 16)


def test_synthetic_squad_needs_windowing(synthetic, tokenizer):
    examples = ft.read_squad(synthetic["qa"]["train"])
    train = ft.featurize_qa_train(examples, tokenizer, 96, 32, 24)
    answered_in = {}
    for idx, s in zip(train["example_index"], train["start_positions"]):
        answered_in.setdefault(idx, [])
        if s > 0:
            answered_in[idx].append(s)
    windows = [train["example_index"].count(i) for i in range(len(examples))]
    assert max(windows) >= 3
    first_window_miss = sum(1 for i in range(len(examples)) if windows[i] > 1 and
                            train["start_positions"][train["example_index"].index(i)] == 0)
    assert first_window_miss >= 5
    assert all(answered_in[i] for i in range(len(examples)))  # every answer fits some window


def _hand_features():
    # context "alpha beta gamma delta"; tokens: [CLS] q q [SEP] alpha beta gamma delta [SEP]
    ctx = "alpha beta gamma delta"
    offsets = [None, None, None, None, (0, 5), (6, 10), (11, 16), (17, 22), None]
    ex = ft.QAExample("q", "what ?", ctx, [ft.SquadAnswer("beta gamma", 6)])
    return ex, {"example_id": ["q"], "offset_mapping": [offsets]}


def test_postprocess_picks_best_valid_span():
    ex, feats = _hand_features()
    start = np.array([[0, 9, 0, 0, 1, 4, 0, 0, 0, 0, 50.0]])  # 9 on a question token, 50 on padding
    end = np.array([[0, 0, 9, 0, 3, 0, 5, 0, 0, 0, 50.0]])
    assert ft.postprocess_qa([ex], feats, start, end) == {"q": "beta gamma"}
    # beta..alpha (6 + 8) is invalid: an end before the start is never chosen
    end2 = np.array([[0, 0, 0, 0, 8, 0, 3, 0, 0]])  # alpha-alpha scores 8, beta-gamma 9
    start2 = np.array([[0, 0, 0, 0, 0, 6, 0, 0, 0]])
    assert ft.postprocess_qa([ex], feats, start2, end2) == {"q": "beta gamma"}
    # max_answer_length: alpha..delta (4 tokens) wins by score unless limited to 2
    start3 = np.array([[0, 0, 0, 0, 10, 0, 3, 0, 0]])
    end3 = np.array([[0, 0, 0, 0, 0, 0, 0, 10, 0]])
    assert ft.postprocess_qa([ex], feats, start3, end3) == {"q": "alpha beta gamma delta"}
    assert ft.postprocess_qa([ex], feats, start3, end3, max_answer_length=2) == {"q": "gamma delta"}


def test_postprocess_best_window_and_v2_null():
    ex, feats = _hand_features()
    two = {"example_id": ["q", "q"], "offset_mapping": feats["offset_mapping"] * 2}
    start = np.array([[0, 0, 0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 4, 0]], dtype=float)
    end = np.array([[0, 0, 0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 4, 0]], dtype=float)
    assert ft.postprocess_qa([ex], two, start, end) == {"q": "delta"}
    # v2: null score = min over windows of start[0] + end[0] (= 6 here); best span = 8
    start[:, 0] = [3, 5]
    end[:, 0] = [3, 5]
    assert ft.postprocess_qa([ex], two, start, end, version_2=True) == {"q": "delta"}
    start[0, 0] = end[0, 0] = 4.5  # null 9 > span 8
    assert ft.postprocess_qa([ex], two, start, end, version_2=True) == {"q": ""}
    assert ft.postprocess_qa([ex], two, start, end, version_2=True, null_score_diff_threshold=1.5) == {"q": "delta"}
    assert ft.postprocess_qa([ex], two, start, end, version_2=False) == {"q": "delta"}


def test_squad_metrics_v1_hand_values():
    def ex(qid, *golds):
        return ft.QAExample(qid, "?", "ctx", [ft.SquadAnswer(g, 0) for g in golds])

    examples = [ex("a", "The Eiffel Tower", "Eiffel tower"), ex("b", "Barack Obama"), ex("c", "a cat"),
                ex("d", "1,000 people"), ex("e", "red car", "the car")]
    preds = {"a": "eiffel  tower!", "b": "President Barack Obama", "c": "dog", "d": "1000 people", "e": "car"}
    m = ft.squad_metrics(preds, examples)
    assert m["exact"] == pytest.approx(60.0)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 1 + 1) / 5)
    assert m["total"] == 5 and "HasAns_exact" not in m
    assert ft.normalize_answer("The  Cat, an  apple!") == "cat apple"
    # a missing prediction scores 0
    m = ft.squad_metrics({"a": "Eiffel Tower"}, examples[:2])
    assert m["exact"] == 50.0 and m["f1"] == 50.0


def test_squad_metrics_v2_hand_values():
    examples = [
        ft.QAExample("a", "?", "c", [ft.SquadAnswer("Paris", 0)]),
        ft.QAExample("b", "?", "c", [], True),
        ft.QAExample("c", "?", "c", [], True),
        ft.QAExample("d", "?", "c", [ft.SquadAnswer("the big river", 0)]),
    ]
    m = ft.squad_metrics({"a": "Paris", "b": "", "c": "London", "d": "big river flows"}, examples)
    assert m["exact"] == pytest.approx(50.0) and m["f1"] == pytest.approx(70.0) and m["total"] == 4
    assert m["HasAns_exact"] == pytest.approx(50.0) and m["HasAns_f1"] == pytest.approx(90.0)
    assert m["NoAns_exact"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)
    assert m["HasAns_total"] == 2 and m["NoAns_total"] == 2


# --------------------------------------------------------------------------- metrics
def test_ner_metrics_hand_example():
    true = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "O", "O"]]
    m = ner_metrics(true, pred)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["per_type"]["PER"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_type"]["LOC"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["per_type"]["ORG"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert set(m["per_type"]) == {"PER", "LOC", "ORG"}
    with pytest.raises(ValueError):
        ner_metrics(true, [pred[0]])


def test_classification_metrics_hand_values():
    m = classification_metrics([0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["mcc"] == pytest.approx(1 / 3)
    m = classification_metrics(np.array([2, 2, 0]), np.array([2, 1, 0]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


# ------------------------------------------------------------------------- collation
def test_pad_batch_ner_and_classification():
    rows = [
        {"input_ids": [2, 7, 8, 3], "token_type_ids": [0, 0, 0, 0], "attention_mask": [1, 1, 1, 1],
         "labels": [-100, 1, -100, -100], "word_ids": [None, 0, 0, None]},
        {"input_ids": [2, 9, 3], "token_type_ids": [0, 0, 0], "attention_mask": [1, 1, 1], "labels": [-100, 4, -100],
         "word_ids": [None, 0, None]},
    ]
    b = ft.pad_batch(rows, pad_token_id=0)
    assert set(b) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert b["input_ids"].tolist() == [[2, 7, 8, 3], [2, 9, 3, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 1, -100, -100], [-100, 4, -100, -100]]
    assert b["input_ids"].dtype == np.int64
    b = ft.pad_batch(rows, pad_token_id=5, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (2, 8) and b["input_ids"][1, 3:].tolist() == [5] * 5
    cls = ft.feature_rows({"input_ids": [[2, 3], [2, 6, 3]], "token_type_ids": [[0, 0], [0, 0, 1]],
                           "attention_mask": [[1, 1], [1, 1, 1]], "labels": np.array([1, 0])})
    b = ft.pad_batch(cls, pad_token_id=0)
    assert b["labels"].tolist() == [1, 0] and b["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 1]]


def test_module_does_not_import_torch():
    code = ("import sys; import orchestrator.data.finetuning, orchestrator.data.synthetic_tasks, "
            "orchestrator.data.finetune_metrics; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------ real data
@pytest.mark.skipif(not SST2_DEV.exists(), reason=f"{SST2_DEV} not present")
def test_real_sst2_dev(tokenizer):
    exs = ft.read_classification(SST2_DEV, "sentence")
    assert len(exs) > 500
    assert ft.build_label_map(exs) == ["0", "1"]
    assert any('"' in e.text or "'" in e.text for e in exs)
    feats = ft.featurize_classification(exs[:50], tokenizer, 32)
    assert len(feats["input_ids"]) == 50 and all(len(x) <= 32 for x in feats["input_ids"])


@pytest.mark.skipif(not WNUT_DEV.exists(), reason=f"{WNUT_DEV} not present")
def test_real_wnut17_dev(tokenizer):
    sents = ft.read_conll(WNUT_DEV)
    assert len(sents) == 1009
    tags = ft.build_tag_map(sents)
    assert tags[0] == "O" and "B-person" in tags and "I-location" in tags
    assert all(t == "O" or t[:2] in ("B-", "I-") for s in sents for t in s.tags)
    feats = ft.featurize_ner(sents, tokenizer, tags, 64)
    for labels, sent in zip(feats["labels"], sents):
        assert sum(l != -100 for l in labels) <= len(sent.tokens)


# ------------------------------------------------------------------- parquet, datasets dirs, headerless files
def test_headerless_tsv_columns_are_indices_and_a_missing_one_is_named(tmp_path):
    from orchestrator.data.finetuning import read_classification

    f = tmp_path / "x.tsv"
    f.write_text("pos\tgreat film\nneg\tdull\n")
    assert [(e.text, e.label, e.line) for e in read_classification(f, "1", label_column="0", header=False)] == [
        ("great film", "pos", 1), ("dull", "neg", 2)]
    with pytest.raises(DataError, match=r"x\.tsv:1: text column '2' missing; column indices \(no header\) found: 0, 1"):
        read_classification(f, "2", label_column="0", header=False)
    f.write_text("pos\tgreat film\nneg\n")
    with pytest.raises(DataError, match=r"x\.tsv:2: row has 1 fields, the first row had 2"):
        read_classification(f, "1", label_column="0", header=False)


def test_parquet_and_datasets_dirs_name_their_missing_columns(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.finetuning import read_classification

    f = tmp_path / "x.parquet"
    pq.write_table(pa.table({"sentence": ["a b", "c d"], "y": [0, 1]}), f)
    assert [(e.text, e.label, e.line) for e in read_classification(f, "sentence", label_column="y")] == [
        ("a b", "0", 1), ("c d", "1", 2)]
    with pytest.raises(DataError, match=r"x\.parquet: label column 'label' missing; columns found: sentence, y"):
        read_classification(f, "sentence")
    d = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_parquet(str(f))}).save_to_disk(str(d))
    with pytest.raises(DataError, match=r"holds a DatasetDict \(train\): give one split's dir, e\.g\. .*/ds/train"):
        read_classification(d, "sentence", label_column="y")
    assert len(read_classification(d / "train", "sentence", label_column="y")) == 2
