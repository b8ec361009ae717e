"""speech2unit and learn-kmeans: audio to k-means units, and k-means models fitted on speech features."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from speechgpt_fairseq.atomic_files import OutputExistsError, atomic_file, check_output_file, check_writable
from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.audio import SAMPLE_RATE, AudioEntry, AudioError, list_audio
from speechgpt_fairseq.speech.hubert import MAX_CHUNK
from speechgpt_fairseq.speech.kmeans import FAIRSEQ_KMEANS_OPTIONS, MFCC_AVERAGE_ATTRIBUTE, fit_kmeans, save_kmeans
from speechgpt_fairseq.speech.speech2unit import (MAX_BATCH_SAMPLES, WINDOW_BATCHES, SpeechFeatures, SpeechToUnits,
                                                  read_windows, shard_range)
from speechgpt_fairseq.speech.units import dedup_units, format_kmeans_labels, format_unit_string, unit_durations

logger = logging.getLogger(__name__)


def add_feature_arguments(p: argparse.ArgumentParser) -> None:
    """Inputs and features, the same for both verbs."""
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a fairseq audio manifest (.tsv: root line, then path<TAB>samples), or directories "
                        "(searched recursively) and audio files")
    p.add_argument("--hubert", metavar="CKPT", default=None,
                   help="fairseq HuBERT checkpoint (e.g. mHuBERT); default: MFCC + deltas (39 dims)")
    p.add_argument("--layer", type=int, default=11, help="HuBERT transformer layer, 1-based (default 11)")
    p.add_argument("--max-chunk", type=int, default=MAX_CHUNK,
                   help=f"HuBERT encodes long audio in chunks of this many samples (default {MAX_CHUNK}, as fairseq)")
    p.add_argument("--max-batch-samples", type=int, default=None,
                   help=f"padded samples per HuBERT forward pass; files are batched by length (default: "
                        f"{MAX_BATCH_SAMPLES} on a GPU; 1 on a CPU, one file per pass, where padding costs more "
                        f"than batching saves)")
    p.add_argument("--device", default="cpu", help="torch device for HuBERT, e.g. cuda")
    p.add_argument("--bf16", action="store_true", help="run HuBERT under bfloat16 autocast")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad audio files and report them by reason at the end, instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def listed_audio(inputs: list[str]) -> list[AudioEntry]:
    _, entries = list_audio(inputs)
    if not entries:
        raise AudioError(f"{inputs[0]}: lists no audio files", "empty")
    return entries


def file_sha256(path: Path) -> str:
    """The content digest of a model file a resumable run depends on: a file refitted or replaced at the same
    path is another model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def model_settings(args) -> dict:
    """The models (k-means, features) labels depend on, with their files' digests: a resumed run must match them."""
    kmeans = Path(args.kmeans).resolve()
    settings = {"kmeans": str(kmeans), "kmeans_sha256": file_sha256(kmeans)}
    if args.hubert is None:
        return {**settings, "features": "mfcc"}
    hubert = Path(args.hubert).resolve()
    return {**settings, "hubert": str(hubert), "hubert_sha256": file_sha256(hubert), "layer": args.layer,
            "max_chunk": args.max_chunk, "bf16": args.bf16}


def skipped_report(skipped: list[list[str]]) -> str:
    """`skipped N (reason: n, ...)` and one line per skipped file."""
    counts = Counter(reason for _, reason, _ in skipped)
    text = f"skipped {len(skipped)}" + (" (" + ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) + ")"
                                        if skipped else "")
    return "\n".join([text] + [f"  {reason}: {message}" for _, reason, message in skipped])


