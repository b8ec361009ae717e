"""Fused-kernel choice: apex's FusedRMSNorm and FusedAdam when apex imports, torch's kernels otherwise; the log
names the choice, and every path computes what the plain one does.

NVIDIA apex cannot be installed here (it is not on PyPI; the PyPI `apex` is another project), so the apex tests
run against stand-ins written from apex's documented API, not against apex: FusedRMSNorm(normalized_shape,
eps=1e-5, elementwise_affine=True, memory_efficient=False) and FusedAdam(params, lr, bias_correction, betas, eps,
adam_w_mode=True, weight_decay, amsgrad=False, ...), each computing what apex documents (RMS normalization over
the last dims; Adam, with decoupled weight decay when adam_w_mode). They prove that we call apex as its docs say
(argument names, eps, the AdamW mode, every hyperparameter) and that the choice is logged; apex's CUDA kernels
themselves are not run. The fused paths that do exist here, torch's fused AdamW and F.rms_norm, are checked
against the plain computations."""
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from fairseq import optim
from omegaconf import OmegaConf
from torch import nn

from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models import kernels
from speechgpt_fairseq.models.llama import RMSNorm, SpeechGPTLlamaConfig, SpeechGPTLlamaModel


def build():
    torch.manual_seed(0)
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                               decoder_attention_heads=4, decoder_kv_heads=2, init_std=0.3)
    return SpeechGPTLlamaModel.from_config(cfg, Vocabulary.units_only(40).to_dictionary())


class FakeFusedRMSNorm(nn.Module):
    """apex.normalization.FusedRMSNorm's signature and parameters: `weight` of shape `normalized_shape` (None
    without `elementwise_affine`), RMS over the trailing `normalized_shape` dims in fp32, in the input's dtype."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, memory_efficient=False):
        super().__init__()
        self.normalized_shape = torch.Size((normalized_shape,) if isinstance(normalized_shape, int)
                                           else normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None

    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        y = (x.float() * torch.rsqrt(x.float().pow(2).mean(dims, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else self.weight * y


class FakeFusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam's signature and update: Adam with bias correction; `adam_w_mode` (apex's
    default) decays weights decoupled from the gradient (AdamW), otherwise as an L2 term added to it."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True, capturable=False, master_weights=False):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                g = p.grad if self.adam_w_mode else p.grad + wd * p
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m, v = state["m"], state["v"]
                if group["bias_correction"]:
                    m, v = m / (1 - b1 ** state["step"]), v / (1 - b2 ** state["step"])
                if self.adam_w_mode:
                    p.mul_(1 - lr * wd)
                p.sub_(lr * m / (v.sqrt() + group["eps"]))


@pytest.fixture
def log(monkeypatch, caplog):
    """Kernel-choice log lines of this test only (each choice is logged once per process)."""
    monkeypatch.setattr(kernels, "_logged", set())
    monkeypatch.setattr(kernels, "_attention_kinds_seen", set())
    caplog.set_level(logging.INFO, logger=kernels.__name__)
    return lambda: [r.getMessage() for r in caplog.records if r.name == kernels.__name__]


@pytest.fixture
def without_apex(monkeypatch):
    for name in ("apex", "apex.normalization", "apex.optimizers"):
        monkeypatch.setitem(sys.modules, name, None)  # `import apex...` raises ImportError


@pytest.fixture
def with_apex(monkeypatch):
    apex, norm, opt = (types.ModuleType(n) for n in ("apex", "apex.normalization", "apex.optimizers"))
    norm.FusedRMSNorm, opt.FusedAdam = FakeFusedRMSNorm, FakeFusedAdam
    apex.normalization, apex.optimizers = norm, opt
    for module in (apex, norm, opt):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def norms(model):
    return [m for name, m in model.named_modules() if name.endswith("norm")]


def test_without_apex_torch_kernels_run_and_say_so(without_apex, log):
    model = build()
    assert len(norms(model)) == 5 and all(type(m) is RMSNorm for m in norms(model))
    optimizer = kernels.adamw(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["fused"]  # torch fuses on CPU too
    model(torch.randint(3, 49, (2, 7)))
    assert log() == ["kernels: RMSNorm on torch F.rms_norm (apex not installed)",
                     "kernels: AdamW on torch fused (apex not installed)",
                     "kernels: attention (torch.float32, causal) on cpu (torch's kernel for this device)"]


def test_with_apex_its_kernels_run_say_so_and_compute_the_same(with_apex, log):
    model = build()
    assert len(norms(model)) == 5 and all(type(m) is FakeFusedRMSNorm for m in norms(model))
    assert all((m.normalized_shape, m.eps, m.elementwise_affine) == ((32,), 1e-6, True) for m in norms(model))
    optimizer = kernels.adamw(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert type(optimizer) is FakeFusedAdam and optimizer.adam_w_mode
    assert log() == ["kernels: RMSNorm on apex FusedRMSNorm", "kernels: AdamW on apex FusedAdam"]

    sys.modules["apex.normalization"] = None  # the same weights without apex: the same logits
    plain = build()
    assert plain.state_dict().keys() == model.state_dict().keys()  # apex's norm keeps the `weight` name
    tokens = torch.randint(3, 49, (2, 7))
    torch.testing.assert_close(model(tokens)[0], plain(tokens)[0], rtol=1e-5, atol=1e-5)


def test_apex_fused_adam_makes_the_plain_adamw_updates(with_apex):
    """Every hyperparameter reaches FusedAdam, in its AdamW mode: the updates of torch's plain AdamW."""
    _assert_adamw_updates_are_plain_adamw()


