"""Pretraining data: masking statistics and units, NSP pairs, packing, held-out split, deterministic order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import compose
from orchestrator.config.schema import to_job_config
from orchestrator.data.order import StepOrder
from orchestrator.data.pretraining import open_split, prepare_pretraining_data


def _job(*overrides):
    job = to_job_config(compose(["data.synthetic_documents=400", *overrides]))
    return job


def _open(job, split="train"):
    from transformers import BertTokenizer

    prepared = prepare_pretraining_data(job)
    tok = BertTokenizer.from_pretrained(prepared.tokenizer_dir, local_files_only=True)
    return prepared, tok, open_split(prepared.data_dir, split, job, tok)


def test_token_masking_is_15_percent_with_80_10_10():
    _, tok, rows = _open(_job())
    selected = masked = random = kept = candidates = 0
    for i in range(300):
        r = rows.row(i, epoch=3)
        lab = r["mlm_labels"]
        sel = lab != -100
        orig = np.where(sel, lab, r["input_ids"])
        special = np.isin(orig, [tok.cls_token_id, tok.sep_token_id])
        candidates += (~special).sum()
        selected += sel.sum()
        masked += (r["input_ids"][sel] == tok.mask_token_id).sum()
        kept += (r["input_ids"][sel] == lab[sel]).sum()
        random += ((r["input_ids"][sel] != lab[sel]) & (r["input_ids"][sel] != tok.mask_token_id)).sum()
        assert not sel[special].any(), "special tokens are never selected"
    assert abs(selected / candidates - 0.15) < 0.01
    assert abs(masked / selected - 0.8) < 0.03
    # a random replacement can draw the original token: kept >= 10%, random <= 10%
    assert abs(random / selected - 0.1) < 0.03 and abs(kept / selected - 0.1) < 0.03


def test_masking_is_dynamic_across_epochs_and_fixed_per_epoch():
    _, _, rows = _open(_job())
    a, b, c = rows.row(5, 0), rows.row(5, 0), rows.row(5, 1)
    assert np.array_equal(a["mlm_labels"], b["mlm_labels"])
    assert not np.array_equal(a["mlm_labels"], c["mlm_labels"])


def _words(tok, ids):
    cont = np.array([t.startswith("##") for t in tok.convert_ids_to_tokens(ids.tolist())])
    return cont


def test_whole_word_masking_masks_whole_words():
    _, tok, rows = _open(_job("task.masking=whole_word", "tokenizer.vocab_size=150"))
    partial = whole = 0
    for i in range(200):
        r = rows.row(i, 0)
        lab = r["mlm_labels"]
        orig = np.where(lab != -100, lab, r["input_ids"])
        cont = _words(tok, orig)
        sel = lab != -100
        # every continuation piece shares its selection with the piece before it (a row cut mid-word
        # may start with a continuation right after [CLS]/[SEP])
        special = np.isin(orig, [tok.cls_token_id, tok.sep_token_id])
        for p in np.flatnonzero(cont):
            if not special[p - 1] and sel[p] != sel[p - 1]:
                partial += 1
        whole += sel[cont].sum()
    assert partial == 0
    assert whole > 0, "the small vocabulary splits words, so whole-word units span several pieces"


def test_span_masking_makes_contiguous_spans():
    _, tok, rows = _open(_job("task.masking=span"))
    run_lengths = []
    sel_frac = []
    for i in range(200):
        r = rows.row(i, 0)
        sel = (r["mlm_labels"] != -100).astype(int)
        sel_frac.append(sel.mean())
        edges = np.flatnonzero(np.diff(np.concatenate([[0], sel, [0]])))
        run_lengths += list(edges[1::2] - edges[::2])
    assert np.mean(run_lengths) > 2.0, "spans are longer than single tokens on average"
    assert 0.10 < np.mean(sel_frac) < 0.16


def test_nsp_pairs_half_random_with_segment_ids():
    _, tok, rows = _open(_job("task=pretrain_nsp"))
    labels = []
    for i in range(len(rows)):
        r = rows.row(i, 0)
        labels += r["nsp_labels"].tolist()
        for c in r["cls_positions"]:
            seg = r["token_type_ids"][c:]
            seq = r["sequence_ids"][c:]
            own = seg[seq == r["sequence_ids"][c]]
            assert own[0] == 0 and own[-1] == 1, "[CLS] A [SEP] is segment 0, B [SEP] segment 1"
    assert 0.4 < np.mean(labels) < 0.6


def test_packing_rows_fit_and_reset_positions():
    job = _job()
    _, _, rows = _open(job)
    lens = []
    multi = 0
    for i in range(len(rows)):
        r = rows.row(i, 0)
        n = len(r["input_ids"])
        assert n <= job.task.max_seq_length
        lens.append(n)
        for c in r["cls_positions"]:
            assert r["position_ids"][c] == 0
        multi += len(r["cls_positions"]) > 1
    assert multi > 0 and np.mean(lens) > 0.8 * job.task.max_seq_length


def test_packed_attention_equals_separate_sequences():
    """Block-diagonal attention + position resets: a packed row computes what its samples compute alone."""
    import torch

    from orchestrator.model.build import build_pretraining_model
    from orchestrator.worker.pretrain_task import collate

    job = _job()
    prepared, tok, rows = _open(job)
    i = next(i for i in range(len(rows)) if len(rows.row(i, 0)["cls_positions"]) > 1)
    r = rows.row(i, 0)
    model = build_pretraining_model(job.model, prepared.vocab_size, tok.pad_token_id, False, 0).eval()
    packed = collate([r], tok.pad_token_id, False)
    with torch.no_grad():
        h_packed = model.hf.bert(
            input_ids=packed["input_ids"], token_type_ids=packed["token_type_ids"],
            position_ids=packed["position_ids"], attention_mask=packed["attention_mask"],
        ).last_hidden_state[0]
        bounds = list(r["cls_positions"]) + [len(r["input_ids"])]
        for a, b in zip(bounds[:-1], bounds[1:]):
            ids = torch.from_numpy(r["input_ids"][a:b])[None]
            tt = torch.from_numpy(r["token_type_ids"][a:b])[None]
            h_alone = model.hf.bert(input_ids=ids, token_type_ids=tt).last_hidden_state[0]
            torch.testing.assert_close(h_packed[a:b], h_alone, atol=1e-5, rtol=1e-4)


def test_eval_split_is_held_out_and_cache_is_reused():
    job = _job()
    p1 = prepare_pretraining_data(job)
    p2 = prepare_pretraining_data(job)
    assert p2.cached and p1.data_dir == p2.data_dir
    _, _, tr = _open(job, "train")
    _, _, ev = _open(job, "eval")
    assert len(ev) > 0
    train_texts = {tuple(tr.tokens[a:b]) for a, b in tr.samples[:, :2]}
    eval_texts = {tuple(ev.tokens[a:b]) for a, b in ev.samples[:, :2]}
    assert len(eval_texts - train_texts) > 0.5 * len(eval_texts)


@pytest.mark.parametrize("world_size,micro,accum", [(1, 8, 4), (2, 8, 2), (4, 4, 2)])
def test_step_order_covers_each_row_once_per_epoch_any_world(world_size, micro, accum):
    order = StepOrder(n_rows=100, global_batch_size=world_size * micro * accum, seed=7)
    seen = []
    for step in range(order.steps_per_epoch):
        parts = [m for r in range(world_size) for m in order.rank_micro_rows(step, r, world_size, micro, accum)]
        step_rows = np.concatenate(parts)
        assert np.array_equal(np.sort(step_rows), np.sort(order.global_rows(step)))
        seen += step_rows.tolist()
    assert len(seen) == len(set(seen)) == order.steps_per_epoch * order.global_batch_size
    # the global sample stream does not depend on how it is split across ranks
    ref = StepOrder(100, world_size * micro * accum, 7)
    assert np.array_equal(order.global_rows(3), ref.global_rows(3))


# sentences on which tokenizers 0.23's own WordPiece training gave 20 different vocabularies in 20 tries
WORDPIECE_TEXTS = ["the cat sat on the mat", "a dog ran in the park", "stocks fell sharply today",
                   "rain is expected tomorrow", "the chef cooked pasta", "a pilot flew the plane",
                   "markets rallied after the news", "snow covered the hills", "the nurse helped a patient",
                   "a farmer sold apples", "the train left the station", "clouds hid the sun"] * 3


def test_wordpiece_training_gives_the_same_vocabulary_every_time():
    from orchestrator.data.tokenizer import train_wordpiece

    vocabs = [train_wordpiece(WORDPIECE_TEXTS, 150, 1, True).get_vocab() for _ in range(8)]
    assert len(vocabs[0]) == 150 and all(v == vocabs[0] for v in vocabs[1:])
    # a one-shot iterator and a function giving fresh iterables train the same vocabulary
    assert train_wordpiece(iter(WORDPIECE_TEXTS), 150, 1, True).get_vocab() == vocabs[0]
    assert train_wordpiece(lambda: (t for t in WORDPIECE_TEXTS), 150, 1, True).get_vocab() == vocabs[0]


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_continuation_pieces_are_the_trainers_own(lowercase):
    """The "##c" pieces registered before training are exactly those the trainer makes itself: every character
    after the first of a word, as its normalizer and pre-tokenizer cut the words (accents, CJK, punctuation,
    control and zero-width characters, ligatures, tabs, ideographic spaces)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from orchestrator.data.tokenizer import _continuations

    texts = ["Ünïcödé café — naïve résumé", "東京は日本の首都です。", "emoji 🤗 test😀x", "tab\tsep\u3000ideo",
             "a\u200bb zero-width", "ﬁnance ligature", "x--y...z", "C'était l'été", "\x1cctrl\x1dchars",
             "hy-phen_under_score", "ÀÉÎ İstanbul ΣΊΣΥΦΟΣ", *WORDPIECE_TEXTS]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [w for t in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t))]
    assert _continuations(tok, texts) == ["##" + c for c in sorted({c for w in words for c in w[1:]})]


