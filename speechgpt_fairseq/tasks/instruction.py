"""Stages 2 and 3: instruction tuning on SpeechInstruct-style examples (cross_modal_sft, com_sft), one base task.

Training reads the examples `speechgpt prepare-sft` binarized, with loss on the segments the loss policy picks,
batched by length (or packed into rows). Under fairseq-generate, any split serves as a prompt-only split: each
example is cut at `[SpeechGPT]:`, the model continues the prompt until `<eoa>` or `</s>`, and fairseq prints
and scores the generated response against the example's own response.
"""
import logging
import re
from dataclasses import dataclass, field

import torch
from fairseq.data import ConcatDataset, ResamplingDataset, data_utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import register_task
from omegaconf import II

from speechgpt_fairseq.data.instruction_dataset import (LOSS_MARKERS, LOSS_POLICIES, LOSS_SEGMENTS, SPEECH,
                                                        InstructionDataset, PackedInstructionDataset)
from speechgpt_fairseq.data.instructions import SEGMENTS_SUFFIX
from speechgpt_fairseq.data.prompts import EOA
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.tasks.base import SpeechGPTTask, TaskDataError, load_split

logger = logging.getLogger(__name__)


@dataclass
class InstructionConfig(FairseqDataclass):
    data: str = field(default="", metadata={"help": "directory written by `speechgpt prepare-sft` (vocab.json, "
                                                    "NAME.bin/.idx, NAME.seg.bin/.idx)"})
    tokens_per_sample: int = field(default=512, metadata={"help": "longest example (tokens); the packed row length"})
    loss_policy: ChoiceEnum(list(LOSS_SEGMENTS)) = field(
        default="response", metadata={"help": "response: only what follows [SpeechGPT]: (the paper); prefix: all "
                                               "but the system prefix (SpeechGPT's released code); all: every token"})
    pack: bool = field(default=False, metadata={"help": "pack several training examples into each row; attention "
                                                        "and positions never cross an example boundary"})
    mix: str = field(default="", metadata={"help": "sources of the training split as NAME:WEIGHT,... (each NAME "
                                                   "binarized in task.data); WEIGHT = copies of that source per epoch "
                                                   "(fractions subsample); NAME:WEIGHT:LOSS gives a source its own "
                                                   "loss policy (those of loss_policy; speech: the response's "
                                                   "spoken answer only; answer: from its text answer's [ta] on); "
                                                   "empty: the split itself"})
    stop_text: str = field(default=EOA, metadata={"help": "generation also ends once the response ends with this "
                                                          "text (SpeechGPT's <eoa>); empty: only at </s>"})
    seed: int = II("common.seed")


def check_lengths(dataset, tokens_per_sample: int, where: str) -> None:
    """Refuse, when a validation or test split loads, examples longer than tokens_per_sample: fairseq would stop
    at them only when it first batches the split, after the first training interval."""
    too_long = int((dataset.sizes > tokens_per_sample).sum())
    if too_long:
        raise TaskDataError(f"{where}: {too_long} of {len(dataset)} examples are longer than "
                            f"task.tokens_per_sample={tokens_per_sample} (the longest has {int(dataset.sizes.max())} "
                            f"tokens): raise task.tokens_per_sample (and model.max_target_positions) or leave them "
                            f"out when building the data")


