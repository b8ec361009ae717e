"""What every SpeechGPT task shares: the vocabulary of the data directory, carried into checkpoints, and the
generator fairseq-generate runs (models/generation.py: prompts prefilled, per-prompt limits, stop text)."""
import logging
from pathlib import Path

import torch
from fairseq.data import MMapIndexedDataset
from fairseq.optim.amp_optimizer import AMPOptimizer
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

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's training step; with `common.amp=true` on the CPU, the forward pass runs under bf16 autocast.

        fairseq's amp is CUDA's fp16 autocast with a loss scaler: on the CPU its autocast does nothing and its
        scaler turns itself off. Here the matmuls run in bf16 while the weights, their gradients and the optimizer
        state stay fp32 (bf16 keeps fp32's exponent range, so no loss scaling is needed)."""
        if not (isinstance(optimizer, AMPOptimizer) and next(model.parameters()).device.type == "cpu"):
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        model.train()
        model.set_num_updates(update_num)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        optimizer.backward(loss)
        return loss, sample_size, logging_output

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
