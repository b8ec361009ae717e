"""HuBERT features from a fairseq checkpoint (mHuBERT, HuBERT base/large), several utterances per forward pass.

The features are those of fairseq's `examples/hubert/simple_kmeans/dump_hubert_feature.py` (HubertFeatureReader):
the waveform layer-normed when the checkpoint's task says `normalize`, cut into chunks of `max_chunk` samples that
are encoded independently, and the output of transformer layer `layer` (1-based, before any final layer norm).

A batch gives each piece of audio exactly the features it gets alone. The conv feature extractor runs piece by
piece: its GroupNorm (HuBERT-base's "default" mode) normalizes over a whole utterance, and its first layer's output
(512 channels at 3.2 kHz) is the largest tensor of the model, so memory stays that of the longest piece, as in
fairseq's reader. The transformer, where the time goes, runs on the padded batch with a frame-level padding mask.
"""
from __future__ import annotations

import logging
import pickle
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.audio import SAMPLE_RATE

logger = logging.getLogger(__name__)

MAX_CHUNK = 1_600_000  # fairseq HubertFeatureReader's default: 100 s at 16 kHz


class GroupNormInInputDtype(nn.GroupNorm):
    """GroupNorm computed in its input's dtype (torch keeps the statistics in fp32), where fairseq's Fp32GroupNorm
    casts to fp32 and back. Under bf16 the first conv layer's norm (HuBERT-base: one group per channel over 512
    channels at 3.2 kHz, the model's largest tensor) with its GELU takes 20 ms per 10 s of audio instead of 64 ms on
    this repository's 2-core CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None if t is None else t.to(x.dtype) for t in (self.weight, self.bias))
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def fold_weight_norms(model: nn.Module) -> None:
    """Replace weight normalisation (HuBERT's positional conv: 4.7M weights in HuBERT-base) by the weight it
    computes, once, where each forward pass would compute it again: the same weight."""
    for module in model.modules():
        if hasattr(module, "weight_g"):
            nn.utils.remove_weight_norm(module)


def products_in_bf16(model: nn.Module) -> None:
    """Cast the weights and biases of `model`'s Linear and Conv1d layers to bf16 once, as bf16 autocast would cast
    them on every call: the same products, without re-reading HuBERT's fp32 weights for every batch. Norms keep
    their fp32 weights (autocast computes them in fp32). Weight norms are to be folded first (`fold_weight_norms`)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            module.to(torch.bfloat16)


class WaveformConvAsMatmul(nn.Module):
    """The first conv of HuBERT's feature extractor (one input channel: the waveform; no bias) as one matrix
    product of the waveform's frames (kernel-long windows every stride samples) with the kernels: the same products,
    each a sum of kernel-size terms. torch's bf16 conv1d is slow with a single input channel: on this repository's
    2-core CPU it takes 23 ms per 10 s of audio, the product 3.4 ms."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.kernel_size, self.stride = conv.kernel_size[0], conv.stride[0]
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, self.kernel_size).t(),
                                   requires_grad=False)  # (kernel, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, samples) -> (B, channels, frames), as the conv."""
        frames = x[:, 0].to(self.weight.dtype).unfold(-1, self.kernel_size, self.stride)  # (B, frames, kernel)
        return (frames @ self.weight).transpose(1, 2)


def waveform_conv_as_matmul(model: nn.Module) -> None:
    """Replace the first conv of `model`'s feature extractor by WaveformConvAsMatmul where it has the shape that
    needs (one input channel, no bias, no padding or dilation), for bf16 products."""
    block = model.feature_extractor.conv_layers[0]
    conv = block[0]
    if (isinstance(conv, nn.Conv1d) and conv.in_channels == 1 and conv.bias is None and conv.padding == (0,)
            and conv.dilation == (1,) and conv.groups == 1):
        block[0] = WaveformConvAsMatmul(conv)


def norms_in_input_dtype(module: nn.Module) -> None:
    """Replace fairseq's Fp32GroupNorm in `module` by GroupNormInInputDtype with the same parameters."""
    from fairseq.modules import Fp32GroupNorm

    for name, child in module.named_children():
        if isinstance(child, Fp32GroupNorm):
            norm = GroupNormInInputDtype(child.num_groups, child.num_channels, child.eps, child.affine)
            norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            norms_in_input_dtype(child)


# torch.nn.init's random draws, which fairseq's modules call as they are built
_INITIAL_DRAWS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                  "xavier_normal_", "orthogonal_")


@contextmanager
def no_initial_draws():
    """While fairseq builds a model that a strict load then gives every weight: no random initial weights are drawn
    (torch.nn.init's draws and wav2vec2's init_bert_params do nothing), as they would be overwritten. Drawing them
    was most of a HuBERT-base build: 0.95 s, 0.05 s without."""
    import fairseq.models.wav2vec.wav2vec2 as wav2vec2

    draws, init_bert_params = {name: getattr(nn.init, name) for name in _INITIAL_DRAWS}, wav2vec2.init_bert_params
    try:
        for name in _INITIAL_DRAWS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        wav2vec2.init_bert_params = lambda module: None
        yield
    finally:
        for name, draw in draws.items():
            setattr(nn.init, name, draw)
        wav2vec2.init_bert_params = init_bert_params


