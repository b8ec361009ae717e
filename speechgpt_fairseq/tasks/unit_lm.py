"""Stage 1, modality-adaptation pretraining: next-token prediction on unit sequences of unlabelled speech."""

import logging
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import register_task
from omegaconf import II

from speechgpt_fairseq.data.lm_dataset import PackedBlocksDataset, RecordDataset
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.tasks.base import SpeechGPTTask, load_split

logger = logging.getLogger(__name__)


@dataclass
class UnitLMConfig(FairseqDataclass):
    data: str = field(default="", metadata={"help": "directory written by `speechgpt prepare-units` (vocab.json, "
                                                    "SPLIT.bin/.idx)"})
    tokens_per_sample: int = field(default=1024, metadata={"help": "length of a packed training block"})
    sample_break_mode: ChoiceEnum(["none", "eos"]) = field(
        default="none", metadata={"help": "none: pack utterances into tokens_per_sample blocks (training); "
                                          "eos: one utterance per sample (generation, per-utterance scoring)"})
    seed: int = II("common.seed")


@register_task("unit_lm", dataclass=UnitLMConfig)
class UnitLMTask(SpeechGPTTask):
    """Language modeling on `<sosp> units <eosp>` utterances."""

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        records = load_split(self.cfg.data, split)
        d = self.dictionary
        if self.cfg.sample_break_mode == "none":
            dataset = PackedBlocksDataset(records, self.cfg.tokens_per_sample, d.eos(), d.pad())
        else:
            dataset = RecordDataset(records, d.eos(), d.pad())
        logger.info(f"{split}: {len(records)} utterances, {int(records.sizes.sum())} tokens -> {len(dataset)} samples")
        self.datasets[split] = dataset

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Continue each utterance of the split (bos first when the tokenizer adds one). A hypothesis holds the
        utterance after its first token, as fairseq prints a forced prefix, then the continuation; the
        utterance's tokens score 0 (given, not generated)."""
        if self.cfg.sample_break_mode != "eos":
            raise InputError("generation continues whole utterances: pass --sample-break-mode eos")
        net_input = sample["net_input"]
        prompts = [row[:n] for row, n in zip(net_input["src_tokens"], net_input["src_lengths"].tolist())]
        hypos = generator.generate_prompts(prompts, sample["id"].tolist())
        for prompt, beams in zip(prompts, hypos):
            given = prompt[1:].to(beams[0]["tokens"].device)
            for h in beams:
                h["tokens"] = torch.cat([given, h["tokens"]])
                h["positional_scores"] = torch.cat([h["positional_scores"].new_zeros(len(given)),
                                                    h["positional_scores"]])
        return hypos
