"""unit2speech: units to wavs with a unit HiFi-GAN vocoder (fairseq's CodeHiFiGANVocoder)."""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from speechgpt_fairseq.atomic_files import check_output_file, check_writable, remove_stray_files
from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.units import UnitFormatError, detect_unit_format, parse_kmeans_labels, parse_unit_string
from speechgpt_fairseq.speech.vocoder import UnitVocoder, write_wav
from speechgpt_fairseq.text_files import not_utf8, open_text

logger = logging.getLogger(__name__)


class UnitsInputError(InputError):
    """A units file, line or ids file that cannot be spoken; the message names the file and line."""


def parse_units(line: str, fmt: str, num_units: int) -> list[int]:
    """Units of one utterance: k-means labels `12 7 301` or a unit string `<sosp><12><7><301><eosp>`."""
    if not line.strip():
        raise UnitFormatError("empty line: expected the units of one utterance")
    if bad := not_utf8(line):
        raise UnitFormatError(bad)
    units = parse_kmeans_labels(line, num_units) if fmt == "kmeans" else parse_unit_string(line, num_units)[0]
    if not units:
        raise UnitFormatError("no units in this line")
    return units


def read_utterances(lines: list[str], source: str, num_units: int, skip_bad: bool, skipped: Counter
                    ) -> list[tuple[int, list[int]]]:
    """(0-based line index, units) for every line; the format is detected from the first non-empty line. A bad
    line raises UnitsInputError naming `source:line`, or with `skip_bad` is logged and counted in `skipped`."""
    first = next((line for line in lines if line.strip()), "")
    fmt = detect_unit_format(first)
    kind = "k-means labels" if fmt == "kmeans" else "SpeechGPT unit strings"
    utterances = []
    for index, line in enumerate(lines):
        try:
            utterances.append((index, parse_units(line, fmt, num_units)))
        except UnitFormatError as e:
            message = f"{source}:{index + 1}: {e} (this input holds {kind}, detected from its first line)"
            if not skip_bad:
                raise UnitsInputError(message) from None
            logger.warning("skipped %s", message)
            skipped["empty" if not line.strip() else "out of range" if "out of range" in str(e) else "malformed"] += 1
    return utterances


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open_text(path) as f:  # a line that is not UTF-8 is reported with its number by parse_units
        return f.read().splitlines()


def wav_names(ids: Path | None, count: int) -> list[str]:
    """`{index}.wav` for each input line, or the names of an ids file (one per input line)."""
    if ids is None:
        return [f"{i}.wav" for i in range(count)]
    names = [line.strip() for line in read_lines(ids)]
    if len(names) != count:
        raise UnitsInputError(f"{ids}: has {len(names)} lines, the units have {count} (one name per utterance)")
    seen: dict[str, int] = {}
    for lineno, name in enumerate(names, 1):
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise UnitsInputError(f"{ids}:{lineno}: {name!r} is not a file name (expected a name like utt1)")
        if name in seen:
            raise UnitsInputError(f"{ids}:{lineno}: {name!r} repeats line {seen[name]}")
        seen[name] = lineno
    return [n if n.endswith(".wav") else f"{n}.wav" for n in names]


