"""Units to speech: fairseq's unit HiFi-GAN (CodeHiFiGANVocoder), as SpeechGPT vocodes its spoken answers.

A vocoder is a checkpoint holding the generator under `"generator"` plus the config.json of fairseq's released
unit vocoders (speech-resynthesis keys: `upsample_rates`, `num_embeddings`, `embedding_dim`, `model_in_dim`,
`dur_predictor_params`, `multispkr`, `num_speakers`, `sampling_rate`, ...). fairseq's own class loads it, under
torch's default `weights_only=True`: such a checkpoint holds only tensors.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from speechgpt_fairseq.atomic_files import atomic_file
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.units import dedup_units

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock_kernel_sizes",
                 "resblock_dilation_sizes", "num_embeddings", "embedding_dim")


class VocoderError(InputError):
    """A vocoder file that cannot be used, or an input it cannot speak; the message says which and why."""


def read_vocoder_config(path: str | Path) -> dict:
    """config.json of a unit vocoder, checked for the keys CodeHiFiGAN needs and for unsupported conditioning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such vocoder config (expected the config.json of a unit HiFi-GAN)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VocoderError(f"{path}: not a JSON vocoder config ({e})") from None
    if not isinstance(cfg, dict):
        raise VocoderError(f"{path}: expected a JSON object (a unit HiFi-GAN config), found {type(cfg).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise VocoderError(f"{path}: not a unit HiFi-GAN config, missing {', '.join(missing)}")
    # units-only vocoders: F0 inputs and external speaker embeddings would need inputs SpeechGPT does not produce
    for key, what in (("f0", "F0-conditioned"), ("embedder_params", "speaker-embedding (x-vector)")):
        if cfg.get(key):
            raise VocoderError(f"{path}: {what} vocoders are not supported ({key!r} is set); "
                               f"expected a vocoder conditioned on units (and a speaker id) only")
    return cfg


class UnitVocoder:
    """Speaks unit sequences with fairseq's CodeHiFiGANVocoder: `UnitVocoder.from_files(ckpt, cfg)(units)`."""

    def __init__(self, model: torch.nn.Module, cfg: dict, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.num_units: int = cfg["num_embeddings"]
        self.num_speakers: int | None = cfg.get("num_speakers", 200) if cfg.get("multispkr") else None
        self.sample_rate: int = int(cfg.get("sampling_rate", 16000))
        self.hop_length: int = math.prod(cfg["upsample_rates"])  # samples per unit frame: 320 = 20 ms at 16 kHz
        self.has_duration_predictor: bool = bool(cfg.get("dur_predictor_params"))
        self._warned_no_durations = False

    @classmethod
    def from_files(cls, checkpoint: str | Path, config: str | Path, device: str | torch.device = "cpu"
                   ) -> UnitVocoder:
        """Load a checkpoint + config.json in the format of fairseq's released unit vocoders."""
        from fairseq.models.text_to_speech.vocoder import CodeHiFiGANVocoder

        from speechgpt_fairseq import fairseq_fixes

        fairseq_fixes.apply()  # checkpoint loading under weights_only (the whole plugin is not needed: hubert.py)
        checkpoint = Path(checkpoint)
        cfg = read_vocoder_config(config)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no such vocoder checkpoint")
        try:
            # fairseq prints "Removing weight norm..." and uses torch's deprecated (but equivalent) weight_norm
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
                model = CodeHiFiGANVocoder(str(checkpoint), cfg)
        except (pickle.UnpicklingError, EOFError) as e:  # torch's text is advice about weights_only: not this case
            raise VocoderError(f"{checkpoint}: not a loadable vocoder checkpoint (damaged, cut short, or another "
                               f"kind of file: {type(e).__name__})") from None
        except KeyError as e:
            if e.args != ("generator",):
                raise VocoderError(f"{config}: not a unit HiFi-GAN config, missing {e}") from None
            raise VocoderError(f"{checkpoint}: expected a dict with the generator's weights under 'generator' "
                               f"(a unit HiFi-GAN checkpoint)") from None
        except (TypeError, IndexError):
            raise VocoderError(f"{checkpoint}: expected a dict with the generator's weights under 'generator' "
                               f"(a unit HiFi-GAN checkpoint)") from None
        except AttributeError as e:  # dur_predictor_params become a Namespace
            raise VocoderError(f"{config}: dur_predictor_params lacks {e.name!r}") from None
        except RuntimeError as e:
            if "state_dict" in str(e):  # load_state_dict: the checkpoint does not match the config
                raise VocoderError(f"{checkpoint}: does not match {config}: {str(e)[:1000]}") from None
            raise VocoderError(f"{checkpoint}: not a loadable vocoder checkpoint ({e})") from None
        vocoder = cls(model, cfg, device)
        logger.info("unit vocoder %s: K=%d, %s, duration predictor %s, %d Hz", checkpoint, vocoder.num_units,
                    f"{vocoder.num_speakers} speakers" if vocoder.num_speakers else "single speaker",
                    "yes" if vocoder.has_duration_predictor else "no", vocoder.sample_rate)
        return vocoder

    def check(self, units: list[int], speaker: int | None = None) -> None:
        """Raise VocoderError unless `units` and `speaker` are valid inputs of this vocoder."""
        if len(units) == 0:
            raise VocoderError("no units to speak (empty unit sequence)")
        bad = next((u for u in units if not 0 <= u < self.num_units), None)
        if bad is not None:
            raise VocoderError(f"unit {bad} is out of range: this vocoder has {self.num_units} units "
                               f"(0..{self.num_units - 1}, its num_embeddings)")
        if self.num_speakers is None:
            if speaker is not None:
                raise VocoderError(f"speaker {speaker} given, but this vocoder has a single speaker")
        elif speaker is None:
            raise VocoderError(f"this vocoder has {self.num_speakers} speakers: choose one (0..{self.num_speakers - 1})")
        elif not 0 <= speaker < self.num_speakers:
            raise VocoderError(f"speaker {speaker} is out of range: this vocoder has {self.num_speakers} speakers "
                               f"(0..{self.num_speakers - 1})")

    @torch.inference_mode()
    def __call__(self, units: list[int], speaker: int | None = None, dur_prediction: bool = True) -> np.ndarray:
        """Waveform (float32, mono, `sample_rate` Hz) for `units`.

        With `dur_prediction` (and a vocoder that has a duration predictor), repeated units are merged first and
        each unit lasts as long as the predictor says, as for SpeechGPT's deduplicated units; without it, each
        unit lasts one frame (`hop_length` samples).
        """
        self.check(units, speaker)
        if dur_prediction and not self.has_duration_predictor:
            if not self._warned_no_durations:
                logger.warning("this vocoder has no duration predictor: every unit lasts one frame "
                               "(deduplicated units will sound fast)")
                self._warned_no_durations = True
            dur_prediction = False
        if dur_prediction:
            units = dedup_units(units)  # the predictor was trained on reduced units
        x = {"code": torch.tensor(units, dtype=torch.long, device=self.device).view(1, -1)}  # (1, T)
        if speaker is not None:
            x["spkr"] = torch.tensor([[speaker]], dtype=torch.long, device=self.device)  # (1, 1)
        wav = self.model(x, dur_prediction)  # (samples,)
        return wav.float().cpu().numpy().reshape(-1)


def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int, sweep: bool = True) -> None:
    """Write `wav` as a 16-bit PCM wav, whole or not at all (under a temporary name, then renamed); `sweep=False`
    for one of many wavs of a directory, swept once with `remove_stray_files`."""
    with atomic_file(path, sweep) as tmp:
        sf.write(tmp, wav, sample_rate, format="WAV", subtype="PCM_16")
