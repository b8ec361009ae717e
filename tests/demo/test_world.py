"""The demo world: held-out questions are new combinations whose answers were only read, never copyable from
the question, and the speech sentences teach the words without stating a fact."""
import random
import re
from collections import Counter

from speechgpt_fairseq.demo import world as w


def make(seed: int = 1) -> w.World:
    return w.make_world(random.Random(f"qa-{seed}"))


def test_splits_hold_out_combinations_of_trained_people_and_relations():
    for seed in (1, 2, 3):
        world = make(seed)
        train = world.questions("train")
        held_out = world.questions("valid") + world.questions("test")
        assert {(q.person, q.relation) for q in train}.isdisjoint((q.person, q.relation) for q in held_out)
        assert {q.person for q in train} == set(w.PEOPLE)  # every person is asked about in training
        assert {q.relation for q in train} == set(w.RELATION_NAMES)
        assert len(held_out) == round(0.35 * len(w.PEOPLE) * len(w.RELATIONS))


def test_answers_cannot_be_copied_from_the_question():
    world = make()
    for q in world.questions():
        value = q.answer.split()[-1]
        assert value not in q.text.split(), q
    # the answer's content is spread: no value answers most of a relation's questions
    for r in w.RELATIONS:
        values = [world.facts[p, r.name] for p in w.PEOPLE]
        assert max(values.count(v) for v in r.values) <= len(w.PEOPLE) // 2


def test_knowledge_teaches_every_fact_in_several_phrasings():
    world = make()
    knowledge = world.knowledge()
    answers = dict(knowledge)
    for q in world.questions():  # held out or not: the knowledge is all taught in text
        assert answers[q.text] == q.answer
        assert sum(a == q.answer for _, a in knowledge) == 1 + len(w.RELATIONS[0].paraphrases)
        assert q.answer in answers[f"tell me about {q.person}"]


def test_sentences_use_the_words_but_state_no_fact_or_rule():
    sentences = w.sample_sentences(3000, random.Random(1))
    assert len(set(sentences)) == 3000
    words = {word for s in sentences for word in s.split()}
    for vocabulary in (w.PEOPLE, w.CITIES, w.PETS, w.JOBS, w.COLOURS, w.INSTRUMENTS):
        assert set(vocabulary) <= words
    people = "|".join(w.PEOPLE)

    def pattern(text: str, values: tuple[str, ...] = ()) -> re.Pattern:  # a question or answer, any person or value
        text = re.escape(text).replace(re.escape("{person}"), f"({people})")
        return re.compile(rf"\b{text.replace(re.escape('{value}'), '(' + '|'.join(values) + ')')}\b")

    facts = [pattern(r.answer, r.values) for r in w.RELATIONS]
    questions = [pattern(q) for r in w.RELATIONS for q in (r.question, *r.paraphrases)] + [pattern(w.PROFILE_QUESTION)]
    assert not [s for s in sentences if any(p.search(s) for p in facts + questions)]
    # people are where answers and questions put them: followed by a relation's verb, asked about
    followed = {m.group(2) for s in sentences for m in re.finditer(rf"\b({people}) (\w+)", s)}
    assert {"lives", "has", "is", "likes", "plays"} <= followed
    for r in w.RELATIONS:
        start = r.question.split("{person}")[0]  # "what colour does "
        assert any(re.search(rf"\b{start}({people})\b", s) for s in sentences), start
    assert sum(len(s.split()) <= 4 for s in sentences) >= len(sentences) // 10  # as short as the answers
    assert not [s for s in sentences if re.search(r"\ba [aeiou]", s)]  # "an orange", not "a orange"


def test_answer_shapes_give_every_person_every_value_alike():
    said = Counter()
    for shape in w.answer_shapes():
        match = [(p, r.name, v) for r in w.RELATIONS for p in w.PEOPLE for v in r.values
                 if shape == r.answer.format(person=p, value=v)]
        assert len(match) == 1, shape  # an answer, of one person and value
        said[match[0]] += 1
    # every person with every value of every relation, once: no value is told apart, so nothing is stated
    assert said.keys() == {(p, r.name, v) for r in w.RELATIONS for p in w.PEOPLE for v in r.values}
    assert set(said.values()) == {1}


def test_the_same_seed_gives_the_same_world_and_sentences():
    assert make(1) == make(1) and make(1) != make(2)
    assert w.sample_sentences(50, random.Random(4)) == w.sample_sentences(50, random.Random(4))
