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


def tokenizer_dir(tmp_path, tokenizer_json, config: dict, generation: dict | None = None):
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def test_pad_is_never_an_eos_or_bos(tokenizers_json, tmp_path, caplog):
    """fairseq never predicts its padding id: pad = eos would never learn </s>, nor stop generating."""
    caplog.set_level("INFO")
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    v = Vocabulary.from_tokenizer(tokenizer_dir(tmp_path, tokenizers_json, {**names, "pad_token": "<|end_of_text|>",
                                                                            "unk_token": "<|begin_of_text|>"}))
    assert v.tokens[v.pad] == "<pad>" and v.pad == len(v) - 1
    assert "its pad <|end_of_text|> is an eos; its unk <|begin_of_text|> is bos" in caplog.text
    v = Vocabulary.from_tokenizer(tokenizer_dir(tmp_path, tokenizers_json, {**names, "pad_token": "<|end_of_text|>",
                                                                            "unk_token": "a"}))
    assert v.tokens[v.pad] == "a" and v.tokens[-1] == "<eos>"  # unk is free: no row appended


def test_eos_ids_come_from_generation_config(tokenizers_json, tmp_path):
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    v = Vocabulary.from_tokenizer(tokenizer_dir(tmp_path, tokenizers_json, names, {"eos_token_id": [1, 5]}),
                                  num_units=20)
    assert v.eos_ids == [1, 5] and v.eos == 1 and v.pad not in (0, 1, 5)
    assert v.decode([v.index["a"], 5, 1]) == "a"  # every eos is left out of decoded text
    with pytest.raises(VocabularyError, match=r"tok/tokenizer.json: eos ids \[4000\] .* are not tokens"):
        Vocabulary.from_tokenizer(tokenizer_dir(tmp_path, tokenizers_json, names, {"eos_token_id": 4000}))


@pytest.mark.parametrize("config,add_bos", [({}, True), ({"add_bos_token": True}, True),
                                            ({"add_bos_token": False}, False)])
def test_sentencepiece_bos_follows_tokenizer_config(sentencepiece_model, tmp_path, config, add_bos):
    """LlamaTokenizer's documented default adds bos; a tokenizer_config.json that says otherwise is followed."""
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    v = Vocabulary.from_tokenizer(tmp_path, num_units=20)
    assert v.add_bos == add_bos and v.encode_prompt("the fox") == [1] * add_bos + v.encode("the fox")


def test_tokenizers_json_bos_follows_its_post_processor(tokenizers_json, tmp_path):
    from tokenizers import Tokenizer, processors

    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    assert not Vocabulary.from_tokenizer(tokenizer_dir(tmp_path, tokenizers_json, names), num_units=20).add_bos
    tok = Tokenizer.from_file(str(tokenizers_json))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(tmp_path / "llama3.json"))
    v = Vocabulary.from_tokenizer(tokenizer_dir(tmp_path, tmp_path / "llama3.json", names), num_units=20)
    assert v.add_bos and v.encode_prompt("the fox")[0] == 0


def test_dictionary_difference_says_which_tokens_and_ids_differ():
    """What a refused checkpoint's vocabulary differs in: sizes, the first id holding another token, special ids."""
    from speechgpt_fairseq.data.vocabulary import dictionary_difference

    ours = Vocabulary.units_only(40).to_dictionary()
    theirs = Vocabulary.units_only(40).to_dictionary()
    assert dictionary_difference(theirs, ours) == "the same tokens and special ids"
    theirs.symbols[5], theirs.symbols[6] = theirs.symbols[6], theirs.symbols[5]
    assert dictionary_difference(theirs, ours) == (f"2 ids hold other tokens, the first id 5: {ours.symbols[6]!r} "
                                                   f"against {ours.symbols[5]!r}")
    assert dictionary_difference(Vocabulary.units_only(41).to_dictionary(), ours).startswith(
        f"{len(ours) + 1} tokens against {len(ours)}")
    theirs = Vocabulary.units_only(40).to_dictionary()
    theirs.eos_index = 7
    assert dictionary_difference(theirs, ours) == f"eos id 7 against {ours.eos()}"
