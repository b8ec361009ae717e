"""Token-level cross-entropy for SpeechGPT's language modeling stages (padding ignored)."""

import math
from dataclasses import dataclass

import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass


@dataclass
class SpeechGPTCrossEntropyConfig(FairseqDataclass):
    pass


@register_criterion("speechgpt_cross_entropy", dataclass=SpeechGPTCrossEntropyConfig)
class SpeechGPTCrossEntropyCriterion(FairseqCriterion):
    """Summed next-token cross-entropy over non-pad targets; loss is reported in bits per token."""

    def forward(self, model, sample, reduce=True):
        logits, _ = model(**sample["net_input"])
        target = sample["target"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                               ignore_index=self.padding_idx, reduction="sum")
        ntokens = sample["ntokens"]
        logging_output = {"loss": loss.detach(), "ntokens": ntokens, "nsentences": sample["nsentences"],
                          "sample_size": ntokens}
        return loss, ntokens, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = sum(log.get("loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
