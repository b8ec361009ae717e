"""A small LLaMA-style sentencepiece tokenizer trained on the demo corpus's text and prompts."""
from __future__ import annotations

import io
import re

import sentencepiece as spm

from speechgpt_fairseq.data.builders import shipped_templates
from speechgpt_fairseq.data.prompts import SPEECHGPT_COM_FORMATS, chain_of_modality, cross_modal, text_instruction
from speechgpt_fairseq.data.vocabulary import SPEECHGPT_TOKENS
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.units import format_unit_string

# LLaMA's tokenizer.model settings (its trainer and normalizer specs), except character_coverage: LLaMA's
# 0.99995 would send this small corpus's rarest characters to byte fallback. One thread and no sampling of
# the input keep the model file the same from run to run.
TOKENIZER_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
    remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
    num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
)
# What the vocabulary adds after the base tokenizer: the text encoder splits there, sentencepiece never sees it.
_ADDED_TOKENS = re.compile("|".join([r"<\d+>", *map(re.escape, SPEECHGPT_TOKENS)]))


def tokenizer_text(sentences: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    """Every sentence, question and answer, and the text between the added tokens of the stage-2 prompts
    (each sentence as ASR and TTS, instructions from the shipped templates in turn) and of the stage-3 prompts
    (each pair in SpeechGPT's four chain-of-modality formats and as a text instruction): the prompt markup (": ",
    " This is input: ", "<eoa>", "; [ta] ", "; [ua] ", " Answer in text.", ...) as the tokenizer will meet it."""
    asr, tts = shipped_templates("asr"), shipped_templates("tts")
    speech = format_unit_string([0])  # any unit string: split off with the added tokens
    prompts = [cross_modal(asr[i % len(asr)], speech, text) for i, text in enumerate(sentences)]
    prompts += [cross_modal(tts[i % len(tts)], text, speech) for i, text in enumerate(sentences)]
    # they hold all the chain's markup (t2t_restated adds none); with t2t_restated too, the pieces would
    # shift, and with them every figure measured with this tokenizer
    prompts += [chain_of_modality(fmt, q, a, [0], [0]) for q, a in pairs for fmt in SPEECHGPT_COM_FORMATS]
    prompts += [text_instruction(q, a) for q, a in pairs]
    segments = [segment for prompt in prompts for segment in _ADDED_TOKENS.split(prompt) if segment]
    return [*sentences, *(text for pair in pairs for text in pair), *segments]


def train_tokenizer(lines: list[str], vocab_size: int, seed: int) -> bytes:
    """A LLaMA-style sentencepiece model (BPE, byte fallback, unk=0 bos=1 eos=2, no pad) of `lines`."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       **TOKENIZER_OPTIONS)
    except RuntimeError as e:  # e.g. a vocabulary larger than a small corpus allows
        raise InputError(f"training the tokenizer failed (see --vocab-size): {e}") from None
    return model.getvalue()
