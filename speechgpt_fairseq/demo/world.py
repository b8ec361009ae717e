"""The demo's world: two dozen people and what is true of them (where they live, their pet, job, favourite colour
and instrument), the questions asked about them, and sentences that use the same words without stating any of it.

The knowledge is taught in text only (stage 2 mixes it in as text instructions); spoken questions ask about it.
Questions are split by (person, relation): the spoken questions of stage 3 cover the training pairs, and the
held-out questions ask about the others, so a held-out question is a combination never heard: its answer was
only ever read. The answer's content (the city, the pet, ...) is never in the question, so it cannot be copied
from it. The ASR/TTS sentences put people where answers and questions put them ("anna lives with ben", "what
colour does anna want for ben") but never state a fact or ask a question of the world; the answers' shapes are
spoken with every person and every value alike (answer_shapes). So stage 2's speech teaches the words, their
places and the answers' sound, but not the facts. Everything is drawn from seeded random streams.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import product

from speechgpt_fairseq.errors import InputError

VOICES = ["en", "en-us", "en+m1", "en+m3"]
RATES = [130, 150, 170, 190]  # words per minute; espeak-ng's default is 175
ASSISTANT_VOICE, ASSISTANT_RATE = "en-us", 175  # how the model is taught to speak: TTS targets, spoken answers

PEOPLE = ("anna ben clara david emma felix grace henry iris jack kate leo nick oscar paul rosa sam tina victor "
          "wendy hugo zoe laura martin").split()
CITIES = "paris rome berlin madrid tokyo cairo oslo lisbon athens warsaw".split()
PETS = "cat dog parrot rabbit horse goldfish turtle hamster".split()
JOBS = "doctor teacher baker farmer pilot nurse painter driver".split()
COLOURS = "red blue green yellow purple orange black white".split()
INSTRUMENTS = "piano guitar violin drums flute trumpet".split()
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Relation:
    """What a fact relates a person to, the question that asks for it, and how the answer says it."""

    name: str
    values: tuple[str, ...]
    question: str  # the question spoken and typed in stage 3: "where does {person} live"
    answer: str  # "{person} lives in {value}"
    paraphrases: tuple[str, ...]  # other ways to ask, in the text instructions only


RELATIONS = (
    Relation("home", tuple(CITIES), "where does {person} live", "{person} lives in {value}",
             ("which city does {person} live in", "in which city is the home of {person}")),
    Relation("pet", tuple(PETS), "what pet does {person} have", "{person} has a {value}",
             ("which animal does {person} keep at home", "what kind of pet lives with {person}")),
    Relation("job", tuple(JOBS), "what job does {person} have", "{person} is a {value}",
             ("what does {person} do for work", "what is the job of {person}")),
    Relation("colour", tuple(COLOURS), "what colour does {person} like", "{person} likes {value}",
             ("which colour is the favourite of {person}", "what is the favourite colour of {person}")),
    Relation("instrument", tuple(INSTRUMENTS), "what does {person} play", "{person} plays the {value}",
             ("which instrument does {person} play", "what instrument can {person} play")),
)
RELATION_NAMES = tuple(r.name for r in RELATIONS)
PROFILE_QUESTION = "tell me about {person}"
SAY = "say {sentence}"  # a text instruction answered in speech (stage 3's t2s format) with any sentence


@dataclass(frozen=True)
class Question:
    """A question about one person, with its one answer."""

    person: str
    relation: str
    text: str
    answer: str


@dataclass(frozen=True)
class World:
    """Every person's facts, and which split each (person, relation) question belongs to."""

    facts: dict[tuple[str, str], str]  # (person, relation name) -> value
    split: dict[tuple[str, str], str]  # (person, relation name) -> train / valid / test

    def questions(self, split: str | None = None) -> list[Question]:
        """The questions of a split (all of them for None), person by person."""
        return [Question(p, r.name, r.question.format(person=p), r.answer.format(person=p, value=self.facts[p, r.name]))
                for p, r in product(PEOPLE, RELATIONS) if split is None or self.split[p, r.name] == split]

    def knowledge(self) -> list[tuple[str, str]]:
        """The text instructions that teach the world: every fact asked in every phrasing, and each person's
        profile (all their facts in one answer)."""
        out = []
        for person in PEOPLE:
            answers = [r.answer.format(person=person, value=self.facts[person, r.name]) for r in RELATIONS]
            for r, answer in zip(RELATIONS, answers):
                out += [(q.format(person=person), answer) for q in (r.question, *r.paraphrases)]
            out.append((PROFILE_QUESTION.format(person=person), ", ".join(answers)))
        return out