class ShardProgress:
    """The output files of one shard, appended a window of input files at a time in OUT/.{stem}.partial/, with a
    state file counting the input files done; renamed to OUT/{stem}.{suffix} when the shard is complete.

    A run killed at any moment resumes after the last window recorded in the state: lines appended after it are
    cut off, so no line is lost or written twice, and the final files never exist half-written."""

    def __init__(self, out: Path, stem: str, suffixes: list[str], settings: dict, overwrite: bool = False):
        self.dir = out / f".{stem}.partial"
        self.finals = {suffix: out / f"{stem}.{suffix}" for suffix in suffixes}
        self.state_path = self.dir / "state.json"
        self.made: list[Path] = []  # the directories this run creates for OUT (none when it resumes)
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
            self._check_settings(settings)
            for suffix, size in self.state["sizes"].items():
                if (self.dir / suffix).exists():
                    os.truncate(self.dir / suffix, size)
            logger.info("resuming %s: %d input files done", self.dir, self.state["done"])
            return
        if not overwrite and (existing := [p for p in self.finals.values() if p.exists()]):
            raise OutputExistsError(f"{existing[0]}: exists (pass --overwrite to replace it)")
        self.made = [d for d in [out.absolute(), *out.absolute().parents] if not d.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        for suffix in suffixes:
            (self.dir / suffix).write_bytes(b"")
        self.state = {"settings": settings, "done": 0, "sizes": dict.fromkeys(suffixes, 0), "skipped": [],
                      "utterances": 0, "frames": 0, "seconds": 0.0}
        self._save()

    def _check_settings(self, settings: dict) -> None:
        before = self.state["settings"]
        for key in sorted(before.keys() | settings.keys()):
            if before.get(key) != settings.get(key):
                raise OutputExistsError(
                    f"{self.dir}: holds an interrupted run with other settings ({key}: {before.get(key)} then, "
                    f"{settings.get(key)} now); run it again as it was to finish it, or pass --overwrite to restart")

    def _save(self) -> None:
        with atomic_file(self.state_path) as tmp:
            tmp.write_text(json.dumps(self.state), encoding="utf-8")

    @property
    def done(self) -> int:
        return self.state["done"]

    def append(self, files: int, lines: dict[str, list[str]], skipped: list[list[str]], frames: int,
               seconds: float) -> None:
        """Record `files` more input files done: their output `lines` per suffix and the `skipped` ones."""
        for suffix, new in lines.items():
            with open(self.dir / suffix, "ab") as f:
                f.write("".join(line + "\n" for line in new).encode("utf-8"))
                self.state["sizes"][suffix] = f.tell()
        self.state["done"] += files
        self.state["skipped"] += skipped
        self.state["utterances"] += len(next(iter(lines.values())))
        self.state["frames"] += frames
        self.state["seconds"] += seconds
        self._save()  # the state moves on only once the lines are in the files

    def discard(self) -> None:
        """Remove a run that failed before any file was done: its state, and the directories it created for OUT
        while they are empty (nothing to resume, so nothing is left behind)."""
        shutil.rmtree(self.dir)
        for directory in self.made:
            try:
                directory.rmdir()
            except OSError:  # holds other outputs (another split), or was there already
                break

    def finish(self) -> None:
        """Move the complete files to their final names. The earlier outputs they replace go first, so that a kill
        in between leaves some outputs missing (the same command finishes them), never a new SPLIT.km beside the
        SPLIT.units of an earlier run."""
        # a kill inside an earlier finish() may have moved some already
        pending = {suffix: final for suffix, final in self.finals.items() if (self.dir / suffix).exists()}
        for final in pending.values():
            final.unlink(missing_ok=True)
        for suffix, final in pending.items():
            os.replace(self.dir / suffix, final)
        shutil.rmtree(self.dir)


class Speech2Unit:
    """Speech to units: HuBERT features (a fairseq checkpoint, layer --layer) or MFCC + deltas, labelled with a
    k-means model (joblib: ours, fairseq's learn_kmeans, SpeechGPT's km1000.bin). Writes, one line per utterance
    in input order: OUT/SPLIT.km (fairseq k-means labels, one per frame, as dump_km_label writes them),
    OUT/SPLIT.units (SpeechGPT unit strings <sosp><u>...<eosp>), OUT/SPLIT.names (the file of each line) and,
    with --durations, OUT/SPLIT.dur (run length of each unit); with --each, every input to its own SPLIT.
    Shard R of N writes SPLIT_R_N.* (fairseq's names). Work is recorded a window of files at a time: a killed run, started again with the same command,
    goes on where it stopped. A bad file stops the run naming it (or, with --skip-bad, is left out and reported)."""

    help = "speech to units (HuBERT or MFCC features + k-means): fairseq .km labels and SpeechGPT unit strings"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_feature_arguments(p)
        p.add_argument("--kmeans", required=True, help="k-means model (joblib), e.g. mhubert_base_..._km1000.bin")
        p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
        p.add_argument("--split", default=None,
                       help="output name (default: the manifest's name, e.g. train for train.tsv; else 'all')")
        p.add_argument("--each", action="store_true",
                       help="one output per input, named after it (train.tsv valid.tsv -> OUT/train.*, OUT/valid.*), "
                            "the models loaded once")
        p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                       help="merge runs of a repeated unit in the unit strings, as SpeechGPT does (default: on); "
                            "the .km labels always keep every frame")
        p.add_argument("--durations", action="store_true",
                       help="also write SPLIT.dur: the run length (frames) of each deduplicated unit")
        p.add_argument("--shard", type=int, default=0, help="which shard to do, 0-based (default 0)")
        p.add_argument("--nshard", type=int, default=1, help="number of shards the inputs are split in (default 1)")

    @staticmethod
    def run(args) -> None:
        if args.durations and not args.dedup:
            raise InputError("--durations gives the run lengths of deduplicated units; it needs --dedup")
        check_writable(args.out, inside=True)
        inputs = [Path(i) for i in args.inputs]
        if args.each:
            if args.split:
                raise InputError("--each names each output after its input: it takes no --split")
            stems = [i.stem for i in inputs]
            if len(set(stems)) < len(stems):
                raise InputError(f"--each: two inputs have the same name ({', '.join(sorted(stems))}): their "
                                 f"outputs would collide")
            groups = [(i.stem, [str(i)]) for i in inputs]
        else:
            groups = [(args.split or (inputs[0].stem if inputs[0].suffix == ".tsv" else "all"), args.inputs)]
        listed = [(split, listed_audio(paths)) for split, paths in groups]  # every input is checked first
        with ThreadPoolExecutor(1) as hashing:  # the model files are hashed (0.2 s for HuBERT-base) as they load
            models = hashing.submit(model_settings, args)
            speech2unit = SpeechToUnits(args.kmeans, hubert=args.hubert, layer=args.layer, device=args.device,
                                        bf16=args.bf16, max_chunk=args.max_chunk)  # bad models fail before any output
            models = models.result()
        for split, entries in listed:
            label_split(speech2unit, split, entries, args, models)


