"""Next-token cross-entropy on the targets the task marks for loss, with metrics per modality.

The task sets non-loss positions of `sample["target"]` to pad (loss policy, padding); this criterion sums the
loss over the rest. Besides the overall loss it logs loss, perplexity and accuracy separately for unit tokens
(`<0>` … `<K-1>`) and for every other token ("text": words, markers such as `<sosp>`, and `</s>`).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

MODALITIES = ("text", "unit")


@dataclass
class SpeechGPTCrossEntropyConfig(FairseqDataclass):
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing epsilon (0 = none); perplexity "
                                                                   "and per-modality losses stay unsmoothed"})


@register_criterion("speechgpt_cross_entropy", dataclass=SpeechGPTCrossEntropyConfig)
class SpeechGPTCrossEntropyCriterion(FairseqCriterion):
    """Summed cross-entropy over loss positions; reported in bits per token, overall and per modality."""

    def __init__(self, task, label_smoothing: float = 0.0):
        super().__init__(task)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"criterion.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.eps = label_smoothing
        vocab = task.vocab
        self.unit_range = (vocab.unit_offset, vocab.unit_offset + vocab.num_units)

    def forward(self, model, sample, reduce=True):
        logits, _ = model(**sample["net_input"])
        logits = logits.reshape(-1, logits.size(-1)).float()
        target = sample["target"].reshape(-1)
        nll = F.cross_entropy(logits, target, ignore_index=self.padding_idx, reduction="none")
        loss = nll.sum() if self.eps == 0 else F.cross_entropy(
            logits, target, ignore_index=self.padding_idx, reduction="sum", label_smoothing=self.eps)
        log = {"loss": loss.detach(), "nll_loss": nll.detach().sum(), "ntokens": sample["ntokens"],
               "nsentences": sample["nsentences"], "sample_size": sample["ntokens"]}
        with torch.no_grad():
            mask = target.ne(self.padding_idx)
            is_unit = (target >= self.unit_range[0]) & (target < self.unit_range[1])
            correct = torch.zeros_like(mask)
            correct[mask] = logits[mask].argmax(-1).eq(target[mask])
            for name, where in (("text", mask & ~is_unit), ("unit", mask & is_unit)):
                log[f"{name}_nll"] = nll[where].sum()
                log[f"{name}_ntokens"] = int(where.sum())
                log[f"{name}_correct"] = int(correct[where].sum())
        return loss, sample["ntokens"], log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        ntokens = total("ntokens")
        metrics.log_scalar("loss", total("loss") / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        for name in MODALITIES:
            n = total(f"{name}_ntokens")
            if n == 0:
                continue
            metrics.log_scalar(f"{name}_loss", total(f"{name}_nll") / n / math.log(2), n, round=3)
            metrics.log_scalar(f"{name}_acc", 100.0 * total(f"{name}_correct") / n, n, round=2)
            metrics.log_derived(f"{name}_ppl",
                                lambda meters, name=name: utils.get_perplexity(meters[f"{name}_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
