"""Data stage: vocabularies — WordPiece or byte-level BPE trained on the corpus with `tokenizers` (cached), or loaded
from a directory."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional, Union

from orchestrator.io import atomic_save_dir

from orchestrator.errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _hf_tokenizer_from_vocab(vocab: dict[str, int], lowercase: bool):
    from transformers import BertTokenizer

    return BertTokenizer(vocab=vocab, do_lower_case=lowercase, strip_accents=None if lowercase else False)


# sentences to train on: a list, or a function giving a fresh iterable each call
Sentences = Union[Sequence[str], Callable[[], Iterable[str]], Iterator[str]]


def train_wordpiece(sentences: Sentences, vocab_size: int, min_frequency: int, lowercase: bool):
    """Train a BERT WordPiece vocabulary and return a transformers BertTokenizer built on it.

    `sentences` is read twice: give a list, or a function returning a fresh iterable (a one-shot iterator is
    read into a list). The same sentences always give the same vocabulary: `tokenizers` (0.23) gives the
    "##c" continuation pieces ids in hash-map order, and merges of equal count are ordered by id, so the
    vocabulary changed from one training to the next (huggingface/tokenizers#1794, fix PR #2066 open). The
    continuation pieces are registered up front, sorted, so their ids, and with them the merges, are fixed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    read = _rereadable(sentences)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS + _continuations(tok, read()),
        show_progress=False,
    )
    tok.train_from_iterator(_batched(read()), trainer=trainer)
    return _hf_tokenizer_from_vocab(tok.get_vocab(), lowercase)


BPE_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's, in RoBERTa's order


