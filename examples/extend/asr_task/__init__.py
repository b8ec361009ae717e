"""A worked extension of speechgpt-fairseq through fairseq's --user-dir: the task `asr_sft`, stage-2 data
restricted to its ASR examples (speech in, text out), for training or evaluating speech recognition alone.

fairseq imports this directory as a package when `common.user_dir` (or --user-dir) names it. Importing one of
speechgpt_fairseq's tasks registers all our tasks, criterion and model; the task below builds on cross_modal_sft.
"""
import numpy as np
from fairseq.data import BaseWrapperDataset
from fairseq.tasks import register_task

from speechgpt_fairseq.tasks.instruction import CrossModalSFTConfig, CrossModalSFTTask


class Subset(BaseWrapperDataset):
    """The examples `indices` of `dataset`, renumbered 0..len-1."""

    def __init__(self, dataset, indices):
        super().__init__(dataset)
        self.indices = np.asarray(indices, dtype=np.int64)
        self._sizes = dataset.sizes[self.indices]

    @property
    def sizes(self):
        return self._sizes

    def __getitem__(self, index):
        return {**self.dataset[self.indices[index]], "id": index}

    def __len__(self):
        return len(self.indices)

    def num_tokens(self, index):
        return int(self._sizes[index])

    def size(self, index):
        return int(self._sizes[index])

    def ordered_indices(self):
        return np.argsort(self._sizes, kind="mergesort")


@register_task("asr_sft", dataclass=CrossModalSFTConfig)
class ASRSFTTask(CrossModalSFTTask):
    """cross_modal_sft, keeping the examples whose response is text (ASR); TTS examples are left out."""

    def _examples(self, name):
        examples = super()._examples(name)
        sosp = self.dictionary.index("<sosp>")
        keep = []
        for i in range(len(examples)):
            example = examples[i]
            if sosp not in example["reference"][example["prompt_length"]:]:  # no speech in the response
                keep.append(i)
        return Subset(examples, keep)