def label_split(speech2unit: SpeechToUnits, split: str, entries: list[AudioEntry], args, models: dict) -> None:
    """Label this shard of `entries` into OUT/SPLIT.*, resuming a killed run of the same command (`models`: the
    model_settings it must share)."""
    start, end = shard_range(len(entries), args.nshard, args.shard)
    entries = entries[start:end]
    stem = split if args.nshard == 1 else f"{split}_{args.shard}_{args.nshard}"
    suffixes = ["km", "units", "names"] + (["dur"] if args.durations else [])
    listing = "\n".join(f"{e.path}\t{e.num_samples}" for e in entries).encode("utf-8")
    settings = {"inputs": hashlib.sha256(listing).hexdigest(), "files": len(entries), **models, "dedup": args.dedup,
                "durations": args.durations}
    progress = ShardProgress(Path(args.out), stem, suffixes, settings, args.overwrite)
    started, seconds_before = time.perf_counter(), progress.state["seconds"]
    bar = tqdm(total=len(entries), initial=progress.done, desc=f"speech2unit {split}", unit=" file",
               disable=args.no_progress)
    try:
        for window in read_windows(entries[progress.done:], window_samples(args), args.skip_bad):
            good = [(entry, wav) for entry, wav in window if isinstance(wav, np.ndarray)]
            labels = speech2unit.labels([wav for _, wav in good], batch_samples(args))
            progress.append(len(window), unit_lines([e for e, _ in good], labels, args.dedup, args.durations),
                            skipped=[[e.name, w.reason, str(w)] for e, w in window if isinstance(w, AudioError)],
                            frames=sum(map(len, labels)), seconds=sum(len(w) for _, w in good) / SAMPLE_RATE)
            bar.update(len(window))
    except AudioError:
        if progress.done:
            logger.error("the %d files done are kept in %s: the same command goes on from there",
                         progress.done, progress.dir)
        else:
            progress.discard()
        raise
    finally:
        bar.close()
    state = progress.state
    progress.finish()
    elapsed = time.perf_counter() - started
    logger.info("%.1f s of audio in %.1f s: %.1f s of audio per second", state["seconds"] - seconds_before,
                elapsed, (state["seconds"] - seconds_before) / max(elapsed, 1e-9))
    print(f"wrote {', '.join(map(str, progress.finals.values()))}: {state['utterances']} utterances, "
          f"{state['seconds']:.1f} s of audio, {state['frames']} frames; " + skipped_report(state["skipped"]))