class InstructionTask(SpeechGPTTask):
    """The shared base of cross_modal_sft and com_sft."""

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        if self.cfg.mix and split == "train":
            dataset = self._mixture(epoch)
        else:
            dataset = self._examples(split)
        if split != "train":  # fairseq skips long training examples with a warning; others it stops at, late
            check_lengths(dataset, self.cfg.tokens_per_sample, f"{self.cfg.data}: split {split}")
        if self.cfg.pack and split == "train":
            dataset = PackedInstructionDataset(dataset, self.cfg.tokens_per_sample, self.dictionary.pad(),
                                               seed=self.cfg.seed, epoch=epoch)
        logger.info(f"{split}: {len(dataset)} samples, {int(dataset.sizes.sum())} tokens")
        self.datasets[split] = dataset

    def _examples(self, name: str, loss_policy: str | None = None) -> InstructionDataset:
        tokens = load_split(self.cfg.data, name)
        try:
            segments = load_split(self.cfg.data, name + SEGMENTS_SUFFIX)
        except TaskDataError:
            raise TaskDataError(f"{self.cfg.data}/{name}{SEGMENTS_SUFFIX}.bin: missing; {name} was not written by "
                                f"`speechgpt prepare-sft`") from None
        loss_policy = loss_policy or self.cfg.loss_policy
        loss_start = None
        if loss_policy == SPEECH:
            if "<sosp>" not in self.dictionary.indices:
                raise InputError(f"task.mix: {name}'s loss is speech, but {self.cfg.data}'s vocabulary has no <sosp>")
            loss_start = [self.dictionary.index("<sosp>")]
        elif loss_policy in LOSS_MARKERS:  # text inside a response: its ids as the tokenizer gives them there
            loss_start = self.vocab.encode(LOSS_MARKERS[loss_policy][0], continuation=True)
        return InstructionDataset(tokens, segments, loss_policy, self.dictionary.pad(), loss_start=loss_start,
                                  name=f"{self.cfg.data}: {name}")

    def _mixture(self, epoch: int):
        parts = []
        for item in self.cfg.mix.split(","):
            fields = item.strip().split(":")
            if len(fields) > 3:
                raise InputError(f"task.mix: {item!r} is not NAME:WEIGHT or NAME:WEIGHT:LOSS")
            name, weight, loss_policy = fields + [""] * (3 - len(fields))
            try:
                weight = float(weight or 1.0)
            except ValueError:
                raise InputError(f"task.mix: {item!r} is not NAME:WEIGHT or NAME:WEIGHT:LOSS") from None
            if weight <= 0:
                raise InputError(f"task.mix: weight of {name!r} must be positive (to train without {name!r}, leave it "
                                 f"out of the mix)")
            if loss_policy and loss_policy not in LOSS_POLICIES:
                raise InputError(f"task.mix: {item!r}: loss {loss_policy!r} is none of {', '.join(LOSS_POLICIES)}")
            ds = self._examples(name, loss_policy)
            parts.append(ds if weight == 1.0 else ResamplingDataset(ds, size_ratio=weight, replace=weight > 1,
                                                                    seed=self.cfg.seed, epoch=epoch))
            logger.info(f"mix: {name} x{weight} -> {round(len(ds) * weight)} examples per epoch"
                        + (f", loss on {loss_policy}" if loss_policy else ""))
        return ConcatDataset(parts)  # even for one source: fairseq's ResamplingDataset alone cannot be batched

    # ---- generation ---------------------------------------------------------------------------
    def build_bpe(self, args):
        """fairseq-generate's D- lines: the vocabulary's text, answer end (`<eoa>`) stripped, for scoring."""
        if getattr(args, "_name", None):
            return super().build_bpe(args)
        return ResponseText(self.vocab, self.cfg.stop_text)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Prompt with each example's system + human turn; the example's response becomes the reference.

        The sample is rewritten in place so that fairseq-generate prints and scores the prompt (S-), the
        reference response (T-) and the generated response (H-/D-).
        """
        if "prompt_lengths" not in sample:
            raise InputError("generation needs whole examples: set task.pack=false")
        pad = self.dictionary.pad()
        lengths = sample["prompt_lengths"].tolist()
        prompts = [ref[:n] for ref, n in zip(sample["references"], lengths)]
        refs = [ref[n:] for ref, n in zip(sample["references"], lengths)]
        sample["net_input"] = {"src_tokens": data_utils.collate_tokens(prompts, pad, left_pad=False),
                               "src_lengths": torch.tensor(lengths)}
        sample["target"] = data_utils.collate_tokens(refs, pad, left_pad=False)
        return generator.generate_prompts(prompts, sample["id"].tolist())


class ResponseText:
    """fairseq's detokenizer hook: space-separated symbols -> text, a trailing answer end removed."""

    def __init__(self, vocab: Vocabulary, stop_text: str):
        self.vocab, self.stop_text = vocab, stop_text
        self.index = vocab.index

    def encode(self, x: str) -> str:
        return x

    def decode(self, x: str) -> str:
        text = self.vocab.decode(self.index[s] for s in x.split(" ") if s in self.index)
        if self.stop_text:  # "…<eoa>" or "…<eoa>." at the very end
            text = re.sub(re.escape(self.stop_text) + r"\W*$", "", text)
        return text.strip()


@dataclass
class CrossModalSFTConfig(InstructionConfig):
    pass


@dataclass
class CoMSFTConfig(InstructionConfig):
    tokens_per_sample: int = field(default=1024, metadata={"help": "longest example (tokens); the packed row length"})


@register_task("cross_modal_sft", dataclass=CrossModalSFTConfig)
class CrossModalSFTTask(InstructionTask):
    """Stage 2: ASR/TTS instructions built from (speech, transcript) pairs, mixed with text instructions."""


@register_task("com_sft", dataclass=CoMSFTConfig)
class CoMSFTTask(InstructionTask):
    """Stage 3: chain-of-modality instructions (transcribe, answer in text, then speak)."""
