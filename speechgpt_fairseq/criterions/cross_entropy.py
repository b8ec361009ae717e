"""Next-token cross-entropy on the targets the task marks for loss, with metrics per modality.

The task sets non-loss positions of `sample["target"]` to pad (loss policy, padding); this criterion sums the
loss over the rest, and the model runs its output layer at those positions only (with a response-only loss,
about half of an SFT example is prompt, and the output layer is a large share of a step). Besides the overall loss it logs loss, perplexity and accuracy separately for unit tokens
(`<0>` … `<K-1>`) and for every other token ("text": words, markers such as `<sosp>`, and `</s>`).
With `loss_chunk_tokens` set, the output layer and the loss run on that many tokens at a time and are recomputed
in the backward pass, so the (tokens, vocabulary) logits never exist whole (33k x 4 bytes per token in fp32).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from speechgpt_fairseq.errors import InputError

MODALITIES = ("text", "unit")


@dataclass
class SpeechGPTCrossEntropyConfig(FairseqDataclass):
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing epsilon (0 = none); perplexity "
                                                                   "and per-modality losses stay unsmoothed"})
    loss_chunk_tokens: int = field(
        default=0, metadata={"help": "compute logits and loss this many tokens at a time, recomputed in the backward "
                                     "pass, so the full (tokens, vocab) logits are never held; 0 = all at once"})


def token_losses(logits: Tensor, target: Tensor, ignore_index: int, smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """(N, V) logits -> (summed loss, per-token nll (N,), argmax (N,)); the loss in fp32, smoothed if asked."""
    logits = logits.float()
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    loss = nll.sum() if smoothing == 0 else F.cross_entropy(
        logits, target, ignore_index=ignore_index, reduction="sum", label_smoothing=smoothing)
    return loss, nll.detach(), logits.detach().argmax(-1)


def chunked_token_losses(features: Tensor, weight: Tensor, target: Tensor, chunk: int, ignore_index: int,
                         smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """`token_losses(features @ weight.T, ...)` for (N, C) features and the (V, C) output weight, `chunk` tokens
    at a time: each chunk's logits are dropped after its loss and recomputed in the backward pass."""
    def one(f: Tensor, w: Tensor, t: Tensor):
        return token_losses(F.linear(f, w), t, ignore_index, smoothing)

    parts = [checkpoint(one, f, weight, t, use_reentrant=False)
             for f, t in zip(features.split(chunk), target.split(chunk))]
    loss, nll, predicted = zip(*parts)
    return torch.stack(loss).sum(), torch.cat(nll), torch.cat(predicted)


@register_criterion("speechgpt_cross_entropy", dataclass=SpeechGPTCrossEntropyConfig)
class SpeechGPTCrossEntropyCriterion(FairseqCriterion):
    """Summed cross-entropy over loss positions; reported in bits per token, overall and per modality."""

    def __init__(self, task, label_smoothing: float = 0.0, loss_chunk_tokens: int = 0):
        super().__init__(task)
        if not 0.0 <= label_smoothing < 1.0:
            raise InputError(f"criterion.label_smoothing must be in [0, 1), got {label_smoothing}")
        if loss_chunk_tokens < 0:
            raise InputError(f"criterion.loss_chunk_tokens must be 0 (off) or positive, got {loss_chunk_tokens}")
        self.eps = label_smoothing
        self.chunk = loss_chunk_tokens
        vocab = task.vocab
        self.unit_range = (vocab.unit_offset, vocab.unit_offset + vocab.num_units)

    def forward(self, model, sample, reduce=True):
        target = sample["target"].reshape(-1)
        at = target.ne(self.padding_idx).nonzero().squeeze(1)  # the loss positions: logits are computed there only
        target = target.index_select(0, at)
        if self.chunk:
            features, _ = model(**sample["net_input"], features_only=True, logits_at=at)
            loss, nll, predicted = chunked_token_losses(features, model.decoder.output_weight, target, self.chunk,
                                                        self.padding_idx, self.eps)
        else:
            logits, _ = model(**sample["net_input"], logits_at=at)
            loss, nll, predicted = token_losses(logits, target, self.padding_idx, self.eps)
        log = {"loss": loss.detach(), "nll_loss": nll.detach().sum(), "ntokens": sample["ntokens"],
               "nsentences": sample["nsentences"], "sample_size": sample["ntokens"]}
        with torch.no_grad():
            is_unit = (target >= self.unit_range[0]) & (target < self.unit_range[1])
            correct = predicted.eq(target)
            for name, where in (("text", ~is_unit), ("unit", is_unit)):
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
