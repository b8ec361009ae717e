"""Stage 1, modality-adaptation pretraining: next-token prediction on unit sequences of unlabelled speech."""

import logging
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import register_task
from omegaconf import II

from speechgpt_fairseq.data.lm_dataset import PackedBlocksDataset, RecordDataset
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
        """Continue each utterance of the split: the prompt is the record (bos first when the tokenizer adds one);
        the generator starts from its first token and is forced through the rest."""
        if self.cfg.sample_break_mode != "eos":
            raise ValueError("generation continues whole utterances: pass --sample-break-mode eos")
        src = sample["net_input"]["src_tokens"]
        return generator.generate(models, sample, prefix_tokens=src[:, 1:], constraints=constraints,
                                  bos_token=src[:, 0])
