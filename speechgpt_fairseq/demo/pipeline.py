"""The offline demo as a list of commands: the `speechgpt` verbs and fairseq commands a user runs by hand, in
order, each printed before it runs. Every step leaves a marker with its command when it succeeds, so a demo
that was stopped continues where it stopped (a step whose command changed runs again, and so do the steps
after it); each command's output goes to OUT/logs/NN-step.log.

    OUT/corpus/   espeak-ng audio, manifests, transcripts, tokenizer (make-corpus)
    OUT/units/    k-means model, units of every manifest, an exemplar vocoder (learn-kmeans, speech2unit,
                  fit-exemplar-vocoder)
    OUT/stage1/, OUT/stage2/, OUT/stage3/   data-bin, checkpoints, generations and scores
    OUT/untrained/   the same models before any update: the baselines
    OUT/report/   report.md, curves.png, the spoken answer
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import speechgpt_fairseq

SPLITS = ("train", "valid", "test")
NUM_UNITS = 100


class DemoError(ValueError):
    """A demo step that failed; the message names the command and its log."""


@dataclass
class Sizes:
    """How big the demo is: the full run (the README's) or the quick one the tests run."""

    sentences: tuple[int, int, int] = (6000, 300, 100)
    pairs: tuple[int, int, int] = (3000, 150, 100)
    updates: dict[str, int] = field(default_factory=lambda: {"stage1": 600, "stage2": 1600, "stage3": 900})
    vocab_size: int = 1000
    max_new_tokens: int = 400  # a spoken answer of the corpus is about 100 units after merging repeats

    @classmethod
    def quick(cls) -> Sizes:
        return cls(sentences=(150, 20, 10), pairs=(120, 12, 6),
                   updates={"stage1": 6, "stage2": 6, "stage3": 6}, vocab_size=400, max_new_tokens=40)


@dataclass
class Step:
    name: str
    argv: list[str]


def find_config_dir() -> Path:
    """examples/demo of the repository this package runs from (an editable install, as the README's)."""
    config_dir = Path(speechgpt_fairseq.__file__).resolve().parents[1] / "examples" / "demo"
    if not (config_dir / "stage1.yaml").is_file():
        raise FileNotFoundError(f"{config_dir}: no demo configs; run the demo from a clone of the repository "
                                f"(make install), or pass --config-dir")
    return config_dir


def console(name: str) -> str:
    """A console script installed beside this Python (the environment the demo runs in), else from PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


class DemoPipeline:
    """The commands of the demo for output directory `out`."""

    def __init__(self, out: str | Path, sizes: Sizes = Sizes(), hubert: str | None = None, layer: int = 11,
                 config_dir: str | Path | None = None, workers: int = 2, seed: int = 1):
        self.out = Path(out).absolute()
        self.sizes, self.hubert, self.layer, self.workers, self.seed = sizes, hubert, layer, workers, seed
        self.config_dir = Path(config_dir).absolute() if config_dir else find_config_dir()

    def path(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    # ---- the steps ----------------------------------------------------------------------------------------

    def steps(self) -> list[Step]:
        return [*self.corpus_steps(), *self.unit_steps(), *self.data_steps(), *self.training_steps(),
                *self.evaluation_steps(), self.chat_step()]

    def corpus_steps(self) -> list[Step]:
        s = self.sizes
        return [Step("corpus", ["speechgpt", "make-corpus", "--out", self.path("corpus"), "--no-progress",
                                "--sentences", *map(str, s.sentences), "--pairs", *map(str, s.pairs),
                                "--vocab-size", str(s.vocab_size), "--seed", str(self.seed),
                                "--workers", str(self.workers), "--overwrite"])]

    def features(self) -> list[str]:
        return ["--hubert", self.hubert, "--layer", str(self.layer)] if self.hubert else []

    def manifests(self) -> list[str]:
        return [*SPLITS, *(f"qa_{split}_{kind}" for split in SPLITS for kind in ("questions", "answers"))]

    def unit_steps(self) -> list[Step]:
        kmeans = self.path("units", "kmeans.bin")
        steps = [Step("kmeans", ["speechgpt", "learn-kmeans", self.path("corpus", "train.tsv"), *self.features(),
                                 "--n-clusters", str(NUM_UNITS), "--percent", "0.1", "--seed", str(self.seed),
                                 "--out", kmeans, "--overwrite", "--no-progress"])]
        steps.append(Step("vocoder", ["speechgpt", "fit-exemplar-vocoder", self.path("corpus", "train.tsv"),
                                      *self.features(), "--kmeans", kmeans, "--max-files", "500",
                                      "--out", self.path("units", "vocoder.npz"), "--no-progress"]))
        for name in self.manifests():
            steps.append(Step(f"units-{name}", [
                "speechgpt", "speech2unit", self.path("corpus", f"{name}.tsv"), *self.features(), "--kmeans", kmeans,
                "--out", self.path("units"), "--overwrite", "--no-progress"]))
        return steps

    def data_steps(self) -> list[Step]:
        vocab = ["--vocab", self.path("corpus", "tokenizer.model"), "--num-units", str(NUM_UNITS)]
        steps = [Step("stage1-data", ["speechgpt", "prepare-units", *vocab, "--out", self.path("stage1", "data-bin"),
                                      "--no-progress", *(f"{s}={self.units(s)}" for s in ("train", "valid"))])]
        for split in SPLITS:
            steps.append(Step(f"stage2-{split}", [
                "speechgpt", "build-cross-modal", "--units", self.units(split), "--text",
                self.path("corpus", f"{split}.wrd"), "--num-units", str(NUM_UNITS), "--seed", str(self.seed),
                "--out", self.path("stage2", f"cm_{split}.jsonl"), "--no-progress"]))
        steps.append(Step("stage2-data", ["speechgpt", "prepare-sft", *vocab, "--out", self.path("stage2", "data-bin"),
                                          "--no-progress",
                                          *(f"{s}={self.path('stage2', f'cm_{s}.jsonl')}" for s in SPLITS)]))
        for split in SPLITS:
            # held-out questions are all spoken and answered in speech: the chain of modality in full
            mix = ["--mix", "s2s=1"] if split == "test" else []
            steps.append(Step(f"stage3-{split}", [
                "speechgpt", "build-com", "--manifest", self.path("corpus", f"qa_{split}.jsonl"),
                "--units-i", self.units(f"qa_{split}_questions"), "--units-r", self.units(f"qa_{split}_answers"),
                *mix, "--num-units", str(NUM_UNITS), "--seed", str(self.seed),
                "--out", self.path("stage3", f"com_{split}.jsonl"), "--no-progress"]))
        steps.append(Step("stage3-data", ["speechgpt", "prepare-sft", *vocab, "--out", self.path("stage3", "data-bin"),
                                          "--no-progress",
                                          *(f"{s}={self.path('stage3', f'com_{s}.jsonl')}" for s in SPLITS)]))
        return steps

    def units(self, manifest: str) -> str:
        """speech2unit's SpeechGPT unit strings (repeats merged) of a manifest."""
        return self.path("units", f"{manifest}.units")

    def checkpoint(self, stage: str, trained: bool = True) -> str:
        return self.path(stage if trained else "untrained", *(() if trained else (stage,)), "checkpoints",
                         "checkpoint_best.pt")

    def train(self, stage: str, trained: bool = True, start: str | None = None) -> Step:
        updates = self.sizes.updates[stage] if trained else 1
        argv = ["fairseq-hydra-train", "--config-dir", str(self.config_dir), "--config-name", stage,
                f"task.data={self.path(stage, 'data-bin')}",
                f"checkpoint.save_dir={Path(self.checkpoint(stage, trained)).parent}",
                f"optimization.max_update={updates}", f"checkpoint.save_interval_updates={updates}",
                f"dataset.validate_interval_updates={max(1, updates // 8) if trained else 1}"]
        if not trained:  # the architecture and data of the stage, but no learning: lr 0 for one update
            argv.append("optimization.lr=[0.0]")
        elif start:
            argv.append(f"checkpoint.finetune_from_model={start}")
        return Step(f"train-{stage}" if trained else f"untrained-{stage}", argv)

    def training_steps(self) -> list[Step]:
        return [self.train("stage1"), self.train("stage2", start=self.checkpoint("stage1")),
                self.train("stage3", start=self.checkpoint("stage2")),
                self.train("stage2", trained=False), self.train("stage3", trained=False)]

    def user_dir(self) -> str:
        """The --user-dir shim fairseq-generate needs (the training configs name it themselves)."""
        return str(Path(speechgpt_fairseq.__file__).resolve().parents[1] / "user_dir")

    def generation(self, stage: str, trained: bool) -> str:
        return self.path(stage if trained else "untrained", *(() if trained else (stage,)), "generate-test.txt")

    def evaluation_steps(self) -> list[Step]:
        steps = []
        for stage, task in (("stage2", "cross_modal_sft"), ("stage3", "com_sft")):
            for trained in (True, False):
                gen = self.generation(stage, trained)
                label = stage if trained else f"untrained-{stage}"
                steps.append(Step(f"generate-{label}", [
                    "fairseq-generate", self.path(stage, "data-bin"), "--user-dir", self.user_dir(), "--task", task,
                    "--path", self.checkpoint(stage, trained), "--gen-subset", "test", "--beam", "1",
                    "--max-len-a", "1", "--max-len-b", str(self.sizes.max_new_tokens), "--batch-size", "32",
                    "--results-path", str(Path(gen).parent)]))
                steps.append(Step(f"score-{label}", [
                    "speechgpt", "score", gen, "--out", str(Path(gen).with_name("scores.jsonl")),
                    "--summary", str(Path(gen).with_name("summary.json"))]))
        return steps

    def chat_step(self) -> Step:
        """One spoken chat turn: the first held-out question (pairs are numbered train, valid, then test)."""
        question = self.path("corpus", "qa", f"{sum(self.sizes.pairs[:2]):05d}_q.wav")
        return Step("chat", ["speechgpt", "chat", "--model", self.checkpoint("stage3"), "--kmeans",
                             self.path("units", "kmeans.bin"), *self.features(), "--message", question,
                             "--vocoder", self.path("units", "vocoder.npz"), "--greedy",
                             "--max-new-tokens", str(self.sizes.max_new_tokens), "--json",
                             "--out", self.path("report")])

    # ---- running ------------------------------------------------------------------------------------------

    def run(self, log=print) -> dict[str, float]:
        """Run every step not yet done; returns each step's wall time in seconds (0 for steps already done)."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        times, ran = {}, False  # once a step runs, every later step runs too: its inputs changed
        for index, step in enumerate(self.steps(), 1):
            marker = logs / f"{index:02d}-{step.name}.done"
            command = shlex.join(step.argv)
            if not ran and marker.is_file() and marker.read_text(encoding="utf-8").split("\n", 1)[0] == command:
                log(f"= {command}  (done in an earlier run)")
                times[step.name] = 0.0
                continue
            log(f"+ {command}")
            ran = True
            start = time.perf_counter()
            log_file = logs / f"{index:02d}-{step.name}.log"
            with open(log_file, "w", encoding="utf-8") as f:
                env = dict(os.environ, PYTHONWARNINGS="ignore")
                proc = subprocess.run([console(step.argv[0]), *step.argv[1:]], stdout=f, stderr=subprocess.STDOUT,
                                      cwd=self.out, env=env)
            if proc.returncode != 0:
                tail = "".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
                raise DemoError(f"step {step.name} failed ({proc.returncode}): {command}\n--- the end of "
                                f"{log_file} ---\n{tail}")
            times[step.name] = time.perf_counter() - start
            marker.write_text(f"{command}\n{times[step.name]:.1f}\n", encoding="utf-8")
        return times

