"""Loss policies, length bucketing and packing of instruction examples."""
import numpy as np
import pytest
import torch

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.data.instruction_dataset import (InstructionDataset, PackedInstructionDataset,
                                                        best_fit_decreasing)
from speechgpt_fairseq.data.instructions import PROMPT, RESPONSE, SYSTEM


class Records:
    """A stand-in for an MMapIndexedDataset: a list of tensors with sizes."""

    def __init__(self, rows):
        self.rows = [torch.tensor(r) for r in rows]
        self.sizes = np.array([len(r) for r in rows])

    def __getitem__(self, i):
        return self.rows[i]

    def __len__(self):
        return len(self.rows)


# records as prepare-sft writes them: bos (1) when the tokenizer adds one, the text, </s> (2)
TOKENS = Records([[1, 10, 11, 12, 13, 2], [1, 20, 21, 22, 2], [30, 31, 32, 33, 34, 35, 2]])
SEGS = Records([[SYSTEM, SYSTEM, PROMPT, PROMPT, RESPONSE, RESPONSE], [PROMPT, PROMPT, PROMPT, RESPONSE, RESPONSE],
                [SYSTEM, SYSTEM, PROMPT, RESPONSE, RESPONSE, RESPONSE, RESPONSE]])


@pytest.mark.parametrize("policy,expected", [
    ("response", [0, 0, 0, 13, 2]), ("prefix", [0, 11, 12, 13, 2]), ("all", [10, 11, 12, 13, 2])])
def test_loss_policies(policy, expected):
    ds = InstructionDataset(TOKENS, SEGS, policy, pad=0)
    item = ds[0]
    assert item["source"].tolist() == [1, 10, 11, 12, 13]
    assert item["target"].tolist() == expected
    assert item["prompt_length"] == 4 and item["reference"].tolist() == [1, 10, 11, 12, 13, 2]


def test_a_record_without_bos_predicts_from_its_first_token():
    """A tokenizer that adds no bos: the first token is read, never predicted; </s> is still a target."""
    item = InstructionDataset(TOKENS, SEGS, "all", pad=0)[2]
    assert item["source"].tolist() == [30, 31, 32, 33, 34, 35]
    assert item["target"].tolist() == [31, 32, 33, 34, 35, 2]


def test_batches_are_length_bucketed():
    ds = InstructionDataset(TOKENS, SEGS, "response", pad=0)
    order = ds.ordered_indices()
    assert list(ds.sizes[order]) == sorted(ds.sizes)


def test_best_fit_decreasing_keeps_every_example_once():
    sizes = np.random.default_rng(0).integers(5, 600, 5000)
    rows = best_fit_decreasing(sizes, 1024, seed=1)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(sizes)))
    fill = np.array([sizes[r].sum() for r in rows])
    assert fill.max() <= 1024 and sizes.sum() / (1024 * len(rows)) > 0.97


def test_packed_loss_equals_the_examples_alone():
    """Packing changes batching only: the summed loss is the sum of each example's own loss."""
    from speechgpt_fairseq.data.vocabulary import Vocabulary
    from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

    torch.manual_seed(0)
    model = SpeechGPTLlamaModel.from_config(SpeechGPTLlamaConfig(decoder_kv_heads=2, init_std=0.3),
                                            Vocabulary.units_only(40).to_dictionary()).eval()
    ds = InstructionDataset(TOKENS, SEGS, "prefix", pad=0)
    packed = PackedInstructionDataset(ds, row_tokens=12, pad=0)
    assert len(packed) == 2

    def loss(batch):
        logits, _ = model(**batch["net_input"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=0,
                                                 reduction="sum")

    together = loss(packed.collater([packed[i] for i in range(len(packed))]))
    alone = sum(loss(ds.collater([ds[i]])) for i in range(len(ds)))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_packing_refuses_examples_longer_than_a_row():
    ds = InstructionDataset(TOKENS, SEGS, "response", pad=0)
    with pytest.raises(ValueError, match="1 examples are longer than a packed row of 5 tokens"):
        PackedInstructionDataset(ds, row_tokens=5, pad=0)
