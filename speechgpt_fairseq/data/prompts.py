"""SpeechGPT's prompt formats: building instruction examples and splitting them back into their parts.

An example is a SpeechInstruct JSON line `{"prefix": ..., "plain_text": ...}`: `prefix` is an optional system
text, `plain_text` one exchange. Cross-modal (stage 2):

    [Human]: {instruction} This is input: {input}<eoh> [SpeechGPT]: {output}<eoa>

Text-only instructions, mixed into stage 2 as SpeechGPT mixes text instruction data, drop the input part:

    [Human]: {instruction}<eoh> [SpeechGPT]: {output}<eoa>

Chain-of-modality (stage 3), four formats by the modality of instruction and response (S: speech, T: text):

    s2s  [Human]: {SpeechI}<eoh>. [SpeechGPT]: {TextI}; [ta] {TextR}; [ua] {SpeechR}<eoa>.
    s2t  [Human]: {SpeechI} Answer in text.<eoh>. [SpeechGPT]: {TextI}; [ta] {TextR}<eoa>.
    t2s  [Human]: {TextI} Answer in speech.<eoh>. [SpeechGPT]: [ta] {TextR}; [ua] {SpeechR}<eoa>.
    t2t  [Human]: {TextI}<eoh>. [SpeechGPT]: [ta] {TextR}<eoa>.

and one of our own, not SpeechGPT's: text instruction data in the chain's shape, the typed question restated as
the chain restates a spoken one (its transcript) before the answer, so that the step from a transcript to its
answer is also learned for what was only ever read:

    t2t_restated  [Human]: {TextI}<eoh>. [SpeechGPT]: {TextI}; [ta] {TextR}<eoa>.

Speech is always `<sosp>…<eosp>`. A model answers after `[SpeechGPT]:`; everything up to and including it is
the prompt, the rest (with the end of sequence) is the response.

SpeechGPT's own chat (its `cli_infer.py`) prompts differently: a system prefix, then
`[Human]: {request} <eoh>. [SpeechGPT]: `, where the request is the user's text with any audio file after
"is input:" (or a request that is only an audio file) replaced by its units (`speechgpt_prompt`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.units import EOSP, SOSP, format_unit_string

HUMAN = "[Human]"
ASSISTANT = "[SpeechGPT]"
ASSISTANT_TURN = f"{ASSISTANT}:"
EOH, EOA = "<eoh>", "<eoa>"
TEXT_ANSWER, UNIT_ANSWER = "[ta]", "[ua]"

COM_FORMATS = {
    "s2s": "[Human]: {speech_i}<eoh>. [SpeechGPT]: {text_i}; [ta] {text_r}; [ua] {speech_r}<eoa>.",
    "s2t": "[Human]: {speech_i} Answer in text.<eoh>. [SpeechGPT]: {text_i}; [ta] {text_r}<eoa>.",
    "t2s": "[Human]: {text_i} Answer in speech.<eoh>. [SpeechGPT]: [ta] {text_r}; [ua] {speech_r}<eoa>.",
    "t2t": "[Human]: {text_i}<eoh>. [SpeechGPT]: [ta] {text_r}<eoa>.",
    "t2t_restated": "[Human]: {text_i}<eoh>. [SpeechGPT]: {text_i}; [ta] {text_r}<eoa>.",
}
SPEECHGPT_COM_FORMATS = ("s2s", "s2t", "t2s", "t2t")  # the four of SpeechGPT's paper and data

SPEECHGPT_CHAT = "[Human]: {request} <eoh>. [SpeechGPT]: "
INPUT_MARK = "is input:"  # SpeechGPT's chat: ASR and TTS requests put their input after "(t|T)his is input:"

_UNITS = re.compile(r"<sosp>((?:\s*<\d+>)*)\s*(<eosp>)?")
_UNIT = re.compile(r"<(\d+)>")


class PromptFormatError(InputError):
    """Text that does not follow the prompt format; the message says what is missing."""


@dataclass
class Example:
    """One SpeechInstruct line."""

    prefix: str
    plain_text: str

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "plain_text": self.plain_text}


def cross_modal(instruction: str, input: str, output: str) -> str:
    """The plain_text of a cross-modal (ASR/TTS) example."""
    return text_instruction(instruction, output, input)


def text_instruction(instruction: str, output: str, input: str = "") -> str:
    """The plain_text of an instruction in stage 2's format; without an input (text-only instruction data such
    as Alpaca's) the ` This is input: ` part is left out."""
    return f"{instruction_prompt(instruction, input)} {output}{EOA}"


