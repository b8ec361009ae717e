"""The criterion: loss only where the target is not pad, split by modality, label smoothing on the loss only."""
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq import metrics

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.criterions.cross_entropy import (SpeechGPTCrossEntropyCriterion, linear_cross_entropy,
                                                          token_losses)
from speechgpt_fairseq.data.vocabulary import Vocabulary

VOCAB = Vocabulary.units_only(6)  # ids: 0-2 specials, 3-8 units, 9-14 SpeechGPT tokens


class Task:
    vocab = VOCAB
    target_dictionary = VOCAB.to_dictionary()


class FixedLogits(torch.nn.Module):
    """A "model" returning given logits (at the flattened positions the criterion asks for, as the LLaMA does),
    so the expected numbers can be computed by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, src_tokens, src_lengths=None, output_at=None):
        return self.logits.reshape(-1, self.logits.size(-1))[output_at], {}


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


# ---- chunked output layer and loss (criterion.loss_chunk_tokens) --------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_equals_the_plain_loss_and_gradients(smoothing):
    torch.manual_seed(0)
    features = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(23, 16, requires_grad=True)
    target = torch.randint(0, 23, (37,))
    plain = token_losses(F.linear(features, weight), target, -100, smoothing)
    plain_grads = torch.autograd.grad(plain[0] * 0.5, (features, weight))
    chunked = linear_cross_entropy(features, weight, target, 5, smoothing)  # 5 does not divide 37
    chunked_grads = torch.autograd.grad(chunked[0] * 0.5, (features, weight))  # the incoming gradient scales
    torch.testing.assert_close(chunked[0], plain[0])
    torch.testing.assert_close(chunked[1], plain[1])
    assert torch.equal(chunked[2], plain[2])  # argmax
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_autocast_loss():
    """Matmuls in bf16, the loss in fp32, gradients in the parameters' dtype: as autocast does without chunks."""
    torch.manual_seed(0)
    features = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    target = torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = token_losses(F.linear(features, weight), target, -100, 0.0)
        chunked = linear_cross_entropy(features, weight, target, 16)
    plain_grads = torch.autograd.grad(plain[0], (features, weight))
    chunked_grads = torch.autograd.grad(chunked[0], (features, weight))
    assert chunked[0].dtype == torch.float32 and chunked_grads[1].dtype == torch.float32
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_chunked_loss_without_gradients_computes_none():
    torch.manual_seed(0)
    features, weight, target = torch.randn(9, 4), torch.randn(6, 4, requires_grad=True), torch.randint(0, 6, (9,))
    with torch.no_grad():
        loss, _, _ = linear_cross_entropy(features, weight, target, 4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, token_losses(F.linear(features, weight), target, -100, 0.0)[0].detach())


def _tiny_model(vocab):
    from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

    torch.manual_seed(0)
    cfg = SpeechGPTLlamaConfig(decoder_layers=1, decoder_embed_dim=16, decoder_ffn_embed_dim=32,
                               decoder_attention_heads=2, init_std=0.3)
    return SpeechGPTLlamaModel.from_config(cfg, vocab.to_dictionary())


def record_output_layer_rows(monkeypatch, vocab_size: int) -> list[int]:
    """The number of rows of every product that makes vocabulary-wide logits (F.linear or torch.mm), from now on."""
    rows, linear, mm = [], F.linear, torch.mm

    def recording_linear(x, w, b=None):
        if w.size(0) == vocab_size:
            rows.append(x.numel() // x.size(-1))
        return linear(x, w, b)

    def recording_mm(a, b, **kwargs):
        if b.size(-1) == vocab_size:
            rows.append(a.size(0))
        return mm(a, b, **kwargs)

    monkeypatch.setattr(F, "linear", recording_linear)
    monkeypatch.setattr(torch, "mm", recording_mm)
    return rows


def test_chunked_criterion_equals_the_plain_one_and_never_holds_all_logits(monkeypatch):
    """Same loss, logging outputs and parameter gradients; no output-layer product covers more than a chunk
    of tokens, and none is recomputed in the backward pass."""
    model = _tiny_model(VOCAB)
    sample, _, target = sample_and_logits()  # 10 positions, 7 of them loss positions
    results = []
    for chunk in (0, 3):
        model.zero_grad()
        loss, size, log = SpeechGPTCrossEntropyCriterion(Task, loss_chunk_tokens=chunk)(model, sample)
        loss.backward()
        results.append((loss, size, log, [p.grad.clone() for p in model.parameters()]))
    (loss0, size0, log0, grads0), (loss3, size3, log3, grads3) = results
    torch.testing.assert_close(loss3, loss0)
    assert size3 == size0 and log3.keys() == log0.keys()
    for key in log0:
        torch.testing.assert_close(torch.as_tensor(log3[key]), torch.as_tensor(log0[key]), msg=key)
    for a, b in zip(grads3, grads0):
        torch.testing.assert_close(a, b)

    rows = record_output_layer_rows(monkeypatch, model.decoder.output_weight.size(0))
    SpeechGPTCrossEntropyCriterion(Task, loss_chunk_tokens=3)(model, sample)[0].backward()
    assert sorted(rows) == [1, 3, 3]  # 7 loss positions: 3 chunks in the forward, none recomputed
    with pytest.raises(ValueError, match="loss_chunk_tokens must be 0"):
        SpeechGPTCrossEntropyCriterion(Task, loss_chunk_tokens=-1)


@pytest.mark.parametrize("chunk", [0, 4])
def test_the_output_layer_runs_at_loss_positions_only(chunk, monkeypatch):
    """The loss, its per-modality logs and every parameter's gradient equal those from the logits of every position
    (the model's plain forward), while the output layer sees the loss positions only."""
    model = _tiny_model(VOCAB)
    sample, _, target = sample_and_logits()
    logits, _ = model(target)  # (B, T, V) at every position
    expected = token_losses(logits.reshape(-1, logits.size(-1)), target.reshape(-1), 0, 0.0)[0]
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))

    rows = record_output_layer_rows(monkeypatch, model.decoder.output_weight.size(0))
    loss, size, log = SpeechGPTCrossEntropyCriterion(Task, loss_chunk_tokens=chunk)(model, sample)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected)
    assert size == 7 and log["text_ntokens"] + log["unit_ntokens"] == 7
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
    assert sum(rows) == 7  # not the 10 positions of the batch