def test_apex_without_its_cuda_extension_falls_back(with_apex, log, monkeypatch):
    def unbuilt(*args, **kwargs):
        raise ImportError("No module named 'fused_layer_norm_cuda'")

    monkeypatch.setattr(sys.modules["apex.normalization"], "FusedRMSNorm", unbuilt)
    assert all(type(m) is RMSNorm for m in norms(build()))
    assert log()[0] == "kernels: RMSNorm on torch F.rms_norm (apex FusedRMSNorm unusable: " \
                       "No module named 'fused_layer_norm_cuda')"


def _adamw_run(optimizer_factory, steps=3):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    optimizer = optimizer_factory(params)
    for step in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach() * (step + 1))
        optimizer.step()
    return params


def _assert_adamw_updates_are_plain_adamw() -> list[torch.Tensor]:
    """kernels.adamw's weights after a few steps equal torch's plain (unfused, not foreach) AdamW's."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    fused = _adamw_run(lambda p: kernels.adamw(p, **hyper))
    plain = _adamw_run(lambda p: torch.optim.AdamW(p, foreach=False, fused=False, **hyper))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    return fused


def test_fused_adamw_makes_the_plain_adamw_updates(without_apex):
    fused = _assert_adamw_updates_are_plain_adamw()
    torch.manual_seed(0)
    assert (fused[0] - torch.randn(5, 3)).abs().min() > 1e-3  # every weight moved


def test_speechgpt_adamw_is_a_fairseq_optimizer(without_apex):
    params = [nn.Parameter(torch.randn(3))]
    for betas in ([0.9, 0.95], "(0.9, 0.95)"):  # hydra yaml list; argparse string
        cfg = OmegaConf.create({"_name": "speechgpt_adamw", "adam_betas": betas, "adam_eps": 1e-6,
                                "weight_decay": 0.1, "lr": [3e-4]})
        optimizer = optim.build_optimizer(cfg, params)
        group = optimizer.optimizer.param_groups[0]
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.9, 0.95), 1e-6, 0.1)
        assert optimizer.supports_flat_params  # fairseq's bf16/fp16 optimizers wrap it


def test_attention_matches_the_reference_formula(log):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out = kernels.attention(q, k, v, None, is_causal=True, enable_gqa=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2)) / 8 ** 0.5 + torch.full((6, 6), float("-inf")).triu(1)
    torch.testing.assert_close(out, F.softmax(scores, -1) @ vv)
    assert log() == ["kernels: attention (torch.float32, causal) on cpu (torch's kernel for this device)"]


def test_one_query_fp32_steps_on_the_cpu_match_sdpa(log):
    """A generation step in fp32 on the CPU runs two matmuls instead of torch's kernel: SDPA's output, for
    grouped-query attention over keys that are a cache's view; bf16 keeps SDPA (its rounding, transformers')."""
    torch.manual_seed(0)
    q = torch.randn(3, 8, 1, 16)
    cache = torch.randn(2, 3, 2, 40, 16)  # (k/v, B, Hkv, capacity, D)
    k, v = cache[0, :, :, :25], cache[1, :, :, :25]
    out = kernels.attention(q, k, v, None, is_causal=False, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=0)
    half = kernels.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, is_causal=False, enable_gqa=True)
    assert torch.equal(half, F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), enable_gqa=True))
    assert log() == ["kernels: attention (torch.float32, cached step) on cpu (matmuls, query heads grouped by "
                     "key/value head)",
                     "kernels: attention (torch.bfloat16, cached step) on cpu (torch's kernel for this device)"]


def test_short_bf16_attention_with_gradients_on_the_cpu_runs_in_fp32(log):
    """Training under bf16 autocast on the CPU: attention over fewer than 256 positions runs in fp32 (torch's CPU
    kernel is slower there in bf16, its backward pass most), its output and gradients back in bf16; without
    gradients, and over 256 positions or more, bf16 keeps SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 30, 16).bfloat16().requires_grad_() for h in (4, 2, 2))
    out = kernels.attention(q, k, v, None, is_causal=True, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.bfloat16())
    out.float().square().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(kernels.attention(q, k, v, None, is_causal=True, enable_gqa=True),
                           F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    long_q, long_k, long_v = (torch.randn(1, h, 256, 16).bfloat16().requires_grad_() for h in (4, 2, 2))
    assert torch.equal(kernels.attention(long_q, long_k, long_v, None, is_causal=True, enable_gqa=True),
                       F.scaled_dot_product_attention(long_q, long_k, long_v, is_causal=True, enable_gqa=True))
    assert log() == ["kernels: attention (torch.float32, causal) on cpu (torch's kernel for this device)",
                     "kernels: attention (torch.bfloat16, causal) on cpu (torch's kernel for this device)"]


def test_linear_layers_compute_f_linear_for_any_rows_and_keep_its_gradients(log):
    """Every projection and the output layer run `kernels.linear`: without gradients in fp32 on the CPU it is
    computed as weight @ x^T (faster there), which gives F.linear's values within fp32 rounding for one row, several,
    none, or a (B, T) batch, contiguous; with gradients, or in bf16, it is F.linear itself."""
    torch.manual_seed(0)
    w = torch.randn(300, 64)
    for shape in [(1, 64), (2, 64), (17, 64), (3, 5, 64), (0, 64), (1, 1, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            out = kernels.linear(x, w)
        assert out.shape == (*shape[:-1], 300) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, w), atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 64, requires_grad=True)
    out = kernels.linear(x, w)
    assert out.grad_fn is not None and torch.equal(out, F.linear(x, w))
    with torch.no_grad():
        assert torch.equal(kernels.linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    assert log() == ["kernels: linear layers in fp32 on the CPU without gradients as weight @ x^T"]


PACKING = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
PACKED = "kernels: bf16 generation on the CPU reads copies of the weights in oneDNN's packed layout"


@pytest.mark.skipif(not PACKING, reason="this CPU has no oneDNN bf16 products")
def test_packed_bf16_weights_give_f_linears_values_bit_for_bit(log):
    """bf16 weights on the CPU are packed once, for generation: a product with the packed copy is F.linear's with
    the weight, bit for bit, for one row, several, none, or a (B, T) batch. None entries stay None; weights of
    another dtype are given back as they are."""
    torch.manual_seed(0)
    w, w2 = torch.randn(300, 64).bfloat16(), torch.randn(64, 300).bfloat16()
    packed = kernels.packed_weights([w, None, w2], rows=4)
    assert packed[0].is_mkldnn and packed[1] is None and packed[2].is_mkldnn
    for shape in [(1, 64), (2, 64), (17, 64), (3, 5, 64), (0, 64), (1, 1, 64), (33, 64)]:
        x = torch.randn(*shape).bfloat16()
        with torch.no_grad():
            assert torch.equal(kernels.linear(x, packed[0]), F.linear(x, w))
    x = torch.randn(8, 300).bfloat16()
    assert torch.equal(kernels.linear(x, packed[2]), F.linear(x, w2))
    fp32 = torch.randn(300, 64)
    assert kernels.packed_weights([fp32], rows=1)[0] is fp32
    assert log() == [PACKED]


def test_weights_are_not_packed_where_the_copies_would_not_fit(log, monkeypatch):
    """Packed copies double what the weights take: where they would take more than half the memory available,
    generation reads the weights as they are, and the log says why."""
    monkeypatch.setattr(kernels, "_available_memory", lambda: 100_000)
    weights = [torch.randn(300, 100).bfloat16()]  # 60,000 bytes: twice that does not fit in 100,000
    assert kernels.packed_weights(weights, rows=1)[0] is weights[0]
    assert log() == ["kernels: bf16 generation on the CPU with weights as they are (packed copies would take "
                     "0.1 MiB; memory available: 0 MiB)"]
