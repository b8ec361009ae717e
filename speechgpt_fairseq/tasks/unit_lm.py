"""Stage 1, modality-adaptation pretraining: next-token prediction on unit sequences of unlabelled speech."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fairseq.data import MMapIndexedDataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from speechgpt_fairseq.data.lm_dataset import PackedBlocksDataset, RecordDataset
from speechgpt_fairseq.data.vocabulary import Vocabulary, VocabularyError
from speechgpt_fairseq.models.generation import PromptPrefillGenerator

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


class TaskDataError(FileNotFoundError):
    """A data directory or split that is missing, with what was expected there."""


@register_task("unit_lm", dataclass=UnitLMConfig)
class UnitLMTask(FairseqTask):
    """Language modeling on `<sosp> units <eosp>` utterances; checkpoints carry the vocabulary (task state)."""

    def __init__(self, cfg: UnitLMConfig, vocab: Vocabulary):
        super().__init__(cfg)
        self.vocab = vocab
        self.dictionary = vocab.to_dictionary()

    @classmethod
    def setup_task(cls, cfg: UnitLMConfig, **kwargs):
        vocab = load_data_vocabulary(cfg.data)
        logger.info(f"vocabulary: {len(vocab)} tokens ({vocab.num_units} units, base {vocab.base_size})")
        return cls(cfg, vocab)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        records = load_split(self.cfg.data, split)
        d = self.dictionary
        if self.cfg.sample_break_mode == "none":
            dataset = PackedBlocksDataset(records, self.cfg.tokens_per_sample, d.bos(), d.eos(), d.pad())
        else:
            dataset = RecordDataset(records, d.bos(), d.eos(), d.pad())
        logger.info(f"{split}: {len(records)} utterances, {int(records.sizes.sum())} tokens -> {len(dataset)} samples")
        self.datasets[split] = dataset

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary

    def max_positions(self):
        return self.cfg.tokens_per_sample

    def state_dict(self):
        return {"vocabulary": self.vocab.to_dict()}

    def load_state_dict(self, state_dict):
        pass  # the data directory's vocabulary rules; a checkpoint of another one is refused by the model

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **kwargs):
        return super().build_generator(models, args, seq_gen_cls=seq_gen_cls or PromptPrefillGenerator,
                                       extra_gen_cls_kwargs=extra_gen_cls_kwargs, **kwargs)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Continue each utterance of the split: the prompt is the record, the bos the generator starts from."""
        if self.cfg.sample_break_mode != "eos":
            raise ValueError("generation continues whole utterances: pass --sample-break-mode eos")
        if prefix_tokens is None:
            prefix_tokens = sample["net_input"]["src_tokens"][:, 1:]  # drop <s>
        return generator.generate(models, sample, prefix_tokens=prefix_tokens, constraints=constraints,
                                  bos_token=self.dictionary.bos())


def load_data_vocabulary(data: str) -> Vocabulary:
    if not data:
        raise TaskDataError("task.data is not set: give the directory written by `speechgpt prepare-units`")
    if not Path(data).is_dir():
        raise TaskDataError(f"{data}: no such data directory (task.data; relative paths start at the working "
                            f"directory {Path.cwd()})")
    try:
        return Vocabulary.load(data)
    except VocabularyError as e:
        raise TaskDataError(str(e)) from None


def load_split(data: str, split: str) -> MMapIndexedDataset:
    prefix = str(Path(data) / split)
    if not (Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()):
        raise TaskDataError(f"{prefix}.bin/.idx: split {split!r} not found in {data} "
                            f"(binarize it with `speechgpt prepare-units ... {split}=FILE`)")
    return MMapIndexedDataset(prefix)
