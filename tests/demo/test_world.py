"""The demo world: held-out questions are new combinations whose answers were only read, never copyable from
the question, and the speech sentences teach the words without stating a fact."""
import random
import re

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
        for q in held_out:  # a language answer says where the person lives: no training answer may say it
            if q.relation in ("home", "language"):
                assert not any(t.person == q.person and t.relation in ("home", "language") for t in train), q


def test_answers_cannot_be_copied_from_the_question():
    world = make()
    for q in world.questions():
        value = q.answer.split()[-1]
        assert value not in q.text.split(), q
    # the answer's content is spread: no value answers most of a relation's questions
    for r in w.RELATIONS:
        values = [world.facts[p, r.name] for p in w.PEOPLE]
        assert max(values.count(v) for v in r.values) <= len(w.PEOPLE) // 2


def test_knowledge_teaches_every_fact_and_rule_but_not_the_held_out_inferences():
    world = make()
    knowledge = dict(world.knowledge())
    for q in world.questions():
        if q.relation == "language":
            assert (knowledge.get(q.text) == q.answer) == (world.split[q.person, q.relation] == "train")
        else:
            assert knowledge[q.text] == q.answer
    for city, language in w.LANGUAGE_OF.items():
        assert knowledge[f"what language do people in {city} speak"] == f"people in {city} speak {language}"
    paraphrases = [k for k in knowledge if not any(k == q.text for q in world.questions())]
    assert len(paraphrases) >= 2 * len(w.PEOPLE) * len(w.RELATIONS)


def test_sentences_use_the_words_but_state_no_fact_or_rule():
    sentences = w.sample_sentences(3000, random.Random(1))
    assert len(set(sentences)) == 3000
    words = {word for s in sentences for word in s.split()}
    for vocabulary in (w.PEOPLE, w.CITIES, w.PETS, w.JOBS, w.COLOURS, w.INSTRUMENTS, w.LANGUAGE_OF.values()):
        assert set(vocabulary) <= words
    people = "|".join(w.PEOPLE)
    statement = re.compile(rf"\b({people}) (lives in|has a|is a|likes|plays the|speaks)\b|\bpeople in \w+ speak\b")
    assert not [s for s in sentences if statement.search(s)]
    assert not [s for s in sentences if re.search(r"\ba [aeiou]", s)]  # "an orange", not "a orange"


def test_the_same_seed_gives_the_same_world_and_sentences():
    assert make(1) == make(1) and make(1) != make(2)
    assert w.sample_sentences(50, random.Random(4)) == w.sample_sentences(50, random.Random(4))
