"""Data stage: raw corpora as documents of sentences — the embedded synthetic grammar and raw text files."""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from orchestrator.data.prepare_sources import text_hash
from orchestrator.errors import DataError

Document = list[str]  # a document is a list of sentences

# Bump when the grammar changes: it is part of every cache key built on the synthetic corpus.
GRAMMAR_VERSION = 1

_SYLLABLES = ["ka", "lo", "mir", "ta", "ven", "so", "dra", "bel", "quin", "zor", "mu", "rae", "fen", "tho", "li"]
_ANIMALS = {  # animal -> (plural, sound, home)
    "dog": ("dogs", "barks", "kennel"),
    "cat": ("cats", "meows", "basket"),
    "cow": ("cows", "moos", "barn"),
    "owl": ("owls", "hoots", "tree"),
    "horse": ("horses", "neighs", "stable"),
    "duck": ("ducks", "quacks", "pond"),
    "lion": ("lions", "roars", "den"),
    "bee": ("bees", "buzzes", "hive"),
    "frog": ("frogs", "croaks", "marsh"),
    "sheep": ("sheep", "bleats", "field"),
}
_FOODS = {  # food -> (utensil, taste)
    "soup": ("spoon", "warm"),
    "steak": ("knife", "salty"),
    "rice": ("chopsticks", "plain"),
    "cake": ("fork", "sweet"),
    "lemon": ("knife", "sour"),
    "salad": ("fork", "fresh"),
    "noodles": ("chopsticks", "long"),
    "yogurt": ("spoon", "cold"),
}
_PLACES = {  # place -> (weather, country word)
    "the mountains": "snowy",
    "the desert": "dry",
    "the coast": "windy",
    "the city": "busy",
    "the forest": "green",
    "the island": "sunny",
    "the valley": "quiet",
    "the north": "cold",
}
_VEHICLES = ["train", "bus", "bike", "boat", "car", "plane"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black"]
_JOBS = {"baker": "bread", "farmer": "wheat", "potter": "bowls", "weaver": "cloth", "smith": "swords", "writer": "books"}


def _names(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(out)


_NAME_LIST = _names(random.Random(7), 80)


def _synthetic_document(rng: random.Random) -> Document:
    """One document about one person: entities repeat across its sentences, so context predicts them."""
    name = rng.choice(_NAME_LIST)
    friend = rng.choice(_NAME_LIST)
    place = rng.choice(list(_PLACES))
    animal = rng.choice(list(_ANIMALS))
    food = rng.choice(list(_FOODS))
    job = rng.choice(list(_JOBS))
    color = rng.choice(_COLORS)
    vehicle = rng.choice(_VEHICLES)
    plural, sound, home = _ANIMALS[animal]
    utensil, taste = _FOODS[food]

    def counting() -> str:
        start = rng.randint(0, 5)
        return f"{name} counts " + " ".join(_NUMBERS[start : start + rng.randint(3, 5)]) + " ."

    def week() -> str:
        i = rng.randint(0, 5)
        return f"after {_DAYS[i]} comes {_DAYS[i + 1]} ."

    templates = [
        lambda: f"{name} lives in {place} where it is {_PLACES[place]} .",
        lambda: f"{name} has a {color} {animal} that {sound} in the {home} .",
        lambda: f"the {animal} {sound} when {name} comes home .",
        lambda: f"{name} eats {food} with a {utensil} because the {food} is {taste} .",
        lambda: f"{name} works as a {job} and makes {_JOBS[job]} in {place} .",
        lambda: f"every {rng.choice(_DAYS)} {name} travels by {vehicle} to see {friend} .",
        lambda: f"{friend} and {name} are friends and both like {food} .",
        lambda: f"{name} has {rng.choice(_NUMBERS[1:])} {plural} and one {color} {vehicle} .",
        counting,
        week,
        lambda: f"in {place} the {plural} sleep in the {home} .",
        lambda: f"the {job} from {place} is called {name} .",
    ]
    n_sent = rng.randint(6, 14)
    return [rng.choice(templates)() for _ in range(n_sent)]


def synthetic_documents(n_documents: int, seed: int) -> Iterator[Document]:
    """The embedded corpus: a deterministic function of (n_documents, seed, GRAMMAR_VERSION)."""
    rng = random.Random(seed)
    for _ in range(n_documents):
        yield _synthetic_document(rng)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\S)")


def resolve_text_paths(paths: Sequence[str]) -> list[Path]:
    """Expand files, globs and directories (recursively, *.txt) into a sorted file list; refuse what is missing."""
    files: list[Path] = []
    for raw in paths:
        spec = os.path.expanduser(str(raw))
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(spec, "glob matches no file (data.paths)")
            files.extend(matches)
        elif os.path.isdir(spec):
            matches = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.suffix in (".txt", ".text", ".raw"))
            if not matches:
                raise DataError(spec, "directory holds no .txt file (data.paths)")
            files.extend(matches)
        elif os.path.isfile(spec):
            files.append(Path(spec))
        else:
            raise DataError(spec, "no such file or directory (data.paths)")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(str(f), "file is not readable (data.paths)")
    return files


