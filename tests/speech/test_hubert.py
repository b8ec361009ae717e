"""HubertFeatureReader against fairseq's own reader (examples/hubert/simple_kmeans/dump_hubert_feature.py), on a
tiny random HuBERT saved as a real fairseq checkpoint: batched, chunked and normalized features."""
import numpy as np
import pytest
import soundfile as sf
import torch

from speechgpt_fairseq.speech.audio import read_audio
from speechgpt_fairseq.speech.hubert import HubertFeatureReader
from speechgpt_fairseq.speech.speech2unit import SpeechFeatures

VARIANTS = ["tiny_hubert", "tiny_hubert_large_style"]


@pytest.fixture(scope="module")
def waveforms(speech_dir) -> list[np.ndarray]:
    """Utterances of different lengths: three spoken ones and 0.1 s of noise."""
    noise = (0.1 * np.random.default_rng(0).normal(size=1601)).astype(np.float32)
    paths = [speech_dir / "a_hello.wav", speech_dir / "b_stereo.wav", speech_dir / "sub" / "d_16k.wav"]
    return [read_audio(p) for p in paths] + [noise]


@pytest.fixture
def fairseq_reader(fairseq_recipe, tmp_path):
    """fairseq's HubertFeatureReader(checkpoint, layer, max_chunk): features of a waveform (via a 16 kHz file)."""
    module = fairseq_recipe("dump_hubert_feature")

    def features(checkpoint, layer, wavs, max_chunk=1_600_000) -> list[np.ndarray]:
        reader = module.HubertFeatureReader(str(checkpoint), layer, max_chunk)
        out = []
        for i, wav in enumerate(wavs):
            sf.write(tmp_path / f"{i}.wav", wav, 16000, subtype="FLOAT")
            out.append(reader.get_feats(str(tmp_path / f"{i}.wav"), len(wav)).numpy())
        return out
    return features


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layer", [1, 2])
def test_batched_features_equal_fairseq_per_utterance(request, variant, layer, waveforms, fairseq_reader):
    checkpoint = request.getfixturevalue(variant)
    reader = HubertFeatureReader(checkpoint, layer=layer)
    assert len({len(w) for w in waveforms}) == len(waveforms)  # one padded batch of different lengths
    segments = [reader.segments(w) for w in waveforms]
    assert all(len(s) == 1 for s in segments)  # shorter than max_chunk: one piece each
    ours = [f.numpy() for f in reader.features([s for [s] in segments])]
    theirs = fairseq_reader(checkpoint, layer, waveforms)
    for mine, ref, wav in zip(ours, theirs, waveforms):
        assert mine.shape == ref.shape == (reader.num_frames(len(wav)), 32)
        np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_features_equal_fairseq_chunked_reader(request, variant, waveforms, fairseq_reader):
    checkpoint = request.getfixturevalue(variant)
    max_chunk = 8000  # 0.5 s: every spoken utterance is cut in several chunks, the last one shorter
    # fairseq's reader fails on a last chunk too short for a frame (ours drops it): none here
    waveforms = [w[:len(w) - len(w) % max_chunk] if len(w) % max_chunk < 400 else w for w in waveforms]
    assert sum(len(w) > 2 * max_chunk and len(w) % max_chunk > 0 for w in waveforms) >= 2
    extractor = SpeechFeatures(checkpoint, layer=2, max_chunk=max_chunk)
    ours = extractor(waveforms, max_batch_samples=3 * max_chunk)  # chunks of several utterances share batches
    theirs = fairseq_reader(checkpoint, 2, waveforms, max_chunk)
    for mine, ref in zip(ours, theirs):
        assert mine.shape == ref.shape
        np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)


def test_chunking_changes_features_and_drops_a_frameless_tail(tiny_hubert, waveforms):
    wav = waveforms[2]
    whole = HubertFeatureReader(tiny_hubert, layer=2)
    chunked = HubertFeatureReader(tiny_hubert, layer=2, max_chunk=8000)
    segments = chunked.segments(wav)
    assert [len(s) for s in segments[:-1]] == [8000] * (len(segments) - 1)
    assert np.concatenate(segments).tolist() == wav[:sum(map(len, segments))].tolist()
    assert len(wav) - sum(map(len, segments)) < 400  # at most a frameless tail is left out
    a = whole.features(whole.segments(wav))[0]
    b = torch.cat(chunked.features(segments))
    assert len(b) == sum(chunked.num_frames(len(s)) for s in segments) < len(a)  # each chunk loses its edge frames
    assert (a[:len(b)] - b).abs().max() > 0.1  # every frame attends within its own chunk only
    tail = np.concatenate([wav[:8000], wav[8000:8000 + 399]])  # a last chunk too short for one frame
    assert [len(s) for s in chunked.segments(tail)] == [8000]


