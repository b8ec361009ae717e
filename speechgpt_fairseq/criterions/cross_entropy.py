"""Next-token cross-entropy on the targets the task marks for loss, with metrics per modality.

The task sets non-loss positions of `sample["target"]` to pad (loss policy, padding); this criterion sums the
loss over the rest, and the model runs its output layer at those positions only (with a response-only loss,
about half of an SFT example is prompt, and the output layer is a large share of a small model's step). Besides
the overall loss it logs loss, perplexity and accuracy separately for unit tokens (`<0>` … `<K-1>`) and for every
other token ("text": words, markers such as `<sosp>`, and `</s>`).
With `loss_chunk_tokens` set, the output layer and the loss run on that many tokens at a time, each chunk's
gradients computed with its loss, so the (tokens, vocabulary) logits never exist whole (33k x 4 bytes per token in
fp32) and nothing is recomputed.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from torch import Tensor

from speechgpt_fairseq.errors import InputError

MODALITIES = ("text", "unit")


@dataclass
class SpeechGPTCrossEntropyConfig(FairseqDataclass):
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing epsilon (0 = none); perplexity "
                                                                   "and per-modality losses stay unsmoothed"})
    loss_chunk_tokens: int = field(
        default=0, metadata={"help": "compute logits, loss and their gradients this many tokens at a time, so the "
                                     "full (tokens, vocab) logits are never held; 0 = all at once"})


def token_losses(logits: Tensor, target: Tensor, ignore_index: int, smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """(N, V) logits -> (summed loss, per-token nll (N,), argmax (N,)); the loss in fp32, smoothed if asked."""
    logits = logits.float()
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    loss = nll.sum() if smoothing == 0 else F.cross_entropy(
        logits, target, ignore_index=ignore_index, reduction="sum", label_smoothing=smoothing)
    return loss, nll.detach(), logits.detach().argmax(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    """The output layer and the summed cross-entropy, `chunk` rows at a time, each chunk's gradients computed as
    soon as its loss: the backward pass only scales them, so nothing is recomputed and no chunk's logits are kept."""

    @staticmethod
    def forward(ctx, features, weight, target, chunk, smoothing, dtype, with_grad):
        n, vocab = target.numel(), weight.size(0)
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=features.device)
        nll = torch.empty(n, dtype=torch.float32, device=features.device)
        predicted = torch.empty(n, dtype=torch.long, device=features.device)
        grad_features = torch.empty_like(features) if with_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        # one (chunk, V) fp32 buffer for every chunk's logits: a fresh one per chunk costs its page faults again
        buffer = torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=features.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            f, t = features[rows].to(dtype), target[rows]
            logits = buffer[:len(t)]
            if dtype == torch.float32:
                torch.mm(f, w.t(), out=logits)
            else:
                logits.copy_(F.linear(f, w))  # the matmul in the autocast dtype, the loss in fp32
            picked, predicted[rows] = logits.gather(1, t[:, None]).squeeze(1), logits.argmax(-1)
            mean = logits.mean(-1) if smoothing else None
            # log-sum-exp and softmax in place of the logits (logsumexp would allocate and fault in a new
            # (chunk, V) tensor): exp(logits - max), summed; lse = max + log(sum); softmax = that / sum
            top = logits.amax(-1)
            total = logits.sub_(top[:, None]).exp_().sum(-1)
            lse = top + total.log()
            nll[rows] = lse - picked
            # label smoothing: (1 - eps) x nll + eps x the mean over the vocabulary of -log p
            loss += nll[rows].sum() if smoothing == 0 else \
                ((1 - smoothing) * nll[rows] + smoothing * (lse - mean)).sum()
            if with_grad:  # d loss / d logits = softmax - the smoothed one-hot target, in place of the logits
                grad = logits.div_(total[:, None])
                grad.scatter_add_(1, t[:, None], grad.new_full((len(t), 1), smoothing - 1))
                if smoothing:
                    grad.sub_(smoothing / vocab)
                grad = grad.to(dtype)
                grad_features[rows] = grad @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), f)
                else:
                    grad_weight.add_(grad.t() @ f)
        ctx.save_for_backward(grad_features, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll, predicted)
        return loss, nll, predicted

    @staticmethod
    def backward(ctx, grad_loss, _nll, _predicted):
        grad_features, grad_weight = ctx.saved_tensors
        return (grad_features * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None, None, None, None)


def linear_cross_entropy(features: Tensor, weight: Tensor, target: Tensor, chunk: int,
                         smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """`token_losses(F.linear(features, weight), target, ...)` for (N, C) features, the (V, C) output weight and
    N targets (every one with a loss), `chunk` tokens at a time: the (N, V) logits never exist whole, and each
    chunk's gradients are computed in the forward pass (a (V, C) fp32 buffer), so nothing is recomputed. Under
    autocast the matmuls run in its dtype, the loss in fp32, as without chunks."""
    device = features.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with_grad = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(features, weight, target, chunk, smoothing, dtype, with_grad)


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
            features, _ = model(**sample["net_input"], features_only=True, output_at=at)
            loss, nll, predicted = linear_cross_entropy(features, model.decoder.output_weight, target, self.chunk,
                                                        self.eps)
        else:
            logits, _ = model(**sample["net_input"], output_at=at)
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
