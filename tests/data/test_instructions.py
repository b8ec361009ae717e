"""Instruction data: segments, prompt/response encoding, streaming binarization, bad lines."""
import json
import re

import pytest
from fairseq.data import MMapIndexedDataset

from speechgpt_fairseq.data.binarize import BinarizeError
from speechgpt_fairseq.data.instructions import (PROMPT, RESPONSE, SYSTEM, encode_example, prepare_instructions)
from speechgpt_fairseq.data.prompts import Example, cross_modal
from speechgpt_fairseq.data.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def vocab(sentencepiece_model):
    return Vocabulary.from_tokenizer(sentencepiece_model, num_units=20)


def line(prefix, plain_text):
    return json.dumps({"prefix": prefix, "plain_text": plain_text}) + "\n"


def test_segments_split_system_prompt_and_response(vocab):
    ex = Example("You are a helpful assistant.\n", cross_modal("Transcribe it.", "<sosp><1><2><eosp>", "a cup"))
    ids, segs = encode_example(ex, vocab)
    assert len(ids) == len(segs) and ids[0] == vocab.bos and ids[-1] == vocab.eos
    system = vocab.encode_prompt(ex.prefix)
    assert ids[:len(system)] == system and set(segs[:len(system)]) == {SYSTEM}
    prompt_end = segs.index(RESPONSE)
    assert vocab.tokens[ids[prompt_end - 1]] == ":" or vocab.decode(ids[:prompt_end]).endswith("[SpeechGPT]:")
    assert set(segs[len(system):prompt_end]) == {PROMPT} and set(segs[prompt_end:]) == {RESPONSE}
    assert vocab.decode(ids[prompt_end:]) == " a cup<eoa>"


@pytest.mark.parametrize("input,output", [("the quick fox", "<sosp><3><4><eosp>"), ("<sosp><3><4><eosp>", "a red cup")],
                         ids=["speech-response", "text-response"])
def test_response_is_encoded_as_the_model_will_see_it(vocab, input, output):
    """The record is the tokenizer's ids of the whole exchange, then </s>: the prompt's ids (what the model is
    prompted with) followed by the response's (what it has to generate), the response and </s> labelled RESPONSE."""
    ex = Example("", cross_modal("Say it.", input, output))
    ids, segs = encode_example(ex, vocab)
    prompt, response = ex.plain_text.split("[SpeechGPT]:")
    assert ids == vocab.encode_prompt(ex.plain_text) + [vocab.eos]
    n = segs.index(RESPONSE)
    assert ids[:n] == vocab.encode_prompt(prompt + "[SpeechGPT]:") and set(segs[:n]) == {PROMPT}
    assert vocab.decode(ids[n:-1]) == response == f" {output}<eoa>" and set(segs[n:]) == {RESPONSE}
    if output.startswith("<sosp>"):  # the spoken answer as its unit tokens
        units = [vocab.index[t] for t in ("<sosp>", "<3>", "<4>", "<eosp>")]
        assert any(ids[i:i + 4] == units for i in range(n, len(ids)))


def test_binarized_examples_read_back(vocab, tmp_path):
    exs = [Example("", cross_modal("Transcribe.", f"<sosp><{k}><{k + 1}><eosp>", f"word {k}")) for k in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(line(e.prefix, e.plain_text) for e in exs) + "\n")
    (stats,) = prepare_instructions({"train": tmp_path / "a.jsonl"}, tmp_path / "out", vocab, show_progress=False)
    assert stats.records == 5 and stats.skipped == {"empty line": 1}
    tokens, segs = MMapIndexedDataset(str(tmp_path / "out" / "train")), MMapIndexedDataset(str(tmp_path / "out" / "train.seg"))
    for i, e in enumerate(exs):
        expected = encode_example(e, vocab)
        assert tokens[i].tolist() == expected[0] and segs[i].tolist() == expected[1]