def test_normalize_follows_the_checkpoint(tiny_hubert, tiny_hubert_large_style, make_hubert, waveforms, tmp_path):
    """task.normalize on: the waveform is layer-normed before the model sees it; off: it is not. The same
    weights are saved with normalize off to tell the two apart."""
    assert HubertFeatureReader(tiny_hubert, layer=2).normalize is False
    normalized = HubertFeatureReader(tiny_hubert_large_style, layer=2)
    plain = HubertFeatureReader(make_hubert(tmp_path / "same_weights.pt", extractor_mode="layer_norm", normalize=False,
                                            seed=1), layer=2)
    assert normalized.normalize is True and plain.normalize is False
    wav = waveforms[0]
    layer_normed = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)
    assert plain.segments(wav)[0].tolist() == wav.tolist()
    np.testing.assert_allclose(normalized.segments(wav)[0], layer_normed, atol=1e-4)
    ours = normalized.features(normalized.segments(wav))[0]
    torch.testing.assert_close(ours, plain.features([layer_normed.astype(np.float32)])[0], atol=1e-4, rtol=0)
    assert (ours - plain.features([wav])[0]).abs().max() > 0.1


def test_num_frames_is_what_the_model_gives(tiny_hubert):
    reader = HubertFeatureReader(tiny_hubert, layer=1)
    lengths = [400, 719, 720, 16000, 16001, 33333]
    wavs = [np.random.default_rng(n).normal(size=n).astype(np.float32) for n in lengths]
    assert [len(f) for f in reader.features(wavs)] == [reader.num_frames(n) for n in lengths]
    assert reader.num_frames(399) == 0 and reader.num_frames(16000) == 49  # 50 Hz, the conv stack eats 400 samples


def test_bf16_is_close_to_float32(tiny_hubert, waveforms):
    fp32 = HubertFeatureReader(tiny_hubert, layer=2).features(waveforms[:2])
    bf16 = HubertFeatureReader(tiny_hubert, layer=2, bf16=True).features(waveforms[:2])
    for a, b in zip(fp32, bf16):
        assert b.dtype == torch.float32 and a.shape == b.shape
        assert (a - b).norm() / a.norm() < 0.05


def test_bf16_weights_cast_once_give_the_features_of_autocast(tiny_hubert, waveforms):
    """Under bf16 the reader casts its Linear and Conv1d weights to bf16 once (the positional conv's weight norm
    folded first), where autocast would cast them on every call: the features are exactly those of fairseq's model,
    weights as loaded, run under autocast (with the reader's bf16 GroupNorm and first conv, tested on their own
    below, and without padding to an even number of frames, which changes bf16 products' shapes)."""
    from fairseq import checkpoint_utils

    from speechgpt_fairseq.speech.hubert import norms_in_input_dtype, waveform_conv_as_matmul

    reader = HubertFeatureReader(tiny_hubert, layer=2, bf16=True)
    layer = reader.model.encoder.layers[0]
    assert layer.fc1.weight.dtype == torch.bfloat16 and layer.final_layer_norm.weight.dtype == torch.float32
    ours = reader.features(waveforms[:3])
    (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(tiny_hubert)])
    assert hasattr(model.encoder.pos_conv[0], "weight_g")  # weight-normed, as fairseq builds it
    norms_in_input_dtype(model.feature_extractor)
    model.feature_extractor.conv_layers[0][0].to(torch.bfloat16)
    waveform_conv_as_matmul(model)
    model.encoder.required_seq_len_multiple = 1
    reader.model = model.eval()
    assert all(torch.equal(a, b) for a, b in zip(ours, reader.features(waveforms[:3])))


