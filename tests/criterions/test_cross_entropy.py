"""The criterion: loss only where the target is not pad, split by modality, label smoothing on the loss only."""
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq import metrics

import speechgpt_fairseq  # noqa: F401
from speechgpt_fairseq.criterions.cross_entropy import SpeechGPTCrossEntropyCriterion
from speechgpt_fairseq.data.vocabulary import Vocabulary

VOCAB = Vocabulary.units_only(6)  # ids: 0-2 specials, 3-8 units, 9-14 SpeechGPT tokens


class Task:
    vocab = VOCAB
    target_dictionary = VOCAB.to_dictionary()


class FixedLogits(torch.nn.Module):
    """A "model" returning given logits, so the expected numbers can be computed by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, src_tokens, src_lengths=None):
        return self.logits, {}


def sample_and_logits():
    torch.manual_seed(0)
    target = torch.tensor([[9, 3, 4, 10, 2], [9, 5, 0, 0, 0]])  # <sosp> units <eosp> </s>; row 2 padded
    logits = torch.randn(2, 5, len(VOCAB))
    sample = {"net_input": {"src_tokens": target}, "target": target, "ntokens": int(target.ne(0).sum()),
              "nsentences": 2}
    return sample, logits, target


def test_loss_and_modalities():
    sample, logits, target = sample_and_logits()
    loss, size, log = SpeechGPTCrossEntropyCriterion(Task)(FixedLogits(logits), sample)
    nll = F.cross_entropy(logits.view(-1, len(VOCAB)), target.view(-1), reduction="none").view(2, 5)
    mask = target.ne(0)
    is_unit = (target >= 3) & (target <= 8)
    assert size == 7 and torch.isclose(loss, nll[mask].sum())
    assert torch.isclose(log["unit_nll"], nll[mask & is_unit].sum()) and log["unit_ntokens"] == 3
    assert torch.isclose(log["text_nll"], nll[mask & ~is_unit].sum()) and log["text_ntokens"] == 4
    correct = logits.argmax(-1).eq(target)
    assert log["unit_correct"] == int((correct & mask & is_unit).sum())


def test_label_smoothing_changes_the_loss_not_the_nll():
    sample, logits, _ = sample_and_logits()
    plain = SpeechGPTCrossEntropyCriterion(Task)(FixedLogits(logits), sample)[2]
    smooth = SpeechGPTCrossEntropyCriterion(Task, label_smoothing=0.1)(FixedLogits(logits), sample)[2]
    assert torch.isclose(plain["nll_loss"], smooth["nll_loss"]) and not torch.isclose(plain["loss"], smooth["loss"])
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        SpeechGPTCrossEntropyCriterion(Task, label_smoothing=1.0)


def test_reduced_metrics_are_bits_per_token():
    sample, logits, _ = sample_and_logits()
    log = SpeechGPTCrossEntropyCriterion(Task)(FixedLogits(logits), sample)[2]
    with metrics.aggregate() as agg:
        SpeechGPTCrossEntropyCriterion.reduce_metrics([log, log])
    values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(float(log["loss"]) / 7 / math.log(2), abs=1e-3)
    assert values["unit_loss"] == pytest.approx(float(log["unit_nll"]) / 3 / math.log(2), abs=1e-3)
    assert values["unit_ppl"] == pytest.approx(2 ** values["unit_loss"], rel=1e-2)
    assert values["text_acc"] == pytest.approx(100 * log["text_correct"] / 4, abs=0.01)
