"""Small synthetic fine-tuning tasks with learnable structure (deterministic per seed).

Each writer creates ``train`` and ``dev`` files in the formats the readers in
:mod:`orchestrator.data.finetuning` accept and returns ``{"train": Path, "dev": Path}``:

* :func:`write_synthetic_classification` -- ``train.tsv``/``dev.tsv``; single-sentence
  sentiment (header ``sentence\\tlabel``: label 1 iff the sentence's sentiment word is
  positive, flipped by "not") or a pair task (header ``sentence1\\tsentence2\\tlabel``:
  label 1 iff sentence2 restates sentence1's fact, 0 when one entity was swapped).
* :func:`write_synthetic_ner` -- ``train.conll``/``dev.conll`` (``token\\ttag``, IOB2,
  PER/LOC/ORG, multi-word names) from template sentences.
* :func:`write_synthetic_squad` -- ``train.json``/``dev.json`` in SQuAD v1.1 (or v2.0)
  layout: contexts of fact sentences ("The capital of Zorbia is Quentar .") and filler,
  some longer than 200 tokens with the asked fact anywhere (often beyond the first
  window); v2 adds unanswerable questions about countries absent from the context.

Vocabularies are a few hundred words so a tiny BERT learns the tasks on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# ----------------------------------------------------------------------------- words
_NOUNS = ["movie", "film", "story", "plot", "actor", "script", "ending", "music", "scene", "cast",
          "book", "show", "song", "dialogue", "camera", "director", "hero", "villain"]
_POSITIVE = ["wonderful", "brilliant", "charming", "moving", "delightful", "great", "superb", "lovely",
             "funny", "clever", "beautiful", "gripping"]
_NEGATIVE = ["boring", "awful", "dull", "terrible", "clumsy", "tedious", "bland", "messy",
             "painful", "weak", "lifeless", "dreadful"]
_NEUTRAL_ADJ = ["long", "short", "new", "old", "french", "quiet", "loud", "early", "late", "second"]
_ADVERBS = ["very", "really", "quite", "truly", "rather", "often", "mostly", "always"]
_VERBS = ["was", "is", "felt", "seemed", "looked", "sounded"]

_FIRST = ["Alice", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas",
          "Kemal", "Lena", "Marco", "Nadia", "Oskar", "Priya"]
_LAST = ["Smith", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Brandt", "Silva", "Kowalski", "Haddad"]
_CITIES = ["Paris", "Lagos", "Oslo", "Lima", "Kyoto", "Quito", "Dakar", "Porto", "Riga", "Perth",
           "New Varsa", "San Teodoro", "Port Ellis", "East Hollow"]
_ORG_HEADS = ["Acme", "Globex", "Initech", "Umbra", "Vertex", "Nimbus", "Orbital", "Halcyon", "Zenith", "Pioneer"]
_ORG_TAILS = ["Corp", "Labs", "Bank", "Institute", "Group", "Airlines", "Foundation"]
_DAYS = ["Monday", "Tuesday", "Friday", "Sunday", "yesterday", "today", "last week", "in June"]

_COUNTRIES = ["Zorbia", "Quentaria", "Vexland", "Morrowa", "Talvenia", "Brisk", "Ulmora", "Kestria",
              "Dravonia", "Pellucid", "Ostara", "Carvain", "Nemoria", "Yslandia", "Fenwick", "Glasmere",
              "Hollin", "Istmar", "Jorvik", "Lunetta"]
_PLACE_SYLL = ["que", "tar", "bel", "mon", "dra", "vis", "lor", "zen", "kal", "rin", "sol", "mar", "pen", "dor"]
_LEADER_FIRST = ["Arno", "Belka", "Cassio", "Dara", "Emrik", "Fenna", "Gorin", "Hesta", "Ilan", "Jessa"]
_LEADER_LAST = ["Varn", "Olsted", "Prax", "Quill", "Rusk", "Tamm", "Voss", "Wend", "Yarrow", "Zale"]
_COLORS = ["red", "blue", "green", "gold", "white", "black", "purple", "orange"]
_ANIMALS = ["fox", "eagle", "bear", "wolf", "owl", "lynx", "heron", "otter"]
_FILLER = [
    "The weather in {c} is often {a} in the spring .",
    "Many travelers say that {c} is {a} and calm .",
    "Farmers in {c} grow wheat , barley and apples .",
    "The roads of {c} were rebuilt after the long winter .",
    "Children in {c} learn to swim at an early age .",
    "Old songs from {c} are still sung at weddings .",
]
_FILLER_ADJ = ["cold", "warm", "wet", "dry", "windy", "mild", "sunny", "grey"]

# relation -> (fact template, question template, answer generator key)
_RELATIONS = {
    "capital": ("The capital of {c} is {x} .", "What is the capital of {c} ?", "place"),
    "river": ("The longest river in {c} is the {x} .", "What is the longest river in {c} ?", "place"),
    "leader": ("The leader of {c} is {x} .", "Who is the leader of {c} ?", "person"),
    "founded": ("{c} was founded in {x} .", "When was {c} founded ?", "year"),
    "color": ("The flag of {c} is mostly {x} .", "What color is the flag of {c} ?", "color"),
    "animal": ("The national animal of {c} is the {x} .", "What is the national animal of {c} ?", "animal"),
}


def _place(rng: random.Random) -> str:
    return "".join(rng.choice(_PLACE_SYLL) for _ in range(rng.randint(2, 3))).capitalize()


def _answer(rng: random.Random, kind: str) -> str:
    if kind == "place":
        return _place(rng)
    if kind == "person":
        return f"{rng.choice(_LEADER_FIRST)} {rng.choice(_LEADER_LAST)}"
    if kind == "year":
        return str(rng.randint(1200, 1990))
    if kind == "color":
        return rng.choice(_COLORS)
    return rng.choice(_ANIMALS)


def _splits(directory: str | Path, suffix: str) -> dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {"train": directory / f"train.{suffix}", "dev": directory / f"dev.{suffix}"}


# ------------------------------------------------------------------- classification
def _sentiment_sentence(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    word = rng.choice(_POSITIVE if positive else _NEGATIVE)
    negated = rng.random() < 0.2
    label = int(positive != negated)
    noun = rng.choice(_NOUNS)
    adv = rng.choice(_ADVERBS)
    verb = rng.choice(_VERBS)
    neg = "not " if negated else ""
    template = rng.randrange(4)
    if template == 0:
        text = f"the {noun} {verb} {neg}{adv} {word} ."
    elif template == 1:
        text = f"the {rng.choice(_NEUTRAL_ADJ)} {noun} {verb} {neg}{word} and {rng.choice(_NEUTRAL_ADJ)} ."
    elif template == 2:
        text = f"i thought the {noun} {verb} {neg}{word} , and the {rng.choice(_NOUNS)} {verb} {rng.choice(_NEUTRAL_ADJ)} ."
    else:
        text = f"{rng.choice(_FIRST).lower()} said the {noun} {verb} {neg}{adv} {word}"
    return text, label


def _pair(rng: random.Random) -> tuple[str, str, int]:
    person, city, noun = rng.choice(_FIRST), rng.choice(_CITIES), rng.choice(_NOUNS)
    s1 = f"{person} saw the {noun} in {city} ."
    label = int(rng.random() < 0.5)
    if not label:
        which = rng.randrange(3)
        if which == 0:
            person = rng.choice([p for p in _FIRST if p != person])
        elif which == 1:
            city = rng.choice([c for c in _CITIES if c != city])
        else:
            noun = rng.choice([n for n in _NOUNS if n != noun])
    s2 = rng.choice([
        f"in {city} , {person} saw the {noun} .",
        f"the {noun} was seen by {person} in {city} .",
        f"{person} watched the {noun} while in {city} .",
    ])
    return s1, s2, label


def write_synthetic_classification(
    directory: str | Path, n_train: int, n_dev: int, seed: int, pair: bool = False
) -> dict[str, Path]:
    """Write ``train.tsv`` and ``dev.tsv`` (labels 0/1, roughly balanced)."""
    rng = random.Random(seed)
    paths = _splits(directory, "tsv")
    for split, n in (("train", n_train), ("dev", n_dev)):
        with paths[split].open("w", encoding="utf-8", newline="") as out:
            out.write("sentence1\tsentence2\tlabel\n" if pair else "sentence\tlabel\n")
            for _ in range(n):
                if pair:
                    s1, s2, label = _pair(rng)
                    out.write(f"{s1}\t{s2}\t{label}\n")
                else:
                    text, label = _sentiment_sentence(rng)
                    out.write(f"{text}\t{label}\n")
    return paths


# ------------------------------------------------------------------------------ NER
def _ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
    def per():
        name = [rng.choice(_FIRST)] + ([rng.choice(_LAST)] if rng.random() < 0.6 else [])
        return [(w, ("B-PER" if i == 0 else "I-PER")) for i, w in enumerate(name)]

    def loc():
        return [(w, ("B-LOC" if i == 0 else "I-LOC")) for i, w in enumerate(rng.choice(_CITIES).split())]

    def org():
        name = [rng.choice(_ORG_HEADS)] + ([rng.choice(_ORG_TAILS)] if rng.random() < 0.7 else [])
        return [(w, ("B-ORG" if i == 0 else "I-ORG")) for i, w in enumerate(name)]

    def words(text):
        return [(w, "O") for w in text.split()]

    day = words(rng.choice(_DAYS))
    template = rng.randrange(6)
    if template == 0:
        parts = [per(), words("visited"), loc(), words("on") if day[0][0][0].isupper() else [], day, words(".")]
    elif template == 1:
        parts = [per(), words("works for"), org(), words("in"), loc(), words(".")]
    elif template == 2:
        parts = [org(), words("opened a new office in"), loc(), day, words(".")]
    elif template == 3:
        parts = [words("yesterday"), per(), words("met"), per(), words("at the"), org(), words("office .")]
    elif template == 4:
        parts = [words("the weather in"), loc(), words("was"), words(rng.choice(_FILLER_ADJ)), words(".")]
    else:
        parts = [words("according to"), org(), words(","), per(), words("will move to"), loc(), words(".")]
    return [pair for part in parts for pair in part]


def write_synthetic_ner(directory: str | Path, n_train: int, n_dev: int, seed: int) -> dict[str, Path]:
    """Write ``train.conll`` and ``dev.conll``: ``-DOCSTART- O`` header, ``token\\ttag`` lines,
    blank line after each sentence."""
    rng = random.Random(seed)
    paths = _splits(directory, "conll")
    for split, n in (("train", n_train), ("dev", n_dev)):
        with paths[split].open("w", encoding="utf-8", newline="") as out:
            out.write("-DOCSTART-\tO\n\n")
            for _ in range(n):
                for token, tag in _ner_sentence(rng):
                    out.write(f"{token}\t{tag}\n")
                out.write("\n")
    return paths


# ------------------------------------------------------------------------------- QA
def _paragraph(rng: random.Random, index: int, version_2: bool, prefix: str) -> dict:
    n_countries = rng.randint(2, 6)
    countries = rng.sample(_COUNTRIES, n_countries)
    facts = []  # (country, relation, answer)
    used_answers: set[str] = set()
    for c in countries:
        for rel in rng.sample(sorted(_RELATIONS), rng.randint(1, 4)):
            for _ in range(20):
                ans = _answer(rng, _RELATIONS[rel][2])
                if ans not in used_answers:
                    break
            used_answers.add(ans)
            facts.append((c, rel, ans))
    n_filler = rng.choice([0, 1, 2, 4, 8, 16, 24])
    sentences: list[tuple[str, tuple | None]] = [(None, f) for f in facts]
    for _ in range(n_filler):
        sentences.append((rng.choice(_FILLER).format(c=rng.choice(countries), a=rng.choice(_FILLER_ADJ)), None))
    rng.shuffle(sentences)
    context_parts: list[str] = []
    spans: dict[tuple[str, str], tuple[str, int]] = {}
    offset = 0
    for text, fact in sentences:
        if fact is not None:
            c, rel, ans = fact
            template = _RELATIONS[rel][0]
            text = template.format(c=c, x=ans)
            start = offset + template.format(c=c, x="\0").index("\0")
            spans[(c, rel)] = (ans, start)
        context_parts.append(text)
        offset += len(text) + 1
    context = " ".join(context_parts)
    qas = []
    asked = rng.sample(facts, min(len(facts), rng.randint(1, 3)))
    for q, (c, rel, _) in enumerate(asked):
        ans, start = spans[(c, rel)]
        assert context[start : start + len(ans)] == ans
        qa = {"id": f"{prefix}-{index}-{q}", "question": _RELATIONS[rel][1].format(c=c),
              "answers": [{"text": ans, "answer_start": start}]}
        if version_2:
            qa["is_impossible"] = False
        qas.append(qa)
    if version_2:
        absent = [c for c in _COUNTRIES if c not in countries]
        for q in range(rng.randint(1, 2)):
            rel = rng.choice(sorted(_RELATIONS))
            c = rng.choice(absent)
            plausible = [{"text": a, "answer_start": s} for (cc, r), (a, s) in sorted(spans.items()) if r == rel][:1]
            qas.append({"id": f"{prefix}-{index}-n{q}", "question": _RELATIONS[rel][1].format(c=c),
                        "answers": [], "is_impossible": True, "plausible_answers": plausible})
    return {"context": context, "qas": qas}


def write_synthetic_squad(
    directory: str | Path, n_train: int, n_dev: int, seed: int, version_2: bool = False
) -> dict[str, Path]:
    """Write ``train.json`` and ``dev.json`` with ``n_train``/``n_dev`` paragraphs
    (1-3 answerable questions each, plus 1-2 unanswerable ones with ``version_2``)."""
    rng = random.Random(seed)
    paths = _splits(directory, "json")
    for split, n in (("train", n_train), ("dev", n_dev)):
        paragraphs = [_paragraph(rng, i, version_2, split) for i in range(n)]
        doc = {"version": "v2.0" if version_2 else "1.1",
               "data": [{"title": f"synthetic_{split}", "paragraphs": paragraphs}]}
        with paths[split].open("w", encoding="utf-8") as out:
            json.dump(doc, out, ensure_ascii=False, indent=1)
    return paths


__all__ = ["write_synthetic_classification", "write_synthetic_ner", "write_synthetic_squad"]
