"""Instruction data for stages 2 and 3: SpeechInstruct JSON lines, streamed, encoded with a segment label per token.

Each example becomes the ids of `prefix + plain_text` as the tokenizer gives them (bos first when it adds one),
then `</s>`, and three segments: SYSTEM (the `prefix`), PROMPT (the human turn up to and including
`[SpeechGPT]:`) and RESPONSE (the rest and the end of sequence). The task chooses from the segments which tokens
carry loss, so one binarization serves every loss policy.

With the standard text encoding the prompt and the response are encoded separately, the response as a
continuation: the ids a model sees in training are the ids it sees when it is prompted with the human turn and
generates the rest. With SpeechGPT's (transformers-4.33-slow) the whole text is encoded at once, as SpeechGPT's
training did, and the segments follow the ids the parts share with it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

from speechgpt_fairseq.data.binarize import BinarizeError, SplitStats, binarize_splits
from speechgpt_fairseq.data.prompts import Example, PromptFormatError, split_turn
from speechgpt_fairseq.data.vocabulary import SLOW_433, Vocabulary
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.units import UnitFormatError, parse_unit_string
from speechgpt_fairseq.text_files import not_utf8, open_text

SYSTEM, PROMPT, RESPONSE = 0, 1, 2
SEGMENTS_SUFFIX = ".seg"  # NAME.seg.bin/.idx beside NAME.bin/.idx
_SPEECH_SPAN = re.compile(r"<sosp>.*?(?:<eosp>|$)", re.DOTALL)


def check_units(text: str, num_units: int) -> None:
    """Every `<sosp>…<eosp>` span holds units below K and nothing else."""
    for span in _SPEECH_SPAN.findall(text):
        parse_unit_string(span, num_units)


def encode_example(ex: Example, vocab: Vocabulary) -> tuple[list[int], list[int]]:
    """(token ids, segment labels) of one example: the tokenizer's bos when it adds one, the text, </s>."""
    prompt, response = split_turn(ex.plain_text)
    check_units(ex.plain_text, vocab.num_units)
    if vocab.text_encoding == SLOW_433:
        ids, segs = _encode_whole(ex.prefix, prompt, response, vocab)
    else:
        ids, segs = _encode_parts(ex.prefix, prompt, response, vocab)
    first = SYSTEM if ex.prefix else PROMPT
    return vocab.bos_ids + ids + [vocab.eos], [first] * len(vocab.bos_ids) + segs + [RESPONSE]


def _encode_parts(prefix: str, prompt: str, response: str, vocab: Vocabulary) -> tuple[list[int], list[int]]:
    """Each part encoded on its own, the later ones as continuations of the text before them."""
    ids, segs = [], []
    for text, seg, continuation in ((prefix, SYSTEM, False), (prompt, PROMPT, bool(prefix)),
                                    (response, RESPONSE, True)):
        if text:
            part = vocab.encode(text, continuation=continuation)
            ids += part
            segs += [seg] * len(part)
    return ids, segs


def _encode_whole(prefix: str, prompt: str, response: str, vocab: Vocabulary) -> tuple[list[int], list[int]]:
    """The three parts encoded as one text; a token belongs to the first part whose own encoding (with the parts
    before it) starts with it. (SpeechGPT's tokenizer drops the newline that ends its system prefix, for one.)"""
    ids = vocab.encode(prefix + prompt + response)
    n_system = shared_length(vocab.encode(prefix), ids) if prefix else 0
    n_prompt = shared_length(vocab.encode(prefix + prompt), ids)
    return ids, [SYSTEM] * n_system + [PROMPT] * (n_prompt - n_system) + [RESPONSE] * (len(ids) - n_prompt)


def shared_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_examples(path: str | os.PathLike, vocab: Vocabulary, stats: SplitStats, skip_bad: bool = False,
                  ) -> Iterator[tuple[list[int], list[int]]]:
    """Encoded examples of a JSON-lines file, read line by line (memory does not grow with the file).

    Bad lines raise BinarizeError naming the file and line; with `skip_bad` they are skipped and counted in
    `stats` by reason. Empty lines are always skipped and counted.
    """
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                stats.skip("empty line")
                continue
            try:
                if bad := not_utf8(line):
                    raise BadLine("not UTF-8", bad)
                yield encode_example(parse_line(line), vocab)
            except (BadLine, PromptFormatError, UnitFormatError) as e:
                if not skip_bad:
                    raise BinarizeError(f"{path}:{lineno}: {e}") from None
                stats.skip(e.reason if isinstance(e, BadLine) else
                           "not a SpeechGPT exchange" if isinstance(e, PromptFormatError) else "bad speech units")


class BadLine(InputError):
    """A line that is not a SpeechInstruct record; `reason` is its short, countable kind."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_system_prefix(path: str | os.PathLike) -> str:
    """The system prompt of a SpeechInstruct file: the first non-empty `prefix` (the released files repeat one)."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if bad := not_utf8(line):
                    raise BadLine("not UTF-8", bad)
                prefix = parse_line(line).prefix
            except BadLine as e:
                raise BinarizeError(f"{path}:{lineno}: {e}") from None
            if prefix:
                return prefix
    raise BinarizeError(f"{path}: no record with a non-empty 'prefix' (the system prompt)")


def parse_line(line: str) -> Example:
    """One SpeechInstruct JSON line: an object with string fields `prefix` and `plain_text`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine("malformed JSON", f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadLine("not an object", f"expected a JSON object with 'prefix' and 'plain_text', found "
                                       f"{type(record).__name__}")
    for key in ("prefix", "plain_text"):
        if not isinstance(record.get(key), str):
            raise BadLine("missing field", f"missing field {key!r} (a string) in a SpeechInstruct line")
    return Example(record["prefix"], record["plain_text"])


def prepare_instructions(splits: dict[str, str | list[str]], out: str | os.PathLike, vocab: Vocabulary, skip_bad: bool = False,
                         show_progress: bool = True, overwrite: bool = False,
                         inputs: Iterable[str | os.PathLike] = ()) -> list[SplitStats]:
    """Binarize JSON-lines files into the data directory `out`: NAME.bin/.idx (tokens), NAME.seg.bin/.idx
    (segments), vocab.json; `out` is written as `binarize_splits` says (`overwrite` to replace an earlier one)."""
    return binarize_splits(
        splits, out, vocab, read=lambda name, path, stats: read_examples(path, vocab, stats, skip_bad),
        channels=lambda scratch, name: [(scratch / name, len(vocab)),
                                        (scratch / f"{name}{SEGMENTS_SUFFIX}", RESPONSE + 1)],
        what="examples", show_progress=show_progress, overwrite=overwrite, inputs=inputs)