def train_bpe(sentences: Sentences, vocab_size: int, min_frequency: int, lowercase: bool):
    """Train a byte-level BPE vocabulary (RoBERTa's, GPT-2's: every byte is a token, so nothing is ever unknown)
    and return a transformers fast tokenizer with RoBERTa's special tokens and `<s> A </s></s> B </s>` pairs."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    read = _rereadable(sentences)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # every word starts with "Ġ"
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=BPE_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_batched(read()), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")),
                                                      add_prefix_space=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def train_tokenizer(sentences: Sentences, tok_cfg):
    """tokenizer.kind: wordpiece (BERT's) | bpe (RoBERTa's byte-level BPE)."""
    train = train_bpe if getattr(tok_cfg, "kind", "wordpiece") == "bpe" else train_wordpiece
    return train(sentences, tok_cfg.vocab_size, tok_cfg.min_frequency, tok_cfg.lowercase)


def _rereadable(sentences: Sentences) -> Callable[[], Iterable[str]]:
    if callable(sentences):
        return sentences
    if isinstance(sentences, Iterator):
        sentences = list(sentences)
    return lambda: sentences


def _continuations(tok, sentences: Iterable[str]) -> list[str]:
    """"##c" for every character that comes after the first in some word, as the trainer cuts words: the
    normalizer, then the pre-tokenizer (whitespace and each punctuation mark end a word).

    BertNormalizer works one character at a time (clean-up, CJK spacing, NFD + accent removal, lowercase), so
    each distinct character is normalized once and a translation table does the rest at C speed: characters
    that cut words become spaces, each word's first character is blanked, and what is left are the
    continuation characters: 0.11 s per MB, where normalize_str on the whole text alone took 0.28 s (training
    takes ~0.6 s per MB on 2 threads)."""
    table: dict[int, str] = {}
    found: set[str] = set()
    for batch in _batched(sentences):
        text = " ".join(batch)
        for c in set(text).difference(map(chr, table)):
            table[ord(c)] = "".join(" " if len(tok.pre_tokenizer.pre_tokenize_str(f"a{n}a")) != 1 else n
                                    for n in tok.normalizer.normalize_str(c))
        found.update(_WORD_START.sub(" ", text.translate(table)))
    found.discard(" ")
    return ["##" + c for c in sorted(found)]


_WORD_START = re.compile(r"(?<![^ ])[^ ]")


def _batched(sentences: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for s in sentences:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# The roles a BERT-style encoder needs of its tokenizer, whatever the tokens are called ([CLS] or <s>, ...)
ROLES = ("cls_token", "sep_token", "pad_token", "unk_token")


def open_tokenizer(path: str | os.PathLike):
    """Any Hugging Face tokenizer dir (AutoTokenizer, from its tokenizer_config.json: WordPiece, BPE, Unigram,
    ...), a dir with only a tokenizer.json (read as BERT's), or a bare BERT vocab.txt."""
    from transformers import AutoTokenizer, BertTokenizer

    p = Path(path)
    if (p / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if (p / "tokenizer.json").is_file():
        return BertTokenizer.from_pretrained(str(p), local_files_only=True)
    return BertTokenizer(vocab=_read_vocab_txt(p / "vocab.txt"))


def load_tokenizer_dir(path: str, need_mask: bool = True):
    """Load a tokenizer directory (open_tokenizer); refuse one without a vocabulary or without the special
    tokens BERT uses (CLS, SEP, PAD, UNK, and MASK for pretraining), by role."""
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        raise ConfigError("tokenizer.path", f"'{path}' is not a directory")
    if not any((p / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json", "vocab.txt")):
        raise ConfigError("tokenizer.path", f"'{path}' holds neither vocab.txt nor tokenizer.json")
    try:
        tok = open_tokenizer(p)
    except Exception as exc:  # corrupt files: say which directory
        raise ConfigError("tokenizer.path", f"cannot load a tokenizer from '{path}': {exc}") from None
    roles = ROLES + (("mask_token",) if need_mask else ())
    vocab = tok.get_vocab()
    missing = [r for r in roles if getattr(tok, r, None) is None or str(getattr(tok, r)) not in vocab]
    if missing:
        raise ConfigError("tokenizer.path", f"tokenizer in '{path}' lacks special tokens {missing}")
    return tok


def _read_vocab_txt(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            tok = line.rstrip("\n")
            if tok:
                vocab[tok] = i
    if not vocab:
        raise ConfigError("tokenizer.path", f"'{path}' is empty")
    return vocab


def tokenizer_cache_key(corpus_fingerprint: str, vocab_size: int, min_frequency: int, lowercase: bool,
                        kind: str = "wordpiece") -> str:
    raw = f"{kind}|{corpus_fingerprint}|{vocab_size}|{min_frequency}|{lowercase}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> str:
    """Content hash of a saved tokenizer: the cache key of token arrays built with it."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(tokenizer_dir)):
        if name.endswith((".json", ".txt")):
            h.update(name.encode())
            h.update(Path(tokenizer_dir, name).read_bytes())
    return h.hexdigest()[:16]


def get_tokenizer(tok_cfg, corpus, cache_dir: Path) -> tuple[Optional[object], Path]:
    """Return (tokenizer, saved dir): the configured directory (loaded, which checks its special tokens), a
    vocabulary trained now, or a cached trained one, returned unloaded (None): a job whose token arrays are
    cached never needs it, and loading it imports transformers and torch (~4 s of the driver's start)."""
    if tok_cfg.source == "dir":
        tok = load_tokenizer_dir(tok_cfg.path)
        return tok, Path(os.path.expanduser(tok_cfg.path)).resolve()
    key = tokenizer_cache_key(corpus.fingerprint(), tok_cfg.vocab_size, tok_cfg.min_frequency, tok_cfg.lowercase,
                              tok_cfg.kind)
    out = cache_dir / "tokenizers" / key
    if (out / "tokenizer.json").is_file():
        return None, out
    # the vocabulary trains on all documents, held-out ones included (as BERT's did)
    sentences = lambda: (s for doc in corpus.documents() for s in doc)  # noqa: E731 (read twice)
    tok = train_tokenizer(sentences, tok_cfg)
    atomic_save_dir(lambda d: tok.save_pretrained(str(d)), out)
    return tok, out
