"""The SpeechGPT vocabulary: base ids kept, units and SpeechGPT tokens appended, ids equal to HF's tokenizer."""
import json

import pytest

from speechgpt_fairseq.data.vocabulary import SPEECHGPT_TOKENS, Vocabulary, VocabularyError
from speechgpt_fairseq.models.hf import write_hf_tokenizer

TEXTS = [
    "Hello world",
    " one leading space",
    "   three leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\nand a blank line",
    "\nstarts with a newline",
    "digits 12345, 3.14 and 007",
    "non-ASCII: café naïve über 日本語 données, emoji 🙂 and ẞ",
    "<sosp><0><1><19><eosp>",
    "<sosp><3><3><7>",
    "speech <sosp><5><6><eosp> then text",
    "[Human]: what is this? <sosp><1><2><eosp><eoh> [SpeechGPT]: a cup; [ta] it is red<eos>",
    "not a unit: <20> <1234> <-1> <x>",
    "<s>control tokens</s> in text <unk>",
    "",
    " ",
]


def test_llama_layout_and_order(sentencepiece_model):
    v = Vocabulary.from_tokenizer(sentencepiece_model, num_units=20)
    assert (v.unk, v.bos, v.eos, v.pad) == (0, 1, 2, 0)
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"]
    base = v.base_size
    assert v.tokens[base:] == [f"<{k}>" for k in range(20)] + list(SPEECHGPT_TOKENS)
    assert v.unit_id(7) == base + 7


def test_llama_7b_sizes_give_33006():
    # LLaMA's 32000 sentencepiece ids + 1000 units + 6 SpeechGPT tokens, the released SpeechGPT-7B size
    base = ["<unk>", "<s>", "</s>"] + [f"p{i}" for i in range(31997)]
    v = Vocabulary._extend(base, None, bos=1, eos=2, pad=0, unk=0, kind=None, model=None)
    assert len(v) == 33006 and v.num_units == 1000


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizers"])
def test_ids_equal_hf_autotokenizer(kind, sentencepiece_model, tokenizers_json, tmp_path):
    from transformers import AutoTokenizer

    v = Vocabulary.from_tokenizer(sentencepiece_model if kind == "sentencepiece" else tokenizers_json, num_units=20)
    write_hf_tokenizer(v, tmp_path, model_max_length=256)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == len(v)
    for text in TEXTS:
        assert v.encode(text) == hf(text, add_special_tokens=False)["input_ids"], repr(text)
    assert hf.convert_tokens_to_ids(["<sosp>", "<0>", "<eos>"]) == [v.index["<sosp>"], v.unit_id(0), v.index["<eos>"]]


def test_units_are_single_tokens(sentencepiece_model):
    v = Vocabulary.from_tokenizer(sentencepiece_model, num_units=20)
    assert v.encode("<sosp><4><19><eosp>") == [v.index["<sosp>"], v.unit_id(4), v.unit_id(19), v.index["<eosp>"]]
    # a unit beyond K is not a token: it stays text, as in Hugging Face's tokenizer
    assert v.unit_id(0) + 20 not in v.encode("<20>")


def test_decode_roundtrip(sentencepiece_model):
    v = Vocabulary.from_tokenizer(sentencepiece_model, num_units=20)
    text = "[Human]: hello there<eoh> [SpeechGPT]: <sosp><1><2><eosp><eoa>"
    assert v.decode(v.encode(text)) == text


def test_save_load_keeps_everything(sentencepiece_model, tmp_path):
    v = Vocabulary.from_tokenizer(sentencepiece_model, num_units=20)
    v.save(tmp_path / "vocab.json")
    w = Vocabulary.load(tmp_path)
    assert w == v and w.digest == v.digest
    assert w.encode(TEXTS[6]) == v.encode(TEXTS[6])


def test_existing_speechgpt_tokens_keep_their_ids(sentencepiece_model, tmp_path):
    """A tokenizer that already carries units and SpeechGPT tokens (like SpeechGPT-7B-cm) is kept as is."""
    v = Vocabulary.from_tokenizer(sentencepiece_model, num_units=20)
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    added = {t: i for i, t in enumerate(v.tokens) if i >= v.base_size}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    w = Vocabulary.from_tokenizer(tmp_path)
    assert w.tokens == v.tokens and w.num_units == 20
    with pytest.raises(VocabularyError, match="carries 20 units, but 1000 were asked"):
        Vocabulary.from_tokenizer(tmp_path, num_units=1000)


def test_tokenizer_without_pad_or_unk_gets_a_pad(tokenizers_json):
    v = Vocabulary.from_tokenizer(tokenizers_json, num_units=20)
    assert v.tokens[v.pad] == "<pad>" and v.pad == len(v) - 1
    assert v.tokens[v.bos] == "<|begin_of_text|>" and v.tokens[v.eos] == "<|end_of_text|>"


def test_units_only_vocabulary_refuses_text():
    v = Vocabulary.units_only(10)
    assert len(v) == 3 + 10 + 6
    assert v.encode("<sosp><9><eosp>") == [13, 12, 14]
    with pytest.raises(VocabularyError, match="no text tokenizer"):
        v.encode("hello <sosp>")


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(VocabularyError, match="no such tokenizer"):
        Vocabulary.from_tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(VocabularyError, match="bad.model: not a sentencepiece model"):
        Vocabulary.from_tokenizer(tmp_path / "bad.model")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(VocabularyError, match="no tokenizer found; expected tokenizer.model"):
        Vocabulary.from_tokenizer(empty)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(VocabularyError, match="not a speechgpt-fairseq vocabulary"):
        Vocabulary.load(tmp_path / "vocab.json")
    with pytest.raises(VocabularyError, match="no vocabulary file"):
        Vocabulary.load(empty)


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizers"])
def test_continuation_encodes_as_inside_a_string(kind, sentencepiece_model, tokenizers_json):
    """A response encoded after its prompt gets the ids it has inside the whole string (after an added token)."""
    v = Vocabulary.from_tokenizer(sentencepiece_model if kind == "sentencepiece" else tokenizers_json, num_units=20)
    prompt, response = "[Human]: hello there<eoh> [SpeechGPT]:", " the quick fox<eoa>"
    assert v.encode(prompt) + v.encode(response, continuation=True) == v.encode(prompt + response)
    assert v.encode("<eoh>café")[1:] == v.encode("café", continuation=True)
