"""Preparation's text path, made faster without changing a token: `normalise` and `split_sentences` without
regexes, and a batch of documents encoded in one call with every sentence boundary a marker token. Each is compared
with the form it replaced, on every code point or on generated text, for WordPiece and byte-level BPE."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.data.prepare_job import SENT_SEP, SENTENCE_MARK, _SplitAcc, _TokenizerCache
from orchestrator.data.prepare_sources import _SENT_SPLIT, _WS, normalise, split_sentences

WORDS = ["The", "cat", "sat", "on", "mat", "Über", "naïve", "café", "東京", "x1", "don't", "U.S.", "3.14", "e-mail",
         "(see", "it)", "\"quoted\"", "emoji🙂", "ﬁne", "Straße", ".", "!", "?", "...", "?!", "Ω", "ǅ"]


def test_normalise_collapses_exactly_the_whitespace_the_regex_did():
    # str.split() and regex \s agree on every code point, so " ".join(s.split()) == _WS.sub(" ", s).strip()
    differ = [hex(i) for i in range(sys.maxunicode + 1) if chr(i).isspace() != bool(re.fullmatch(r"\s", chr(i)))]
    assert differ == []
    for text in ["  a \t b\u00a0\u2003c\n", "\u3000x\u200by  ", "", " \t "]:
        assert normalise(text) == _WS.sub(" ", text).strip()


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab .!?\t\u00a0\u2028x\x00", max_size=30), st.integers(0, 30))
def test_sentences_split_as_the_regex_split_them(raw, cut):
    line = normalise(raw)
    for text in (line, line[:cut]):  # a long line is cut at max_document_chars, maybe just after a space
        assert split_sentences(text) == [s for s in _SENT_SPLIT.split(text) if s]


def _wordpiece():
    from orchestrator.data.tokenizer import train_wordpiece

    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    return train_wordpiece(corpus, 300, 1, True).backend_tokenizer


def _bytelevel_bpe():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(12)) for i in range(200)],
                            vocab_size=400, show_progress=False)
    return bpe._tokenizer


def _metaspace_first():
    """SentencePiece-style: "▁" prepended to the first piece of the whole text only, so joining sentences would
    change the later ones' ids; such a tokenizer is encoded sentence by sentence."""
    from tokenizers import SentencePieceBPETokenizer, pre_tokenizers

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(12)) for i in range(200)],
                           vocab_size=400, show_progress=False)
    tok = sp._tokenizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    return tok


TOKENIZERS = {"wordpiece": _wordpiece, "bytelevel_bpe": _bytelevel_bpe, "metaspace_first": _metaspace_first}
sentence = st.lists(st.sampled_from(WORDS + ["  ", "\t", "[SEP]", "[UNK]", SENTENCE_MARK, "\ue000sentence", "\ue000"]),
                    min_size=0, max_size=8).map(" ".join)


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_documents_encoded_together_give_each_sentence_its_own_ids(kind, tmp_path):
    """Pass 2 encodes a batch of documents in one call, every sentence boundary a marker token; what it keeps per
    split (tokens, sentence lengths, sentences per document; empty sentences and documents dropped) is what
    encoding each sentence alone and adding document by document keeps."""
    tok = TOKENIZERS[kind]()
    tok.enable_truncation(6)  # a tokenizer.json may come with truncation on: preparation never truncates
    tok.save(str(tmp_path / "tokenizer.json"))
    tok.no_truncation()
    cache = _TokenizerCache()
    cache.load(str(tmp_path))
    assert cache.vocab == tok.get_vocab_size()
    assert (cache.marked is None) == (kind == "metaspace_first")

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.lists(sentence, min_size=1, max_size=6), st.booleans()), min_size=1, max_size=5))
    def check(docs):
        texts = [SENT_SEP.join(d) for d, _ in docs]
        alone = [[tok.encode(s, add_special_tokens=False).ids for s in d] for d, _ in docs]
        assert [cache.encode_sentences(t) for t in texts] == alone
        joined = cache.encode_joined(texts)
        if joined is None:  # encoded sentence by sentence instead
            assert kind == "metaspace_first" or any("\ue000" in t for t in texts)
            return
        toks, lens = joined
        assert lens.tolist() == [len(x) for d in alone for x in d]
        assert toks.tolist() == [i for d in alone for x in d for i in x]
        assert all(i < cache.vocab for i in toks.tolist()), "no id past the vocabulary"
        doc_of = np.repeat(np.arange(len(docs)), [len(d) for d, _ in docs])
        held_out = np.array([h for _, h in docs])
        for want in (False, True):
            batch, one_by_one = _SplitAcc(), _SplitAcc()
            batch.add_batch(toks, lens, doc_of, held_out[doc_of] == want, np.int32)
            for ids, (_, h) in zip(alone, docs):
                if h == want:
                    one_by_one.add(ids, np.int32)
            for a, b in zip(batch.arrays(np.int32), one_by_one.arrays(np.int32)):
                assert a.tolist() == b.tolist()

    check()