class Unit2Speech:
    """Speak units with a unit HiFi-GAN vocoder: a checkpoint and config.json in the format of fairseq's released
    unit vocoders (as SpeechGPT uses). Input is a units file, one utterance per line (fairseq k-means labels
    `12 7 301` or SpeechGPT unit strings `<sosp><12><7><301><eosp>`, detected from the first line), or one
    utterance with --units. Writes OUT/{line index}.wav (0-based) or OUT/{id}.wav, each wav whole or not at all.
    A bad line stops with its file and line before any wav is written (or is skipped with --skip-bad)."""

    help = "units to speech: one wav per line with a unit HiFi-GAN vocoder (fairseq CodeHiFiGAN)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("input", nargs="?", default=None, help="units file (k-means labels or SpeechGPT unit strings)")
        p.add_argument("--units", default=None, help='one utterance instead of a file, e.g. "<sosp><12><7><eosp>"')
        p.add_argument("--vocoder", required=True, help="vocoder checkpoint (generator weights under 'generator')")
        p.add_argument("--vocoder-config", required=True, help="the vocoder's config.json")
        p.add_argument("--out", required=True, help="directory for the wavs (created; wavs of the same name are replaced)")
        p.add_argument("--ids", default=None, help="file of wav names, one per input line (default: the line index)")
        p.add_argument("--speaker", type=int, default=None, help="speaker id, required by multi-speaker vocoders")
        p.add_argument("--dur-prediction", action=argparse.BooleanOptionalAction, default=True,
                       help="merge repeated units and predict each unit's duration, for SpeechGPT's deduplicated "
                            "units (default); --no-dur-prediction gives every unit one frame (20 ms)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
        p.add_argument("--skip-bad", action="store_true", help="skip bad lines and count them, instead of stopping")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args) -> None:
        if (args.input is None) == (args.units is None):
            raise UnitsInputError("give a units file or --units, not both or neither")
        check_writable(args.out, inside=True)
        vocoder = UnitVocoder.from_files(args.vocoder, args.vocoder_config, device=args.device)
        vocoder.check([0], args.speaker)  # speaker errors before any work
        source = "--units" if args.input is None else args.input
        lines = [args.units] if args.input is None else read_lines(Path(args.input))
        if not any(line.strip() for line in lines):
            raise UnitsInputError(f"{source}: no units to speak (an empty input; nothing written)")
        skipped: Counter = Counter()
        utterances = read_utterances(lines, source, vocoder.num_units, args.skip_bad, skipped)
        names = wav_names(None if args.ids is None else Path(args.ids), len(lines))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        seconds = 0.0
        for index, units in tqdm(utterances, desc="unit2speech", unit=" wav", disable=args.no_progress):
            wav = vocoder(units, args.speaker, dur_prediction=args.dur_prediction)
            write_wav(out / names[index], wav, vocoder.sample_rate, sweep=False)
            seconds += len(wav) / vocoder.sample_rate
        remove_stray_files(out)  # what a killed earlier run left
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        print(f"wrote {out}: {len(utterances)} wavs, {seconds:.1f} s at {vocoder.sample_rate} Hz; "
              f"skipped {sum(skipped.values())}" + (f" ({reasons})" if reasons else ""))


class FitExemplarVocoder:
    """Fit a concatenative exemplar vocoder on audio and its units, in seconds, with nothing downloaded: each
    unit is spoken as the frame of real speech nearest its k-means centroid, for the unit's mean duration.
    Robotic, but it lets a model trained on your own units (the demo's MFCC units, say) be heard; `chat
    --vocoder FILE.npz` uses it. A unit HiFi-GAN sounds far better where one exists for your units."""

    help = "fit a concatenative unit vocoder on audio (no neural training; for units that have no HiFi-GAN)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", metavar="INPUT", help="a fairseq audio manifest, directories or files")
        p.add_argument("--kmeans", required=True, help="the k-means model of the units")
        p.add_argument("--hubert", default=None, help="fairseq HuBERT checkpoint (default: MFCC features)")
        p.add_argument("--layer", type=int, default=11, help="HuBERT layer (default 11)")
        p.add_argument("--max-files", type=positive_int, default=1000,
                       help="fit on at most this many files (default 1000)")
        p.add_argument("--out", required=True, help="vocoder file to write (.npz)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args) -> None:
        from speechgpt_fairseq.speech.audio import list_audio
        from speechgpt_fairseq.speech.exemplar_vocoder import fit_exemplar_vocoder

        if not args.out.endswith(".npz"):
            raise InputError(f"{args.out}: the vocoder file is an .npz")
        check_output_file(args.out)
        _, entries = list_audio(args.inputs)
        vocoder = fit_exemplar_vocoder(entries[:args.max_files], args.kmeans, args.hubert, args.layer,
                                       show_progress=not args.no_progress)
        vocoder.save(args.out)
        seen = int((abs(vocoder.frames).sum(1) > 0).sum())
        print(f"wrote {args.out}: {seen} of {vocoder.num_units} units have an exemplar, from "
              f"{min(len(entries), args.max_files)} files")