def read_text_documents(files: Sequence[Path]) -> Iterator[Document]:
    """Documents are separated by blank lines; a line is split into sentences at . ! ? followed by space.

    Files are streamed line by line, never loaded whole. Invalid UTF-8 is refused with the line number.
    """
    for path in files:
        doc: Document = []
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise DataError(str(path), f"invalid UTF-8 at byte {exc.start} of the line", line=lineno) from None
                if not line:
                    if doc:
                        yield doc
                        doc = []
                    continue
                doc.extend(s for s in _SENT_SPLIT.split(line) if s)
        if doc:
            yield doc


@dataclass(frozen=True)
class CorpusSpec:
    """What the corpus is, in a form that hashes: the cache key of vocabularies and token arrays."""

    source: str
    files: tuple[str, ...] = ()
    synthetic_documents: int = 0
    synthetic_seed: int = 0

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.source}|{GRAMMAR_VERSION}|{self.synthetic_documents}|{self.synthetic_seed}".encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"|{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def documents(self) -> Iterator[Document]:
        if self.source == "synthetic":
            return synthetic_documents(self.synthetic_documents, self.synthetic_seed)
        return read_text_documents([Path(f) for f in self.files])

    def describe(self) -> str:
        if self.source == "synthetic":
            return f"synthetic grammar corpus ({self.synthetic_documents} documents, seed {self.synthetic_seed})"
        return ", ".join(self.files)


def corpus_spec(data_cfg) -> CorpusSpec:
    if data_cfg.source == "synthetic":
        return CorpusSpec("synthetic", (), data_cfg.synthetic_documents, data_cfg.synthetic_seed)
    files = resolve_text_paths(list(data_cfg.paths))
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(str(f), "file is empty (data.paths)")
    return CorpusSpec("text", tuple(str(f) for f in files))


def is_eval_document(doc: Document, eval_fraction: float) -> bool:
    """Held-out split by a hash of the document's text: stable whatever order files are read in."""
    if eval_fraction <= 0:
        return False
    return is_eval_hash(text_hash("\n".join(doc)), eval_fraction)


def is_eval_hash(h: int, eval_fraction: float) -> bool:
    """`is_eval_document` of the document whose 64-bit text hash is h (`prepare_sources.text_hash`)."""
    return eval_fraction > 0 and h / 2**64 < eval_fraction


# The category task's classes: words the corpus uses in category-specific contexts (a dog barks in a kennel,
# soup is eaten with a spoon, a baker makes bread, one travels by bus).
_CATEGORIES = {"animal": sorted(_ANIMALS), "food": sorted(_FOODS), "job": sorted(_JOBS), "vehicle": sorted(_VEHICLES)}
# Frames shared by every class, so the frame says nothing of the label: only the word does.
_CATEGORY_FRAMES = ["{n} and {f} like the {x} .", "the {x} is in {p} .", "{n} has one {x} .", "on {d} {n} sees the {x} ."]


def category_words(seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """Each category's words split in two halves: (words of the training split, words of the dev split)."""
    rng = random.Random(seed)
    out = {}
    for label, words in _CATEGORIES.items():
        words = list(words)
        rng.shuffle(words)
        out[label] = (words[: len(words) // 2], words[len(words) // 2 :])
    return out


def synthetic_category_examples(n: int, seed: int, split: str) -> list[tuple[str, str]]:
    """A labelled task over the grammar's world: which category (animal, food, job, vehicle) is the sentence's
    object? The dev split's words never occur in the training split. A random encoder has learnt nothing about
    them, so it is at chance on dev whatever it learns from the labels. A pretrained encoder has seen each word in
    its category's contexts, and its fine-tuned classifier carries over to the unseen words: that transfer is
    what pretraining is for."""
    halves = category_words(seed=0)  # the same word split for every seed: dev words stay unseen in training
    rng = random.Random(seed)
    labels = sorted(halves)
    out = []
    for i in range(n):
        label = labels[i % len(labels)]  # balanced
        word = rng.choice(halves[label][0 if split == "train" else 1])
        frame = rng.choice(_CATEGORY_FRAMES)
        out.append((frame.format(n=rng.choice(_NAME_LIST), f=rng.choice(_NAME_LIST), x=word,
                                 p=rng.choice(list(_PLACES)), d=rng.choice(_DAYS)), label))
    rng.shuffle(out)
    return out


def write_category_task(directory, n_train: int, n_dev: int, seed: int) -> dict[str, Path]:
    """train.tsv / dev.tsv (header sentence<TAB>label) of the category task."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, s in (("train", n_train, seed), ("dev", n_dev, seed + 1)):
        from orchestrator.io import write_text_atomic

        text = "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in synthetic_category_examples(n, s, split))
        paths[split] = write_text_atomic(d / f"{split}.tsv", text)
    return paths
