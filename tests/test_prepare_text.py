"""Preparation's text path, made faster without changing a token: `normalise` and `split_sentences` without
regexes, and a document encoded in one call with its sentences joined by a marker token. Each is compared with
the form it replaced, on every code point or on generated text, for WordPiece and byte-level BPE."""

from __future__ import annotations

import re
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.data.prepare_job import SENTENCE_MARK, _TokenizerCache
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
def test_a_document_encoded_whole_gives_each_sentences_own_ids(kind, tmp_path):
    tok = TOKENIZERS[kind]()
    tok.enable_truncation(6)  # a tokenizer.json may come with truncation on: preparation never truncates
    tok.save(str(tmp_path / "tokenizer.json"))
    tok.no_truncation()
    cache = _TokenizerCache()
    cache.load(str(tmp_path))
    assert cache.vocab == tok.get_vocab_size()
    assert (cache.marked is None) == (kind == "metaspace_first")

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.lists(sentence, min_size=1, max_size=6), min_size=1, max_size=5))
    def check(docs):
        for sents, enc in zip(docs, cache.encode_documents(docs)):
            alone = [tok.encode(s, add_special_tokens=False).ids for s in sents]
            if isinstance(enc, tuple):  # one joined call: cut at the markers
                assert not any("\ue000" in s for s in sents)
                ids, marks = enc
                bounds = [-1, *marks.tolist(), len(ids)]
                enc = [ids[a + 1:b].tolist() for a, b in zip(bounds, bounds[1:])]
            assert enc == alone
            assert all(i < cache.vocab for x in enc for i in x), "no id past the vocabulary"

    check()
