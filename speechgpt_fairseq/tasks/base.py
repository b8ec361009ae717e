"""What every SpeechGPT task shares: the vocabulary of the data directory, carried into checkpoints, and the
generator fairseq-generate runs (models/generation.py: prompts prefilled, per-prompt limits, stop text)."""
import logging
from pathlib import Path

from fairseq.data import MMapIndexedDataset
from fairseq.tasks import FairseqTask

from speechgpt_fairseq.data.vocabulary import VOCAB_FILE, Vocabulary, VocabularyError, read_vocab_json, records_hold_bos
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.models.generation import FairseqGenerator

logger = logging.getLogger(__name__)


class TaskDataError(FileNotFoundError):
    """A data directory or split that is missing, with what was expected there."""


class SpeechGPTTask(FairseqTask):
    """A task over one data directory (`cfg.data`) and its vocab.json; checkpoints carry the vocabulary in
    their task state, which `speechgpt export-hf` and the Python API read."""

    def __init__(self, cfg, vocab: Vocabulary):
        super().__init__(cfg)
        self.vocab = vocab
        self.dictionary = vocab.to_dictionary()

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        vocab = load_data_vocabulary(cfg.data)
        logger.info(f"vocabulary: {vocab.describe()}")
        return cls(cfg, vocab)

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
        """Our generator (models/generation.py) for one model; fairseq-generate's language-model fusion
        (--lm-path) and other generator classes are refused."""
        extra = dict(extra_gen_cls_kwargs or {})
        extra.pop("lm_weight", None)
        if extra.pop("lm_model", None) is not None or seq_gen_cls is not None or kwargs.get("prefix_allowed_tokens_fn"):
            raise InputError("--lm-path, another generator class and prefix_allowed_tokens_fn are not supported by "
                             "our tasks' generator")
        if len(models) != 1:
            raise InputError(f"{len(models)} models: our tasks generate with one model (no ensembles)")
        return FairseqGenerator(models[0], self.target_dictionary, args,
                                stop_text=getattr(self.cfg, "stop_text", None), **extra)


def load_data_vocabulary(data: str) -> Vocabulary:
    if not data:
        raise TaskDataError("task.data is not set: give the directory written by `speechgpt prepare-units` or "
                            "`speechgpt prepare-sft`")
    if not Path(data).is_dir():
        raise TaskDataError(f"{data}: no such data directory (task.data; relative paths start at the working "
                            f"directory {Path.cwd()})")
    try:
        raw = read_vocab_json(data)
        vocab = Vocabulary.from_dict(raw, source=Path(data) / VOCAB_FILE)
    except VocabularyError as e:
        raise TaskDataError(str(e)) from None
    if not records_hold_bos(raw):
        raise TaskDataError(f"{Path(data) / VOCAB_FILE}: written by an earlier speechgpt-fairseq, whose records do not "
                            f"start with the tokenizer's bos; binarize the data again (speechgpt prepare-units / "
                            f"prepare-sft)")
    return vocab


def load_split(data: str, split: str) -> MMapIndexedDataset:
    prefix = str(Path(data) / split)
    if not (Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()):
        raise TaskDataError(f"{prefix}.bin/.idx: split {split!r} not found in {data} "
                            f"(binarize it with `speechgpt prepare-units` or `prepare-sft` ... {split}=FILE)")
    return MMapIndexedDataset(prefix)