def batch_samples(args) -> int:
    """--max-batch-samples, or its default for the device: batches on a GPU, one file per pass on a CPU."""
    if args.max_batch_samples is not None:
        return args.max_batch_samples
    return 1 if args.device == "cpu" else MAX_BATCH_SAMPLES


def window_samples(args) -> int:
    """Audio read (and recorded for resuming) at a time: about WINDOW_BATCHES batches of --max-batch-samples, or
    of the GPU default when the CPU default (one file per pass) applies."""
    return WINDOW_BATCHES * (args.max_batch_samples or MAX_BATCH_SAMPLES)


def unit_lines(entries: list[AudioEntry], labels: list[list[int]], dedup: bool, durations: bool
               ) -> dict[str, list[str]]:
    """The output lines of each utterance, per file suffix."""
    lines = {"km": [format_kmeans_labels(u) for u in labels],
             "units": [format_unit_string(dedup_units(u) if dedup else u) for u in labels],
             "names": [e.name for e in entries]}
    if durations:
        lines["dur"] = [" ".join(map(str, unit_durations(u))) for u in labels]
    return lines


class LearnKmeans:
    """Fit k-means on speech features, as fairseq's HuBERT recipe (simple_kmeans/learn_kmeans.py) does:
    scikit-learn MiniBatchKMeans with its settings (each an option), on the features of a --percent fraction of
    the input files (chosen as fairseq chooses them), saved with joblib. The file is interchangeable with
    fairseq's and SpeechGPT's (km1000.bin): speech2unit here, fairseq's dump_km_label and SpeechGPT read it."""

    help = "fit a k-means model (MiniBatchKMeans, fairseq's HuBERT settings) on HuBERT or MFCC features"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_feature_arguments(p)
        p.add_argument("--out", required=True, metavar="FILE", help="k-means file to write (joblib), e.g. km1000.bin")
        p.add_argument("--n-clusters", type=positive_int, default=1000,
                       help="number of clusters K (default 1000, SpeechGPT's)")
        p.add_argument("--percent", type=float, default=-1,
                       help="fraction (0, 1] of the files to fit on, drawn with --seed; -1: all (default)")
        p.add_argument("--seed", type=int, default=0, help="seed of the file sample and of k-means (default 0)")
        p.add_argument("--mfcc-average", type=positive_int, default=1, metavar="N",
                       help="MFCC features only: average each frame with its neighbours, over N frames (odd; default "
                            "1, fairseq's features). Labels then depend less on where the 10 ms frames fall on the "
                            "sound. Recorded in the k-means file: speech2unit, chat and fit-exemplar-vocoder compute "
                            "the same features from it; fairseq's dump_mfcc_feature does not average")
        opts = FAIRSEQ_KMEANS_OPTIONS
        p.add_argument("--init", default=opts["init"], choices=["k-means++", "random"],
                       help=f"centroid initialisation (default {opts['init']})")
        p.add_argument("--max-iter", type=int, default=opts["max_iter"],
                       help=f"passes over the features at most (default {opts['max_iter']})")
        p.add_argument("--batch-size", type=int, default=opts["batch_size"],
                       help=f"frames per mini-batch (default {opts['batch_size']})")
        p.add_argument("--tol", type=float, default=opts["tol"],
                       help=f"stop when the centres move less than this (default {opts['tol']}: off)")
        p.add_argument("--max-no-improvement", type=int, default=opts["max_no_improvement"],
                       help=f"stop after this many mini-batches without improvement (default "
                            f"{opts['max_no_improvement']})")
        p.add_argument("--n-init", type=int, default=opts["n_init"],
                       help=f"initialisations tried; the best is kept (default {opts['n_init']})")
        p.add_argument("--reassignment-ratio", type=float, default=opts["reassignment_ratio"],
                       help=f"reassign centres with fewer counts than this share (default "
                            f"{opts['reassignment_ratio']})")

    @staticmethod
    def run(args) -> None:
        out = Path(args.out)
        check_output_file(out)
        if out.exists() and not args.overwrite:
            raise OutputExistsError(f"{out}: exists (pass --overwrite to replace it)")
        entries = sample_files(listed_audio(args.inputs), args.percent, args.seed)
        extractor = SpeechFeatures(args.hubert, args.layer, args.device, args.bf16, args.max_chunk, args.mfcc_average)
        features, skipped = [], []
        with tqdm(total=len(entries), desc="features", unit=" file", disable=args.no_progress) as bar:
            for window in read_windows(entries, window_samples(args), args.skip_bad):
                good = [wav for _, wav in window if isinstance(wav, np.ndarray)]
                features += extractor(good, batch_samples(args)) if good else []
                skipped += [[e.name, w.reason, str(w)] for e, w in window if isinstance(w, AudioError)]
                bar.update(len(window))
        if not features:
            raise AudioError(f"{args.inputs[0]}: no usable audio to fit k-means on", "empty")
        frames = np.concatenate(features)
        model = fit_kmeans(frames, args.n_clusters, seed=args.seed, init=args.init, max_iter=args.max_iter,
                           batch_size=args.batch_size, tol=args.tol, max_no_improvement=args.max_no_improvement,
                           n_init=args.n_init, reassignment_ratio=args.reassignment_ratio)
        if args.mfcc_average > 1:
            setattr(model, MFCC_AVERAGE_ATTRIBUTE, args.mfcc_average)
        save_kmeans(model, out)
        print(f"wrote {out}: {args.n_clusters} clusters of {extractor.dim}-dim features ({extractor.name}), "
              f"fitted on {len(frames)} frames of {len(features)} files; " + skipped_report(skipped))


def sample_files(entries: list[AudioEntry], percent: float, seed: int) -> list[AudioEntry]:
    """A `percent` fraction of the files, in fairseq learn_kmeans's draw (numpy's legacy seeded choice without
    replacement, ceil(n * percent) files, in drawn order); all of them when `percent` < 0."""
    if percent < 0:
        return entries
    if not 0 < percent <= 1:
        raise InputError(f"--percent {percent}: expected a fraction in (0, 1], or -1 for all the files")
    count = math.ceil(len(entries) * percent)
    return [entries[i] for i in np.random.RandomState(seed).choice(len(entries), count, replace=False)]
