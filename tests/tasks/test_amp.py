"""fairseq's `common.amp=true` on the CPU: the training step's forward pass under bf16 autocast, the weights, their
gradients and the optimizer state fp32 (fairseq's own amp is CUDA's fp16 autocast, which does nothing here)."""
import torch
from fairseq import optim
from fairseq.optim.amp_optimizer import AMPOptimizer
from omegaconf import OmegaConf
from torch import nn

from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel
from speechgpt_fairseq.tasks.base import SpeechGPTTask

COMMON = {"fp16_init_scale": 128, "amp_scale_window": None, "min_loss_scale": 1e-4}


def model_and_tokens():
    torch.manual_seed(0)
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
                               decoder_attention_heads=4, decoder_kv_heads=2)
    model = SpeechGPTLlamaModel.from_config(cfg, Vocabulary.units_only(40).to_dictionary())
    return model, torch.randint(4, 40, (3, 12))


def step(amp: bool) -> tuple[SpeechGPTLlamaModel, list[torch.dtype]]:
    """One training step of the task, as fairseq's trainer calls it; the dtypes the linear layers computed in."""
    model, tokens = model_and_tokens()
    dtypes = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))

    def criterion(model, sample):
        logits = model(sample)[0].float()
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), sample[:, 1:].flatten(), reduction="sum"), 1, {}

    # on a machine without CUDA fairseq's loss scaler says it turns itself off (bf16 needs none)
    cfg = OmegaConf.create({"common": COMMON, "optimizer": {"_name": "speechgpt_adamw", "lr": [1e-3]}})
    params = list(model.parameters())
    optimizer = AMPOptimizer.build_optimizer(cfg, params) if amp else optim.build_optimizer(cfg.optimizer, params)
    task = object.__new__(SpeechGPTTask)  # the step uses neither the data nor the vocabulary
    loss, _, _ = task.train_step(tokens, model, criterion, optimizer, update_num=0)
    assert torch.isfinite(loss)
    return model, dtypes


def test_amp_on_the_cpu_computes_in_bf16_and_keeps_fp32_weights_and_gradients():
    amp, amp_dtypes = step(amp=True)
    fp32, fp32_dtypes = step(amp=False)
    assert amp_dtypes and set(amp_dtypes) == {torch.bfloat16}
    assert set(fp32_dtypes) == {torch.float32}
    for (name, a), b in zip(amp.named_parameters(), fp32.parameters()):
        assert a.dtype == a.grad.dtype == torch.float32, name
        # the same gradients to bf16's precision: the same loss, computed at lower precision
        torch.testing.assert_close(a.grad, b.grad, rtol=0.1, atol=0.05 * b.grad.abs().max().item(), msg=name)