BAD = [
    ('{"prefix": "", "plain_text": "[Human]: hi<eoh> [SpeechGPT]: ok<eoa>"\n', "malformed JSON", "malformed JSON"),
    ('{"plain_text": "[Human]: hi<eoh> [SpeechGPT]: ok<eoa>"}\n', "missing field 'prefix'", "missing field"),
    (line("", "[Human]: hi<eoh> there is no answer"), "no '[SpeechGPT]:'", "not a SpeechGPT exchange"),
    (line("", "[Human]: hi<eoh> [SpeechGPT]:   "), "response after '[SpeechGPT]:' is empty", "not a SpeechGPT exchange"),
    (line("", "[Human]: hi<eoh> [SpeechGPT]: <sosp><3><25><eosp><eoa>"), "unit 25 is out of range", "bad speech units"),
    (line("", "[Human]: <sosp><3><x><eosp><eoh> [SpeechGPT]: ok"), "unknown token '<x>'", "bad speech units"),
    ("[1, 2]\n", "expected a JSON object", "not an object"),
]


@pytest.mark.parametrize("bad,message,reason", BAD, ids=[b[2] + "-" + b[1][:12] for b in BAD])
def test_bad_lines_name_file_and_line_or_are_counted(vocab, tmp_path, bad, message, reason):
    good = line("", cross_modal("Transcribe.", "<sosp><1><eosp>", "fine"))
    (tmp_path / "a.jsonl").write_text(good + bad + good)
    out = tmp_path / "out"
    with pytest.raises(BinarizeError, match="a.jsonl:2: .*" + re.escape(message)):
        prepare_instructions({"train": tmp_path / "a.jsonl"}, out, vocab, show_progress=False)
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    (stats,) = prepare_instructions({"train": tmp_path / "a.jsonl"}, out, vocab, skip_bad=True, show_progress=False)
    assert stats.records == 2 and stats.skipped == {reason: 1}


def test_a_line_that_is_not_utf8_is_named_or_counted(vocab, tmp_path):
    good = line("", cross_modal("Transcribe.", "<sosp><1><eosp>", "fine")).encode()
    (tmp_path / "a.jsonl").write_bytes(good + good.replace(b"fine", b"caf\xe9") + good)
    with pytest.raises(BinarizeError, match=r"a.jsonl:2: not UTF-8 text \(byte 0xe9 at column \d+\)"):
        prepare_instructions({"train": tmp_path / "a.jsonl"}, tmp_path / "out", vocab, show_progress=False)
    (stats,) = prepare_instructions({"train": tmp_path / "a.jsonl"}, tmp_path / "out", vocab, skip_bad=True,
                                    show_progress=False)
    assert stats.records == 2 and stats.skipped == {"not UTF-8": 1}


def test_lengths_are_reported_at_binarization(vocab, tmp_path):
    """What task.tokens_per_sample must allow is known before training: the longest example, and how many are
    longer than the tasks' default lengths."""
    short = line("", cross_modal("Transcribe.", "<sosp><1><eosp>", "fine"))
    long = line("", cross_modal("Transcribe.", "<sosp>" + "<1><2>" * 300 + "<eosp>", "fine"))
    (tmp_path / "a.jsonl").write_text(short + long + short)
    (stats,) = prepare_instructions({"train": tmp_path / "a.jsonl"}, tmp_path / "out", vocab, show_progress=False)
    assert 600 < stats.longest < 700 and stats.longer == {512: 1, 1024: 0}
    assert stats.lengths() == f"longest {stats.longest} tokens; 1 longer than 512, none longer than 1024"


def test_speechinstruct_records_load_as_they_are(vocab, tmp_path):
    """SpeechInstruct keeps a system text in `prefix` and the exchange in `plain_text`; the `prefix` loss policy
    then trains on the exchange only, as SpeechGPT's released code does."""
    from speechgpt_fairseq.data.instruction_dataset import InstructionDataset

    system = "You are an assistant that listens and speaks.\n- Answer briefly.\n"
    exchange = "[Human]: Read this out loud. This is input: the red cup<eoh> [SpeechGPT]: <sosp><4><9><9><eosp><eoa>"
    (tmp_path / "si.jsonl").write_text(line(system, exchange) * 3)
    prepare_instructions({"train": tmp_path / "si.jsonl"}, tmp_path / "out", vocab, show_progress=False)
    tokens = MMapIndexedDataset(str(tmp_path / "out" / "train"))
    segs = MMapIndexedDataset(str(tmp_path / "out" / "train.seg"))
    ds = InstructionDataset(tokens, segs, "prefix", pad=vocab.pad)
    target = ds[0]["target"].tolist()
    n_system = len(vocab.encode(system))
    assert set(target[:n_system]) == {vocab.pad}  # no loss on the system text
    assert vocab.decode(t for t in target[n_system:] if t != vocab.pad) == exchange and target[-1] == vocab.eos
