"""scripts/make_corpus.py and the corpus it ships in examples/corpus/."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest

from speechgpt_fairseq.demo import grammar as qa

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "corpus"
SPLITS = ("train", "valid", "test")
SEED = 1  # the seed the shipped corpus was made with (its README gives the command)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_corpus", REPO / "scripts" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def shipped_sentences() -> list[str]:
    """Train, valid and test sentences in draw order (the splits are consecutive runs of draws)."""
    return [line for split in SPLITS for line in (CORPUS / f"{split}.wrd").read_text().splitlines()]


def shipped_qa() -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (CORPUS / f"qa_{split}.jsonl").read_text().splitlines()]
            for split in SPLITS}


def test_sentence_draws_are_what_ships(script):
    """The sentence stream is untouched by the question/answer material drawn beside it."""
    sentences = shipped_sentences()
    assert script.sample_sentences(len(sentences), random.Random(SEED)) == sentences


def test_every_question_has_its_answer(script):
    grammar = script.qa_grammar(script.make_world(script.qa_stream(SEED)))
    value = {qa.number_words(n): n for n in range(101)}
    for question, answer in grammar["arithmetic"]:
        left, op, right = re.fullmatch(r"what is (.+) (plus|times|minus) (.+)", question).groups()
        expected = {"plus": value[left] + value[right], "times": value[left] * value[right],
                    "minus": value[left] - value[right]}[op]
        assert answer == f"{left} {op} {right} is {qa.number_words(expected)}"
    for question, answer in grammar["comparisons"]:
        _, x, asked, _, y = question.split(" ", 4)
        truth = "more" if value[x] > value[y] else "less"
        assert answer == f"{'yes' if asked == truth else 'no'}, {x} is {truth} than {y}"
    yes = {(a, v) for a, vs in qa.ABILITIES.items() for v in vs + qa.MORE_ABILITIES.get(a, [])}
    no = {(a, v) for a, vs in qa.INABILITIES.items() for v in vs}
    assert not yes & no
    # yes/no questions state the answer of the open question about the same thing
    world = grammar["places"] + grammar["counting"] + grammar["calendar and timetable"]
    open_answers = {a for _, a in world}
    for _, answer in world:
        assert answer.removeprefix("yes, ").removeprefix("no, ") in open_answers
    assert len({q for q, _ in world}) == len(world)


def test_qa_draws_are_seeded(script):
    def draw(seed):
        rng = script.qa_stream(seed)
        return script.sample_qa(300, script.make_world(rng), rng)

    assert draw(SEED) == draw(SEED)
    assert draw(SEED) != draw(SEED + 1)


def test_shipped_qa_files(script):
    qa = shipped_qa()
    readme = (CORPUS / "README.md").read_text()
    assert f"{len(qa['train'])}, {len(qa['valid'])} and {len(qa['test'])} lines" in readme
    questions = {split: {r["text_i"] for r in records} for split, records in qa.items()}
    answers = {split: {r["text_r"] for r in records} for split, records in qa.items()}
    assert not questions["train"] & questions["valid"] and not questions["train"] & questions["test"]
    assert not questions["valid"] & questions["test"]
    assert not answers["train"] & (answers["valid"] | answers["test"])  # no held-out answer is a train answer
    grammar = script.qa_grammar(script.make_world(script.qa_stream(SEED)))
    answer_of = dict(pair for pairs in grammar.values() for pair in pairs)
    for split, records in qa.items():
        for r in records:
            assert set(r) == {"text_i", "text_r", "units_i", "units_r"}
            assert answer_of[r["text_i"]] == r["text_r"]
            for units in (r["units_i"], r["units_r"]):
                assert units and all(type(u) is int and 0 <= u < 100 for u in units)
                assert all(a != b for a, b in zip(units, units[1:]))  # repeats merged


def test_build_com_reads_shipped_qa(tmp_path):
    from speechgpt_fairseq.data.builders import build_com

    stats = build_com(CORPUS / "qa_test.jsonl", tmp_path / "com.jsonl", show_progress=False, num_units=100)
    assert stats.read == sum(stats.written.values()) == 50 and not stats.skipped
    first = json.loads((tmp_path / "com.jsonl").read_text().splitlines()[0])
    assert first["plain_text"].startswith("[Human]: ")


def test_shipped_tokenizer_is_retrained_exactly(script):
    """tokenizer.model is what the script trains on the shipped text, run after run."""
    qa = shipped_qa()
    pairs = [(r["text_i"], r["text_r"]) for split in SPLITS for r in qa[split]]
    lines = script.tokenizer_text(shipped_sentences(), pairs)
    model = script.train_tokenizer(lines, 1000, SEED)
    assert model == script.train_tokenizer(lines, 1000, SEED)
    assert model == (CORPUS / "tokenizer.model").read_bytes()


def test_shipped_tokenizer_is_llama_style_and_covers_the_text(script):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from speechgpt_fairseq.data.builders import shipped_templates
    from speechgpt_fairseq.data.prompts import chain_of_modality, cross_modal
    from speechgpt_fairseq.data.vocabulary import Vocabulary

    raw = (CORPUS / "tokenizer.model").read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(raw)
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert (t.model_type, t.byte_fallback, t.split_digits, t.allow_whitespace_only_pieces) == (t.BPE, True, True, True)
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces) == ("identity", True, False)

    sp = spm.SentencePieceProcessor(model_proto=raw)
    for text in shipped_sentences()[:200] + shipped_templates("asr") + shipped_templates("tts"):
        ids = sp.encode(text)
        assert sp.unk_id() not in ids and not any(map(sp.is_byte, ids)), text  # every character has a piece
        assert sp.decode(ids) == text

    # prompts: text between the vocabulary's added tokens, as stages 2 and 3 encode it
    vocab = Vocabulary.from_tokenizer(CORPUS / "tokenizer.model", num_units=100)
    assert len(vocab) == 1000 + 100 + 6
    prompts = [cross_modal(template, "<sosp><1><2><eosp>", "seven plus two is nine")
               for template in shipped_templates("asr")]
    prompts += [chain_of_modality(fmt, r["text_i"], r["text_r"], r["units_i"], r["units_r"])
                for r in shipped_qa()["train"][:20] for fmt in ("s2s", "s2t", "t2s", "t2t")]
    for prompt in prompts:
        ids = vocab.encode(prompt)
        assert vocab.unk not in ids and not any(sp.is_byte(i) for i in ids if i < vocab.base_size), prompt
        assert vocab.decode(ids) == prompt


def test_script_runs_end_to_end(script, tmp_path):
    """A tiny corpus from the command line's entry point: every file, the asked-for counts."""
    out = tmp_path / "corpus"
    script.main(["--out", str(out), "--num-utterances", "12", "3", "3", "--qa", "6", "2", "2", "--num-units", "16",
                 "--kmeans-frames", "5000", "--vocab-size", "400"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "tokenizer.model", "test.txt"] + [f"{s}.{ext}" for s in SPLITS for ext in ("km", "wrd")]
        + [f"qa_{s}.jsonl" for s in SPLITS])
    assert [len((out / f"{s}.km").read_text().splitlines()) for s in SPLITS] == [12, 3, 3]
    records = {s: [json.loads(line) for line in (out / f"qa_{s}.jsonl").read_text().splitlines()] for s in SPLITS}
    assert [len(records[s]) for s in SPLITS] == [6, 2, 2]
    assert all(0 <= u < 16 for rs in records.values() for r in rs for u in r["units_i"] + r["units_r"])
    assert "--qa 6 2 2" in (out / "README.md").read_text()