def test_bf16_normalizes_the_first_conv_layer_in_bf16(tiny_hubert, tmp_path):
    """Under bf16 fairseq's Fp32GroupNorm (fp32 there and back) becomes a GroupNorm in the input's dtype: the
    checkpoint's parameters, the same values in fp32, bf16 out of bf16 within its rounding."""
    from fairseq.modules import Fp32GroupNorm

    from speechgpt_fairseq.speech.hubert import GroupNormInInputDtype

    state = torch.load(tiny_hubert, weights_only=False)
    for name in ("weight", "bias"):  # a trained norm's parameters, not a new one's ones and zeros
        param = state["model"][f"feature_extractor.conv_layers.0.2.{name}"]
        param.copy_(torch.linspace(0.5, 1.5, len(param)) - float(name == "bias"))
    torch.save(state, tmp_path / "hubert.pt")
    fairseq_norm = HubertFeatureReader(tmp_path / "hubert.pt", layer=1).model.feature_extractor.conv_layers[0][2]
    norm = HubertFeatureReader(tmp_path / "hubert.pt", layer=1, bf16=True).model.feature_extractor.conv_layers[0][2]
    assert isinstance(fairseq_norm, Fp32GroupNorm) and type(norm) is GroupNormInInputDtype
    with torch.no_grad():
        x = torch.randn(2, norm.num_channels, 300) * 3 + 1
        assert torch.equal(norm(x), fairseq_norm(x))
        out = norm(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), fairseq_norm(x.bfloat16()).float(), atol=0.05, rtol=0.02)


def test_the_waveform_conv_as_a_matmul_is_the_conv(tiny_hubert):
    """Under bf16 the extractor's first conv (one input channel) is a product of the waveform's windows with the
    kernels: the conv's values in fp32; in bf16 those of bf16 conv1d within one rounding of its output."""
    from speechgpt_fairseq.speech.hubert import WaveformConvAsMatmul

    conv = HubertFeatureReader(tiny_hubert, layer=1).model.feature_extractor.conv_layers[0][0]
    assert type(HubertFeatureReader(tiny_hubert, layer=1, bf16=True).model.feature_extractor.conv_layers[0][0]) \
        is WaveformConvAsMatmul
    x = torch.randn(2, 1, 4003)  # the last window ends 3 samples before the end, as the conv's does
    with torch.no_grad():
        ref, ours = conv(x), WaveformConvAsMatmul(conv)(x)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
        conv.to(torch.bfloat16)
        ref, ours = conv(x.bfloat16()), WaveformConvAsMatmul(conv)(x)
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), ref.float(), atol=1e-3, rtol=2 ** -7)


def test_an_odd_number_of_frames_gets_fairseqs_features(tiny_hubert, waveforms, fairseq_reader):
    """One piece alone with an odd number of frames: fairseq pads a frame and masks it, the reader does not pad;
    the features are the same."""
    reader = HubertFeatureReader(tiny_hubert, layer=2)
    odd = [w for w in waveforms if reader.num_frames(len(w)) % 2]
    assert odd
    for wav in odd:
        [ours] = reader.features(reader.segments(wav))
        [theirs] = fairseq_reader(tiny_hubert, 2, [wav])
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5, rtol=0)


def test_the_model_is_fairseqs_and_torch_draws_again_after_loading(tiny_hubert, tmp_path):
    """The reader's model is built without drawing initial weights (the checkpoint gives them all): its weights are
    those of fairseq's own loader, and torch.nn.init draws again afterwards, also after a load that failed."""
    from fairseq import checkpoint_utils
    from torch import nn

    from speechgpt_fairseq.errors import InputError
    from speechgpt_fairseq.speech.hubert import fold_weight_norms

    draws = {name: getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_")}
    ours = HubertFeatureReader(tiny_hubert, layer=2).model.state_dict()  # (registers the checkpoint's classes)
    (fairseq_model,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(tiny_hubert)])
    fold_weight_norms(fairseq_model)  # as the reader does: the positional conv's weight, computed once
    theirs = fairseq_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a loadable"):
        HubertFeatureReader(tmp_path / "bad.pt")
    assert {name: getattr(nn.init, name) for name in draws} == draws
    assert nn.init.normal_(torch.zeros(100)).std() > 0.5


def test_errors(tiny_hubert, tmp_path):
    with pytest.raises(ValueError, match=r"tiny_hubert\.pt: layer 3 does not exist: the model has layers 1\.\.2"):
        HubertFeatureReader(tiny_hubert, layer=3)
    with pytest.raises(FileNotFoundError, match="missing.pt: no such HuBERT checkpoint"):
        HubertFeatureReader(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="max_chunk 300"):
        HubertFeatureReader(tiny_hubert, layer=1, max_chunk=300)
