"""Generation from Python: load a checkpoint of ours (any stage, LoRA included) and continue prompts.

    from speechgpt_fairseq.inference import SpeechGPTGenerator
    generator = SpeechGPTGenerator.from_checkpoint("checkpoints/stage3/checkpoint_best.pt")
    generator.generate(["[Human]: What is two plus two?<eoh>. [SpeechGPT]:"], max_new_tokens=64)

It runs the code fairseq-generate runs with our tasks (models/generation.py: prompts prefilled, stop at the task's
`<eoa>`), so the two give the same outputs; `conversation()` keeps several turns in one cache (chat). SpeechGPT
sampled with temperature 0.7, top-k 50, top-p 0.8 in its demo (`SPEECHGPT_SAMPLING`).
"""
from __future__ import annotations

import os
import warnings

import torch

from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.models.checkpoints import load_for_inference
from speechgpt_fairseq.models.generation import (SPEECHGPT_SAMPLING, Conversation, Decoding, Endings, Hypothesis,
                                                 generate)

__all__ = ["SPEECHGPT_SAMPLING", "Decoding", "SpeechGPTGenerator"]


class SpeechGPTGenerator:
    """A checkpoint's model with its vocabulary and task's stop text, generating text from text prompts."""

    def __init__(self, model, task):
        self.model, self.task, self.vocab = model.eval(), task, task.vocab
        self.stop_text = getattr(task.cfg, "stop_text", "") or ""
        self.endings = Endings.of(task.target_dictionary, self.stop_text)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> SpeechGPTGenerator:
        """Load a fairseq checkpoint written by training, `speechgpt convert-hf` or `import-peft`."""
        return cls(*load_for_inference(path, device, dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], max_new_tokens: int = 512, decoding: Decoding = Decoding(),
                 seed: int | None = None, min_new_tokens: int = 0) -> list[str]:
        """Continue each prompt text (e.g. ending with `[SpeechGPT]:`); return the generated texts without the
        prompt, ending with the task's stop text (`<eoa>`) when generation stopped there."""
        ids = self.generate_ids([self.vocab.encode_prompt(p) for p in prompts], max_new_tokens, decoding, seed,
                                min_new_tokens)
        return [self.text(i) for i in ids]

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 512, decoding: Decoding = Decoding(),
                     seed: int | None = None, min_new_tokens: int = 0) -> list[list[int]]:
        """Continue prompts given as ids (bos first when the tokenizer adds one, as `vocab.encode_prompt` gives
        them); return the ids of each one's best hypothesis, without the final `</s>`. At most `max_new_tokens`,
        and no eos among the first `min_new_tokens`. With `seed`, each prompt samples from a generator seeded
        with it: the same prompt gets the same sample in any batch."""
        if any(len(p) == 0 for p in prompts):
            raise InputError("an empty prompt: with a tokenizer that adds no bos, a prompt needs at least one token")
        hypos = generate(self.model.decoder, [torch.tensor(p) for p in prompts], self.endings, decoding,
                         max_new_tokens, min_new_tokens, None if seed is None else [seed] * len(prompts))
        return [self.response_ids(beams[0]) for beams in hypos]

    def conversation(self, decoding: Decoding = Decoding(), seed: int | None = None) -> Conversation:
        """A new conversation: `reply(prompt ids, max_new_tokens)` answers each turn after the earlier ones."""
        return Conversation(self.model.decoder, self.endings, decoding, seed)

    def response_ids(self, hypothesis: Hypothesis) -> list[int]:
        """A hypothesis' ids without its closing `</s>`."""
        tokens = hypothesis.tokens
        return tokens[:-1] if tokens and tokens[-1] == self.vocab.eos else tokens

    def text(self, ids: list[int]) -> str:
        """The text of generated ids, cut after the stop text where it occurs."""
        text = self.vocab.decode(ids)
        stop = self.stop_text
        return text[:text.find(stop) + len(stop)] if stop and stop in text else text


_RENAMED = {"SpeechGPTModel": SpeechGPTGenerator, "Sampling": Decoding}  # the names before issue 12


def __getattr__(name: str):
    """The old names still import, with a warning; `generate(..., sampling=)` is now `decoding=`."""
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"speechgpt_fairseq.inference.{name} is now {new.__name__}", DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
