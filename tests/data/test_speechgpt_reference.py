"""SpeechGPT's released tokenizer layout (sentencepiece + added_tokens.json) encodes text as transformers 4.33.1's slow
LlamaTokenizer did when SpeechGPT trained: prepare-sft's records equal `tok(prefix + plain_text).input_ids + [eos]`
as recorded with that version (tests/data/reference/make_speechgpt_tokenizer_reference.py), and so do SpeechGPT's
inference prompts as our chat builds them."""
import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from fairseq.data import MMapIndexedDataset

from speechgpt_fairseq.chat import SpokenChat
from speechgpt_fairseq.data.instructions import encode_example
from speechgpt_fairseq.data.prompts import Example
from speechgpt_fairseq.data.vocabulary import SLOW_433, STANDARD, Vocabulary
from speechgpt_fairseq.models.hf import write_hf_tokenizer

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "reference"
TOKENIZER = HERE / "speechgpt_tokenizer"
REFERENCE = json.loads((HERE / "speechgpt_tokenizer_reference.json").read_text(encoding="utf-8"))
RECORDS = [json.loads(line) for line in (HERE / "speechinstruct_records.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.from_tokenizer(TOKENIZER)


def test_the_reference_is_of_this_tokenizer(vocab):
    assert REFERENCE["transformers"] == "4.33.1" and len(REFERENCE["records"]) == len(RECORDS)
    model = (TOKENIZER / "tokenizer.model").read_bytes()
    assert hashlib.sha256(model).hexdigest() == REFERENCE["tokenizer_model_sha256"]
    assert model == (REPO / "examples" / "corpus" / "tokenizer.model").read_bytes()
    assert len(vocab) == REFERENCE["vocab_size"] and vocab.num_units == 1000
    assert (vocab.text_encoding, vocab.add_bos, vocab.tokens[vocab.pad]) == (SLOW_433, True, "<unk>")
    assert Counter(r["kind"] for r in RECORDS) == {"com": 4, "asr": 2, "tts": 2, "text": 3}


def test_prepare_sft_records_equal_transformers_4_33(vocab, cli, tmp_path):
    """Every record, CoM, ASR, TTS and text-only, id for id; the ids the standard encoding would give differ."""
    cli("speechgpt", "prepare-sft", f"train={HERE / 'speechinstruct_records.jsonl'}", "--vocab", TOKENIZER,
        "--out", tmp_path / "data", "--no-progress")
    records = MMapIndexedDataset(str(tmp_path / "data" / "train"))
    assert [records[i].tolist() for i in range(len(records))] == [r["ids"] for r in REFERENCE["records"]]
    assert Vocabulary.load(tmp_path / "data").text_encoding == SLOW_433  # every verb reads it from vocab.json
    standard = dataclasses.replace(vocab, text_encoding=STANDARD)
    assert all(encode_example(Example(r["prefix"], r["plain_text"]), standard)[0] != ref["ids"]
               for r, ref in zip(RECORDS, REFERENCE["records"]))


def test_segments_follow_the_parts(vocab):
    """The system prefix, the human turn (to `[SpeechGPT]:`) and the response, on the whole-text encoding."""
    for record in RECORDS:
        ids, segs = encode_example(Example(record["prefix"], record["plain_text"]), vocab)
        prompt_end = segs.index(2)
        assert vocab.tokens[ids[prompt_end - 2]] == "[SpeechGPT]" and vocab.tokens[ids[prompt_end - 1]] == "▁:"
        if record["prefix"]:
            assert vocab.tokens[ids[segs.index(1)]] == "[Human]"  # the prefix's final newline is gone, as in 4.33
        assert ids[-1] == vocab.eos and segs[-1] == 2


class CannedModel:
    def __init__(self, vocab):
        self.vocab, self.calls = vocab, []

    def generate(self, prompts, **kwargs):
        self.calls.append((prompts, kwargs))
        return ["today is a sunny day.<eoa>"] * len(prompts)


def test_speechgpt_chat_prompts_equal_transformers_4_33(vocab, tmp_path):
    """SpeechGPT's chat: the system prompt, `[Human]: {request} <eoh>. [SpeechGPT]: `, audio after "is input:" (or
    alone) as units; 2048 new tokens at most and 10 at least."""
    (tmp_path / "q.wav").write_bytes(b"")
    (tmp_path / "r.wav").write_bytes(b"")
    units = {"q.wav": [1, 1, 2, 3, 3], "r.wav": [5, 6, 7]}
    system = REFERENCE["inference_prompts"][0]["system"]
    model = CannedModel(vocab)
    chat = SpokenChat(model, speech_to_units=lambda path: units[path.name], system_prefix=system,
                      prompt_style="speechgpt")
    requests = {"Recognize this speech, this is input:<sosp><1><2><3><eosp>":
                f"Recognize this speech, this is input: {tmp_path / 'q.wav'}",
                "<sosp><5><6><7><eosp>": str(tmp_path / "r.wav")}
    for reference in REFERENCE["inference_prompts"]:
        request = requests.get(reference["question"], reference["question"])
        prompt = chat.prompt_for(request)
        assert prompt == system + "[Human]: " + reference["question"] + " <eoh>. [SpeechGPT]: "
        assert vocab.encode_prompt(prompt) == reference["ids"], reference["question"]
    turn = chat.respond(requests["<sosp><5><6><7><eosp>"])
    assert turn.text == "today is a sunny day."
    assert model.calls[-1][1]["max_new_tokens"] == 2048 and model.calls[-1][1]["min_new_tokens"] == 10
    with pytest.raises(FileNotFoundError, match="missing.wav: no such audio file"):
        chat.prompt_for("Recognize this speech, this is input: missing.wav")


def test_exported_tokenizer_gives_the_same_ids_in_current_transformers(vocab, tmp_path):
    """export-hf writes SpeechGPT's encoding so that today's transformers reproduces 4.33's ids; importing the
    export gives the same vocabulary back."""
    from transformers import AutoTokenizer

    write_hf_tokenizer(vocab, tmp_path, model_max_length=2048)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for record, reference in zip(RECORDS, REFERENCE["records"]):
        assert tok(record["prefix"] + record["plain_text"]).input_ids + [vocab.eos] == reference["ids"]
    assert Vocabulary.from_tokenizer(tmp_path) == vocab