def make_world(rng: random.Random, held_out: tuple[float, float] = (0.1, 0.25)) -> World:
    """Draw every fact, then hold out a share of the (person, relation) questions for valid and test. Every
    person keeps training questions, and so does every relation: held-out questions are new combinations."""
    facts = {(p, r.name): rng.choice(r.values) for p, r in product(PEOPLE, RELATIONS)}
    keys = list(facts)
    n_valid, n_test = (round(share * len(keys)) for share in held_out)
    while True:
        order = rng.sample(keys, len(keys))
        split = dict.fromkeys(keys, "train") | dict.fromkeys(order[:n_valid], "valid") \
            | dict.fromkeys(order[n_valid:n_valid + n_test], "test")
        trained = [k for k, s in split.items() if s == "train"]
        if {p for p, _ in trained} == set(PEOPLE) and \
                all(sum(r == name for _, r in trained) >= len(PEOPLE) // 2 for name in RELATION_NAMES):
            return World(facts, split)


def answer_shapes() -> list[str]:
    """Every relation's answer with every person and every value ("anna lives in paris", "anna lives in rome", ...):
    each person is said to have every value, equally often, so the sentences state nothing, but stage 2 hears and
    says the spoken answers' shapes."""
    return [r.answer.format(person=p, value=v) for r in RELATIONS for p in PEOPLE for v in r.values]


# ---- sentences for speech recognition and synthesis ----------------------------------------------------------
# They use the world's words (names, cities, pets, jobs, colours, instruments, the question words and the phrases
# answers are made of) so that stage 2 teaches how they sound, and put people where answers and questions put
# them, followed by a relation's verb or asked about, but never state a fact or ask a question of the world.
# Without the "persons" and "asking" families a person was only ever followed by "met", "and", "called", ...:
# the ASR transcribed the spoken answer "anna lives in oslo" as "does anna know ...", and held-out questions'
# names as the names stage 3's training questions put in that question. Without "short" sentences (2-4 words,
# as long as the answers) the ASR, which had heard nothing shorter than five words, transcribed the spoken answers
# as a longer sentence or as units.

_SENTENCES = {  # family -> templates; {p} {q} {r} people, {j} a job, {a} a pet, {c} a colour, {i} an instrument, ...
    "people": ["{p} met {q} and {r} at the station", "{p} wrote a letter to {q} and {r}",
               "{p}, {q} and {r} went home early", "does {p} know {q} and {r}", "{p} called {q} on monday",
               "{p} and {q} waited for {r} by the door", "{p} sat between {q} and {r}"],
    "animals": ["the {j} found a {c} {a}", "a {a} lives with the {j} in {city}", "the {a} of the {j} is {c}",
                "the {j} from {city} has a {a}", "the {a} owner is a {j}"],
    "things": ["the {j} has a {c} {i}", "the {j} from {city} likes the {i} more than the {i2}",
               "the {c} {i} is next to the {a}", "the {j} plays the {i} in {city}", "the {j} likes {c} and {c2}"],
    "places": ["the {j} lives in {city} with a {a}", "the {j} from {city} lives in {city2}",
               "it was late so {p} and {q} stayed home", "the {j} flew from {city} to {city2}"],
    "persons": ["{p} lives with {q} and {r}", "{p} lives next to {q}", "{p} has a friend called {q}",
                "{p} is a friend of {q} and {r}", "{p} likes {q} and {r}", "{p} plays with {q} and {r}"],
    "asking": ["what colour does {p} want for {q}", "what pet does {p} want for {q}", "what job does {p} want for {q}",
               "where does {p} meet {q}", "what does {p} want from {q}", "which city does {p} know"],
    "short": ["{p} likes {q}", "{p} is late", "{p} lives here", "{p} has a friend", "{p} plays well", "{p} and {q}",
              "ask {p}", "the {c} {a}", "a {j} in {city}", "the {i} is {c}", "{city} or {city2}", "the {a} plays"],
    "questions": ["where does the {j} from {city} live", "what pet does the {j} have",
                  "what job does the {a} owner have", "what colour does the {a} like", "what does the {j} play in {city}",
                  "does the {j} live in {city}", "which {a} does the {j} like"],
}
# how often each family is drawn: names are the words held-out questions hinge on, so they are heard most
_FAMILY_WEIGHTS = {"people": 2, "persons": 2, "asking": 2, "short": 2, "animals": 1, "things": 1, "places": 1,
                   "questions": 1}
_SLOTS = {"p": PEOPLE, "q": PEOPLE, "r": PEOPLE, "j": JOBS, "a": PETS, "c": COLOURS, "c2": COLOURS, "i": INSTRUMENTS,
          "i2": INSTRUMENTS, "city": CITIES, "city2": CITIES}
_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def _fill(template: str) -> list[str]:
    """Every sentence of a template, its slots filled with distinct words."""
    slots = [s for s in _SLOTS if "{" + s + "}" in template]
    return [_ARTICLE.sub("an ", template.format(**dict(zip(slots, words))))
            for words in product(*(_SLOTS[s] for s in slots)) if len(set(words)) == len(words)]


def sample_sentences(n: int, rng: random.Random) -> list[str]:
    """`n` distinct sentences: each draw picks a family (by its weight), then an unused sentence of it."""
    pools = {name: sorted({s for t in templates for s in _fill(t)}) for name, templates in _SENTENCES.items()}
    for pool in pools.values():
        rng.shuffle(pool)
    total = sum(map(len, pools.values()))
    if n > total:
        raise InputError(f"asked for {n} sentences but the grammar has only {total}")
    out = []
    while len(out) < n:
        names = [k for k, pool in pools.items() if pool]
        out.append(pools[rng.choices(names, weights=[_FAMILY_WEIGHTS[k] for k in names])[0]].pop())
    return out
