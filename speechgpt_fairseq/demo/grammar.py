"""The demo corpus's text: sentences of a small grammar (numbers, colours, objects, simple facts) and
question/answer pairs whose answers are sentences of the same kinds, with the espeak-ng voices and rates that
speak them. Everything is drawn from seeded random streams, so a seed gives the same corpus every time."""
from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product

from speechgpt_fairseq.errors import InputError

VOICES = ["en", "en-us", "en+f3", "en+m3"]
RATES = [130, 155, 180, 205]  # words per minute; espeak-ng's default is 175
PROMPT_FRACTION = 0.3

# ---------------------------------------------------------------------------------------------- grammar

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..100 in words: 42 -> "forty two"."""
    if n < 20:
        return _ONES[n]
    if n == 100:
        return "one hundred"
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])


COLOURS = "red blue green yellow black white orange purple brown grey".split()
OBJECTS = "cup book ball box pen lamp chair hat key bag phone plate".split()
PLURAL = {o: o + ("es" if o.endswith("x") else "s") for o in OBJECTS}
PLACES = "table desk bed shelf door window sofa floor chair box".split()
RELATIONS = ["on", "under", "next to", "behind", "in front of", "near"]
CONTAINERS = "box bag basket drawer room".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = ("january february march april may june july august september october november "
          "december").split()
ABILITIES = {  # true facts only
    "fish": ["swim"], "birds": ["fly", "sing"], "dogs": ["run", "swim", "bark"], "cats": ["climb", "run"],
    "frogs": ["jump", "swim"], "horses": ["run", "jump"], "ducks": ["fly", "swim", "walk"],
    "snakes": ["swim", "climb"], "bees": ["fly"], "people": ["talk", "read", "walk", "sing"],
}
PROPERTIES = ["the sun is hot", "snow is cold", "ice is cold", "fire is hot", "the sky is blue",
              "grass is green", "milk is white", "coal is black", "lemons are sour", "honey is sweet",
              "the sea is salty", "rocks are hard", "pillows are soft", "the night is dark",
              "a week has seven days", "a year has twelve months", "a day has twenty four hours",
              "an hour has sixty minutes", "water is wet", "feathers are light"]


def _place_sentences() -> list[str]:
    return [f"the {c} {o} is {r} the {p}" for c, o, r, p in product(COLOURS, OBJECTS, RELATIONS, PLACES) if o != p]


def _count_sentences() -> list[str]:
    return [f"there are {number_words(n)} {c} {PLURAL[o]} in the {b}"
            for n, c, o, b in product(range(2, 13), COLOURS, OBJECTS, CONTAINERS) if o != b]


def _arithmetic_sentences() -> list[str]:
    out = []
    for a, b in product(range(11), repeat=2):
        out.append(f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}")
        out.append(f"{number_words(a)} times {number_words(b)} is {number_words(a * b)}")
        if a >= b:
            out.append(f"{number_words(a)} minus {number_words(b)} is {number_words(a - b)}")
    return out


def _comparison_sentences() -> list[str]:
    return [f"{number_words(a)} is {'more' if a > b else 'less'} than {number_words(b)}"
            for a, b in product(range(21), repeat=2) if a != b]


def _calendar_and_time_sentences() -> list[str]:
    out = [f"the day after {d} is {DAYS[(i + 1) % 7]}" for i, d in enumerate(DAYS)]
    out += [f"the day before {d} is {DAYS[i - 1]}" for i, d in enumerate(DAYS)]
    out += [f"the month after {m} is {MONTHS[(i + 1) % 12]}" for i, m in enumerate(MONTHS)]
    out += [f"it is {number_words(h)} o'clock in the {part}" for h in range(1, 13)
            for part in ("morning", "afternoon", "evening")]
    out += [f"the train leaves at {number_words(h)} {number_words(m)} on {d}" for h in range(1, 13)
            for m in (15, 30, 45) for d in DAYS]
    return out


def _fact_sentences() -> list[str]:
    return [f"{animal} can {verb}" for animal, verbs in ABILITIES.items() for verb in verbs] + PROPERTIES


TEMPLATES = {
    "places": _place_sentences,
    "counting": _count_sentences,
    "arithmetic": _arithmetic_sentences,
    "comparisons": _comparison_sentences,
    "calendar and time": _calendar_and_time_sentences,
    "facts": _fact_sentences,
}


def draw_from_families(families: dict[str, list], n: int, rng: random.Random, what: str = "sentences") -> list:
    """`n` distinct items: each draw picks a family uniformly, then an unused item of it."""
    pools = {name: sorted(set(items)) for name, items in families.items()}
    for pool in pools.values():
        rng.shuffle(pool)
    total = sum(map(len, pools.values()))
    if n > total:
        raise InputError(f"asked for {n} {what} but the grammar has only {total}")
    out = []
    while len(out) < n:
        name = rng.choice([k for k, pool in pools.items() if pool])
        out.append(pools[name].pop())
    return out


def sample_sentences(n: int, rng: random.Random) -> list[str]:
    """`n` distinct sentences of the grammar."""
    return draw_from_families({name: make() for name, make in TEMPLATES.items()}, n, rng)


# ------------------------------------------------------------------------------ question/answer grammar
# Questions whose answers are sentences of the kinds above, for chain-of-modality data (stage 3). Each question
# has one answer: computed (arithmetic, comparisons, calendar, facts) or read from a hidden world drawn once
# per seed (where things are, how many there are, when the train leaves).

MORE_ABILITIES = {"people": ["swim", "run", "jump", "climb"], "dogs": ["walk", "jump"], "cats": ["walk", "jump"],
                  "horses": ["walk"]}
INABILITIES = {  # clear-cut only: "can snakes walk" -> "no, snakes cannot walk"
    "fish": ["run", "bark", "read", "talk"], "birds": ["bark", "read"], "dogs": ["fly", "read", "talk"],
    "cats": ["fly", "bark", "read", "talk"], "frogs": ["fly", "bark", "read", "talk"],
    "horses": ["fly", "bark", "read", "talk"], "ducks": ["bark", "read", "talk"],
    "snakes": ["fly", "run", "walk", "bark", "read", "talk"], "bees": ["bark", "read", "talk"],
    "people": ["fly", "bark"],
}
OPPOSITES = [  # (subject, verb, what it is, what it is not): "is snow hot" -> "no, snow is cold"
    ("the sun", "is", "hot", "cold"), ("snow", "is", "cold", "hot"), ("ice", "is", "cold", "hot"),
    ("fire", "is", "hot", "cold"), ("lemons", "are", "sour", "sweet"), ("honey", "is", "sweet", "sour"),
    ("rocks", "are", "hard", "soft"), ("pillows", "are", "soft", "hard"), ("the night", "is", "dark", "bright"),
    ("water", "is", "wet", "dry"), ("feathers", "are", "light", "heavy"),
]
COLOUR_OF = {"the sky": "blue", "grass": "green", "milk": "white", "coal": "black", "snow": "white"}
PARTS_OF = [("a week", "days", 7), ("a year", "months", 12), ("a day", "hours", 24), ("an hour", "minutes", 60)]


@dataclass(frozen=True)
class World:
    """What place, counting and timetable questions ask about, drawn once per seed; the decoys are the wrong
    guesses of the questions answered "no"."""

    place: dict[tuple[str, str], tuple[str, str]]  # (colour, object) -> (relation, place)
    place_decoy: dict[tuple[str, str], tuple[str, str]]
    count: dict[tuple[str, str, str], int]  # (colour, object, container) -> 2..12
    count_decoy: dict[tuple[str, str, str], int]
    train: dict[str, tuple[int, int]]  # day -> (hour, minute) the train leaves
    train_decoy: dict[str, tuple[int, int]]


def make_world(rng: random.Random) -> World:
    place, place_decoy = {}, {}
    for c, o in product(COLOURS, OBJECTS):
        place[c, o], place_decoy[c, o] = rng.sample([(r, p) for r, p in product(RELATIONS, PLACES) if p != o], 2)
    count, count_decoy = {}, {}
    for c, o, b in product(COLOURS, OBJECTS, CONTAINERS):
        if o != b:
            count[c, o, b], count_decoy[c, o, b] = rng.sample(range(2, 13), 2)
    train, train_decoy = {}, {}
    for d in DAYS:
        train[d], train_decoy[d] = rng.sample(list(product(range(1, 13), (15, 30, 45))), 2)
    return World(place, place_decoy, count, count_decoy, train, train_decoy)


def _arithmetic_qa(world: World) -> list[tuple[str, str]]:
    out = []
    for a, b in product(range(11), repeat=2):
        for op, value in [("plus", a + b), ("times", a * b)] + ([("minus", a - b)] if a >= b else []):
            expr = f"{number_words(a)} {op} {number_words(b)}"
            out.append((f"what is {expr}", f"{expr} is {number_words(value)}"))
    return out


def _comparison_qa(world: World) -> list[tuple[str, str]]:
    out = []
    for a, b in product(range(21), repeat=2):
        if a != b:
            x, y, truth = number_words(a), number_words(b), "more" if a > b else "less"
            for asked in ("more", "less"):
                reply = "yes" if asked == truth else "no"
                out.append((f"is {x} {asked} than {y}", f"{reply}, {x} is {truth} than {y}"))
    return out


def _calendar_qa(world: World) -> list[tuple[str, str]]:
    out = []
    for i, d in enumerate(DAYS):
        (hour, minute), (hour2, minute2) = world.train[d], world.train_decoy[d]
        at, decoy = f"{number_words(hour)} {number_words(minute)}", f"{number_words(hour2)} {number_words(minute2)}"
        fact = f"the train leaves at {at} on {d}"
        out += [(f"what day comes after {d}", f"the day after {d} is {DAYS[(i + 1) % 7]}"),
                (f"what day comes before {d}", f"the day before {d} is {DAYS[i - 1]}"),
                (f"when does the train leave on {d}", fact),
                (f"does the train leave at {at} on {d}", f"yes, {fact}"),
                (f"does the train leave at {decoy} on {d}", f"no, {fact}")]
    for i, m in enumerate(MONTHS):
        out += [(f"what month comes after {m}", f"the month after {m} is {MONTHS[(i + 1) % 12]}"),
                (f"what month comes before {m}", f"the month before {m} is {MONTHS[i - 1]}")]
    return out


def _place_qa(world: World) -> list[tuple[str, str]]:
    out = []
    for (c, o), (r, p) in world.place.items():
        fact, (r2, p2) = f"the {c} {o} is {r} the {p}", world.place_decoy[c, o]
        out += [(f"where is the {c} {o}", fact), (f"is the {c} {o} {r} the {p}", f"yes, {fact}"),
                (f"is the {c} {o} {r2} the {p2}", f"no, {fact}")]
    return out


def _count_qa(world: World) -> list[tuple[str, str]]:
    out = []
    for (c, o, b), n in world.count.items():
        things, decoy = f"{c} {PLURAL[o]}", number_words(world.count_decoy[c, o, b])
        fact = f"there are {number_words(n)} {things} in the {b}"
        out += [(f"how many {things} are in the {b}", fact),
                (f"are there {number_words(n)} {things} in the {b}", f"yes, {fact}"),
                (f"are there {decoy} {things} in the {b}", f"no, {fact}")]
    return out


def _fact_qa(world: World) -> list[tuple[str, str]]:
    out = [(f"can {animal} {verb}", f"yes, {animal} can {verb}")
           for animal in ABILITIES for verb in ABILITIES[animal] + MORE_ABILITIES.get(animal, [])]
    out += [(f"can {animal} {verb}", f"no, {animal} cannot {verb}") for animal, verbs in INABILITIES.items()
            for verb in verbs]
    for subject, verb, true, false in OPPOSITES:
        fact = f"{subject} {verb} {true}"
        out += [(f"{verb} {subject} {true}", f"yes, {fact}"), (f"{verb} {subject} {false}", f"no, {fact}")]
    out += [(f"what colour is {thing}", f"{thing} is {colour}") for thing, colour in COLOUR_OF.items()]
    out += [(f"how many {parts} does {whole} have", f"{whole} has {number_words(n)} {parts}")
            for whole, parts, n in PARTS_OF]
    return out


QA_FAMILIES = {
    "arithmetic": _arithmetic_qa,
    "comparisons": _comparison_qa,
    "calendar and timetable": _calendar_qa,
    "places": _place_qa,
    "counting": _count_qa,
    "facts": _fact_qa,
}


def qa_grammar(world: World) -> dict[str, list[tuple[str, str]]]:
    """Every (question, answer) pair per family; a question asked twice with two answers is a bug."""
    families = {name: make(world) for name, make in QA_FAMILIES.items()}
    answer_of: dict[str, str] = {}
    for q, a in (pair for pairs in families.values() for pair in pairs):
        if answer_of.setdefault(q, a) != a:
            raise AssertionError(f"the question {q!r} has two answers: {answer_of[q]!r} and {a!r}")
    return families


def qa_stream(seed: int) -> random.Random:
    """The random stream of the question/answer world, pairs and voices: apart from the sentences' stream."""
    return random.Random(f"qa-{seed}")


def sample_qa(n: int, world: World, rng: random.Random) -> list[tuple[str, str]]:
    """`n` distinct pairs, drawn as the sentences are, then shuffled: the small families run out first, and
    the shuffle gives every split its share of them."""
    pairs = draw_from_families(qa_grammar(world), n, rng, "question/answer pairs")
    rng.shuffle(pairs)
    return pairs
