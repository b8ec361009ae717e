"""Spoken chat: a question as text or speech in, the answer as text and speech out (chain-of-modality).

A spoken question becomes units (speech2unit, repeats merged), the chain-of-modality prompt is built for the
modalities asked for, the model generates (inference.py), the response is parsed into its parts (TextI /
`[ta]` TextR / `[ua]` SpeechR), and the spoken answer is vocoded. One turn per question, as SpeechGPT's demo, or
with `multi_turn` a conversation: each question goes after the earlier questions and answers, held in one cache.

With `prompt_style="speechgpt"` the prompt is SpeechGPT's own chat prompt instead (data/prompts.py): the system
prefix, then the request as typed, any audio file after "is input:" (or a request that is only an audio file)
turned into units; the released SpeechGPT-7B-com was prompted so, with up to 2048 new tokens and at least 10.

    from speechgpt_fairseq.chat import SpokenChat
    chat = SpokenChat.from_files("checkpoints/stage3/checkpoint_best.pt", kmeans="km1000.bin",
                                 hubert="mhubert_base_vp_en_es_fr_it3.pt", vocoder="vocoder.pt",
                                 vocoder_config="config.json")
    turn = chat.respond("question.wav")      # or chat.respond("What is the capital of France?")
    turn.transcript, turn.text, turn.units, turn.audio
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from speechgpt_fairseq.data.prompts import INPUT_MARK, com_prompt, parse_response, speechgpt_prompt
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.inference import SpeechGPTGenerator
from speechgpt_fairseq.models.generation import SPEECHGPT_SAMPLING, Decoding
from speechgpt_fairseq.speech.audio import AUDIO_EXTENSIONS
from speechgpt_fairseq.speech.units import dedup_units, format_unit_string

logger = logging.getLogger(__name__)

PROMPT_STYLES = ("com", "speechgpt")
# new-token limits (max, min) of each prompt style: ours, and SpeechGPT's cli_infer.py
DEFAULT_LENGTHS = {"com": (512, 0), "speechgpt": (2048, 10)}


@dataclass
class ChatTurn:
    """One question and its answer, in every part the model produced."""

    question: str
    prompt: str
    response: str
    transcript: str | None = None  # TextI: the model's transcription of a spoken question
    text: str | None = None  # TextR: the answer in text
    units: list[int] = field(default_factory=list)  # SpeechR: the spoken answer as units
    audio: np.ndarray | None = None  # the spoken answer, vocoded


class SpokenChat:
    """Answers questions with a chain-of-modality model.

    `speech_to_units(path) -> units` and `units_to_speech(units) -> waveform` are optional: without the first
    only text questions are accepted, without the second spoken answers stay units. With `multi_turn`, each
    question continues the conversation (the system prefix comes once, before the first).
    """

    def __init__(self, model: SpeechGPTGenerator, speech_to_units: Callable[[Path], list[int]] | None = None,
                 units_to_speech: Callable[[list[int]], np.ndarray] | None = None, system_prefix: str = "",
                 decoding: Decoding = SPEECHGPT_SAMPLING, max_new_tokens: int | None = None, seed: int | None = None,
                 prompt_style: str = "com", min_new_tokens: int | None = None, multi_turn: bool = False):
        if prompt_style not in PROMPT_STYLES:
            raise InputError(f"prompt style {prompt_style!r}: expected one of {PROMPT_STYLES}")
        self.model, self.speech_to_units, self.units_to_speech = model, speech_to_units, units_to_speech
        self.system_prefix, self.decoding, self.seed, self.prompt_style = system_prefix, decoding, seed, prompt_style
        self.conversation = model.conversation(decoding, seed) if multi_turn else None
        default_max, default_min = DEFAULT_LENGTHS[prompt_style]
        self.max_new_tokens = default_max if max_new_tokens is None else max_new_tokens
        self.min_new_tokens = default_min if min_new_tokens is None else min_new_tokens

    @classmethod
    def from_files(cls, model: str | Path, kmeans: str | Path | None = None, hubert: str | Path | None = None,
                   layer: int = 11, vocoder: str | Path | None = None, vocoder_config: str | Path | None = None,
                   speaker: int | None = None, device: str = "cpu", bf16: bool = False, **kwargs) -> SpokenChat:
        """Load a checkpoint of ours and, optionally, speech2unit (k-means, with HuBERT or MFCC features) and a
        unit vocoder; their unit counts are checked against the model's vocabulary. `bf16` keeps the model's
        weights in bfloat16 (half the memory: a 7B model in about 14 GB)."""
        import torch

        loaded = SpeechGPTGenerator.from_checkpoint(model, device=device, dtype=torch.bfloat16 if bf16 else None)
        num_units = loaded.vocab.num_units
        task = loaded.task.cfg._name
        if task != "com_sft":
            logger.warning("%s was trained with task %s; chain-of-modality answers come from com_sft models",
                           model, task)
        speech_to_units = units_to_speech = None
        if kmeans is not None:
            from speechgpt_fairseq.speech.speech2unit import SpeechToUnits

            speech_to_units = SpeechToUnits(kmeans, hubert=hubert, layer=layer, device=device)
            if speech_to_units.num_units != num_units:
                raise InputError(f"{kmeans}: has {speech_to_units.num_units} clusters, but {model} reads "
                                 f"{num_units} units")
        elif hubert is not None:
            raise InputError(f"{hubert}: a HuBERT checkpoint needs the k-means model of its units (kmeans)")
        if vocoder is not None and str(vocoder).endswith(".npz"):
            from speechgpt_fairseq.speech.exemplar_vocoder import ExemplarVocoder

            units_to_speech = ExemplarVocoder.load(vocoder)
            if units_to_speech.num_units != num_units:
                raise InputError(f"{vocoder}: the vocoder speaks {units_to_speech.num_units} units, but {model} "
                                 f"writes {num_units}: units of another k-means")
        elif (vocoder is None) != (vocoder_config is None):
            raise InputError("a vocoder needs both its checkpoint and its config.json (or is an exemplar .npz)")
        elif vocoder is not None:
            from speechgpt_fairseq.speech.vocoder import UnitVocoder

            unit_vocoder = UnitVocoder.from_files(vocoder, vocoder_config, device=device)
            if unit_vocoder.num_units != num_units:
                raise InputError(f"{vocoder_config}: the vocoder speaks {unit_vocoder.num_units} units, but "
                                 f"{model} writes {num_units}: units of another k-means")
            unit_vocoder.check([0], speaker)  # a speaker is chosen when the vocoder needs one

            def units_to_speech(units: list[int]) -> np.ndarray:
                return unit_vocoder(units, speaker)

            units_to_speech.sample_rate = unit_vocoder.sample_rate
        return cls(loaded, speech_to_units, units_to_speech, **kwargs)

    @property
    def sample_rate(self) -> int | None:
        """Sample rate of the spoken answers (None without a vocoder)."""
        return getattr(self.units_to_speech, "sample_rate", None)

    def prompt_for(self, question: str | Path, speak: bool = True) -> str:
        """The prompt for a question: a path to an audio file is a spoken question, anything else text. In the
        speechgpt style the question is a request as SpeechGPT's chat takes it, and `speak` is not used."""
        if not str(question).strip():
            raise InputError("an empty question")
        system = self.system_prefix if self.conversation is None or not self.conversation.length else ""
        if self.prompt_style == "speechgpt":
            return speechgpt_prompt(self.request_units(str(question)), system)
        if names_audio_file(question):
            return system + com_prompt("s2s" if speak else "s2t", speech_i=self.units_of(question))
        text = " ".join(str(question).split())
        return system + com_prompt("t2s" if speak else "t2t", text_i=text)

    def units_of(self, audio: str | Path) -> list[int]:
        """The units of an audio file, repeats merged, as the model was trained on them."""
        path = Path(str(audio).strip())
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such audio file")
        if self.speech_to_units is None:
            raise InputError(f"{audio}: a spoken question needs speech2unit (a k-means model, and a HuBERT "
                             f"checkpoint or MFCC features)")
        units = dedup_units(self.speech_to_units(path))
        if not units:
            raise InputError(f"{audio}: no speech units came out of this audio")
        return units

    def request_units(self, request: str) -> str:
        """A request as SpeechGPT's chat rewrites it: each part around "is input:" that names an audio file (or the
        whole request, when it is one) becomes that audio's unit string, without the spaces around the path."""
        parts = request.split(INPUT_MARK)
        return INPUT_MARK.join(format_unit_string(self.units_of(part)) if names_audio_file(part) else part
                               for part in parts)

    def respond(self, question: str | Path, speak: bool = True) -> ChatTurn:
        """Answer one question; with `speak`, in text and in speech (vocoded when a vocoder is loaded)."""
        prompt = self.prompt_for(question, speak)
        if self.conversation is None:
            response = self.model.generate([prompt], max_new_tokens=self.max_new_tokens, decoding=self.decoding,
                                           seed=self.seed, min_new_tokens=self.min_new_tokens)[0]
        else:
            vocab = self.model.vocab
            ids = vocab.encode(prompt, continuation=True) if self.conversation.length else vocab.encode_prompt(prompt)
            answer = self.conversation.reply(ids, self.max_new_tokens, self.min_new_tokens)
            response = self.model.text(self.model.response_ids(answer))
        parts = parse_response(response)
        turn = ChatTurn(str(question), prompt, response, transcript=parts.get("text_i"),
                        text=parts.get("text_r", parts.get("text")),
                        units=parts.get("units_r", parts.get("units", [])))
        if turn.units and self.units_to_speech is not None:
            turn.audio = self.units_to_speech(turn.units)
        return turn


def names_audio_file(question: str | Path) -> bool:
    """True when the question is a path to an audio file (one word ending in an audio extension, or a Path)."""
    text = str(question).strip()
    return isinstance(question, Path) or (len(text.split()) == 1 and Path(text).suffix.lower() in AUDIO_EXTENSIONS)