def instruction_prompt(instruction: str, input: str = "") -> str:
    """The prompt of an instruction in stage 2's format, up to and including `[SpeechGPT]:`: what a model answers
    (an ASR prompt is an ASR instruction with a unit string as its input)."""
    human = f"{instruction} This is input: {input}" if input else instruction
    return f"{HUMAN}: {human}{EOH} {ASSISTANT_TURN}"


def chain_of_modality(fmt: str, text_i: str, text_r: str, speech_i: list[int] | None = None,
                      speech_r: list[int] | None = None) -> str:
    """The plain_text of a chain-of-modality example in format `fmt` (one of COM_FORMATS)."""
    if fmt not in COM_FORMATS:
        raise PromptFormatError(f"unknown chain-of-modality format {fmt!r}; expected one of {sorted(COM_FORMATS)}")
    need_si, need_sr = fmt[0] == "s", fmt[2] == "s"
    if need_si and not speech_i or need_sr and not speech_r:
        raise PromptFormatError(f"format {fmt} needs units for the {'instruction' if need_si and not speech_i else 'response'}")
    return COM_FORMATS[fmt].format(
        text_i=text_i, text_r=text_r,
        speech_i=format_unit_string(speech_i) if need_si else "",
        speech_r=format_unit_string(speech_r) if need_sr else "")


def com_prompt(fmt: str, text_i: str | None = None, speech_i: list[int] | None = None) -> str:
    """The prompt of a chain-of-modality format, up to and including `[SpeechGPT]:`, for a question given as
    text (t2*) or as units (s2*): what a model answers in that format."""
    if fmt not in COM_FORMATS:
        raise PromptFormatError(f"unknown chain-of-modality format {fmt!r}; expected one of {sorted(COM_FORMATS)}")
    if (fmt[0] == "s") != (speech_i is not None) or (fmt[0] == "t") != (text_i is not None):
        raise PromptFormatError(f"format {fmt} takes the question as {'units' if fmt[0] == 's' else 'text'}")
    human = COM_FORMATS[fmt][:COM_FORMATS[fmt].index(ASSISTANT_TURN) + len(ASSISTANT_TURN)]
    return human.format(text_i=text_i, speech_i=format_unit_string(speech_i) if speech_i is not None else "")


def speechgpt_prompt(request: str, system: str = "") -> str:
    """SpeechGPT's chat prompt for a request whose speech is already units: `system`, then the request in its
    chat template (the model answers after `[SpeechGPT]: `)."""
    return system + SPEECHGPT_CHAT.format(request=request)


def split_turn(plain_text: str) -> tuple[str, str]:
    """(prompt, response): the prompt ends with the first `[SpeechGPT]:`, the response is what follows."""
    at = plain_text.find(ASSISTANT_TURN)
    if at < 0:
        raise PromptFormatError(f"no '{ASSISTANT_TURN}' in the example: there is no response to learn")
    cut = at + len(ASSISTANT_TURN)
    prompt, response = plain_text[:cut], plain_text[cut:]
    if not response.strip():
        raise PromptFormatError(f"the response after '{ASSISTANT_TURN}' is empty")
    return prompt, response


def units_in(text: str) -> list[int]:
    """Unit ids of the first `<sosp>…` span of `text` (empty when there is none)."""
    m = _UNITS.search(text)
    return [int(u) for u in _UNIT.findall(m.group(1))] if m else []


def strip_answer_end(response: str) -> str:
    """The response without `<eoa>` and whatever follows it (the final period of the CoM formats)."""
    at = response.find(EOA)
    return (response if at < 0 else response[:at]).strip()


def parse_response(response: str) -> dict:
    """Split a model response into its parts.

    Cross-modal: {"text": ...} or {"units": [...]}. Chain-of-modality (has `[ta]`): {"text_i", "text_r",
    "units_r"} with the parts the format carries. The parse is lenient: a part that is missing is absent.
    """
    body = strip_answer_end(response)
    if TEXT_ANSWER not in body:
        if SOSP in body:
            return {"units": units_in(body)}
        return {"text": body}
    before, after = body.split(TEXT_ANSWER, 1)
    parts = {}
    text_i = before.strip().rstrip(";").strip()
    if text_i:
        parts["text_i"] = text_i
    if UNIT_ANSWER in after:
        text_r, speech = after.split(UNIT_ANSWER, 1)
        parts["units_r"] = units_in(speech)
        after = text_r
    parts["text_r"] = after.strip().rstrip(";").strip()
    return parts