class HubertFeatureReader:
    """Layer-`layer` features of a fairseq HuBERT checkpoint, loaded through `fairseq.checkpoint_utils`."""

    def __init__(self, checkpoint: str | Path, layer: int = 11, device: str | torch.device = "cpu",
                 bf16: bool = False, max_chunk: int = MAX_CHUNK):
        from fairseq import checkpoint_utils

        from speechgpt_fairseq import fairseq_fixes

        # the weights_only allow-list HuBERT checkpoints need; not the whole plugin (register()), whose fsdp2
        # backend imports torch.distributed.checkpoint: 0.6 s that reading HuBERT features does not use
        fairseq_fixes.apply()
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no such HuBERT checkpoint")
        try:
            with no_initial_draws():  # the load is strict: every weight comes from the checkpoint
                (model,), _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
        except (pickle.UnpicklingError, EOFError, IndexError, KeyError, AttributeError, RuntimeError) as e:
            # what torch.load and fairseq raise on a file that is not a fairseq checkpoint
            raise InputError(f"{checkpoint}: not a loadable fairseq HuBERT checkpoint ({type(e).__name__}: "
                             f"{str(e)[:300]})") from None
        if not (hasattr(model, "feature_extractor") and hasattr(model, "encoder")):
            raise InputError(f"{checkpoint}: expected a HuBERT model, found {type(model).__name__}")
        num_layers = len(model.encoder.layers)
        if not 1 <= layer <= num_layers:
            raise InputError(f"{checkpoint}: layer {layer} does not exist: the model has layers 1..{num_layers}")
        if max_chunk < 400:
            raise InputError(f"max_chunk {max_chunk} is shorter than HuBERT's 400-sample receptive field")
        if task.cfg.sample_rate != SAMPLE_RATE:
            raise InputError(f"{checkpoint}: expects {task.cfg.sample_rate} Hz audio; only {SAMPLE_RATE} Hz is supported")
        self._convs = [(block[0].kernel_size[0], block[0].stride[0]) for block in model.feature_extractor.conv_layers]
        fold_weight_norms(model)
        # fairseq pads a frame (and masks it in attention) when a piece has an odd number of frames: the same
        # features for the real frames, but the mask's shape checks import sympy (0.3 s) on the first one.
        model.encoder.required_seq_len_multiple = 1
        if bf16:
            norms_in_input_dtype(model.feature_extractor)
            products_in_bf16(model)
            waveform_conv_as_matmul(model)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.layer, self.max_chunk, self.bf16 = layer, max_chunk, bf16
        self.normalize = bool(task.cfg.normalize)
        self.dim = model.encoder.embedding_dim
        self.checkpoint = checkpoint
        logger.info("HuBERT %s: layer %d of %d, dim %d, normalize=%s, %s%s", checkpoint, layer, num_layers,
                    self.dim, self.normalize, self.device, " bf16" if bf16 else "")

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv feature extractor makes of `num_samples` samples (0 when shorter than 400)."""
        n = num_samples
        for kernel, stride in self._convs:
            n = (n - kernel) // stride + 1 if n >= kernel else 0
        return n

    def segments(self, wav: np.ndarray) -> list[np.ndarray]:
        """The pieces one utterance is encoded in: normalized as the checkpoint says, then cut every `max_chunk`
        samples. A last piece too short to make a frame is dropped (fairseq's reader would fail on it)."""
        wav = np.asarray(wav, dtype=np.float32)
        if self.normalize:  # over the whole utterance, before chunking, as fairseq does
            x = torch.from_numpy(wav)
            wav = F.layer_norm(x, x.shape).numpy()
        pieces = [wav[s:s + self.max_chunk] for s in range(0, len(wav), self.max_chunk)]
        return [p for p in pieces if self.num_frames(len(p)) > 0]

    @torch.inference_mode()
    def features(self, segments: list[np.ndarray]) -> list[torch.Tensor]:
        """Features of each segment, (frames, dim) float32 on the device; one padded pass through the transformer."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            convs = [self.model.feature_extractor(torch.from_numpy(s).to(self.device)[None])[0].transpose(0, 1)
                     for s in segments]  # (frames_i, C) each
            frames = torch.tensor([len(c) for c in convs])
            x = self.model.layer_norm(pad_sequence(convs, batch_first=True))  # (B, T, C)
            if self.model.post_extract_proj is not None:
                x = self.model.post_extract_proj(x)  # (B, T, D)
            padding = torch.arange(x.size(1))[None, :] >= frames[:, None]  # (B, T), True on padding
            x, _ = self.model.encoder(x, padding_mask=padding.to(self.device) if padding.any() else None,
                                      layer=self.layer - 1)
        return [x[i, :n].float() for i, n in enumerate(frames.tolist())]