def test_planning_a_job_with_cached_tokens_does_not_load_the_tokenizer(tmp_path):
    """The driver plans a job whose vocabulary and token arrays are cached without loading the tokenizer, which
    would import transformers and torch (~4 s of every command's start); a job that needs new token arrays from a
    cached vocabulary loads it then. Fresh processes, so nothing was imported before."""
    from conftest import REPO

    script = """if True:
        import json, sys
        from orchestrator.driver import compose_config, make_plan
        plan, prep = make_plan(compose_config(["experiment=quickstart_pretrain", *sys.argv[2:]]), run_dir=sys.argv[1])
        print(json.dumps({"transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules,
                          "data_dir": prep.data_dir, "vocab": prep.vocab_size}))"""
    env = {**os.environ, "BERT_ORCH_CACHE": str(tmp_path / "cache")}

    def plan(name: str, *overrides: str) -> dict:
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / name), "data.synthetic_documents=120",
                              *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    first = plan("a")  # trains the vocabulary and builds the token arrays
    cached = plan("b")
    assert (cached["transformers"], cached["torch"]) == (False, False)
    assert cached["data_dir"] == first["data_dir"] and cached["vocab"] == first["vocab"]
    other = plan("c", "task.max_seq_length=32")  # new token arrays from the cached vocabulary
    assert other["transformers"] and other["data_dir"] != first["data_dir"] and other["vocab"] == first["vocab"]
