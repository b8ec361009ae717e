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
from speechgpt_fairseq.errors import InputError

SPLITS = ("train", "valid", "test")
NUM_UNITS = 100
STAGE2_SOURCES = ("asr", "tts", "text")  # stage 2's training sources, weighed by task.mix in the configs
# the formats of stage 3's training questions. Spoken questions answered in speech (s2s, what the test asks) weigh
# most: with build-com's default (s2s 0.4) 21 of 90 held-out spoken questions were answered in text only, as the
# text instructions and the s2t format end after the text answer
COM_MIX = "s2s=0.7,s2t=0.1,t2s=0.1,t2t=0.1"
# beam sizes of the evaluations: stage 2's transcripts and speech gain from a beam (ASR WER 3.8% -> 2.8%, TTS UER
# 37.1% -> 34.6% at beam 4; beam 8 no more); the chain of modality does not (one beam scores the transcript, the
# answer and the speech together: 87% -> 81% of spoken questions answered right at beam 4)
BEAM = {"stage2": 4, "stage3": 1}
# MFCC frames averaged over 9 before k-means (learn-kmeans --mfcc-average): the same sound a few milliseconds later
# keeps more of its units (15.4% of them change without averaging, 5.0% over 9 frames), and the full demo (stage 2
# at 2,600 updates then) spoke held-out sentences at 25.4% unit errors instead of 37.3%, the chain's answers as
# right (93.3%) and clearer (round trip 5.3% instead of 8.8%); over 5 and 7 frames the chain lost answers
# (docs/quickstart.md)
MFCC_AVERAGE = 9


class DemoError(InputError):
    """A demo step that failed; the message names the command and its log."""


@dataclass
class Sizes:
    """How big the demo is: the full run (the README's) or the quick one the tests run."""

    sentences: tuple[int, int, int] = (4000, 200, 100)
    renditions: tuple[int, int, int] = (10, 2, 3)  # times each question is spoken, per split
    # stage 2 at 2,750 updates: TTS 24.7 / 22.5 / 24.4% at stage-2 seeds 1 / 2 / 3, 25.4% at 2,600 (seed 1); about
    # 460 s of the 15-minute budget
    updates: dict[str, int] = field(default_factory=lambda: {"stage1": 200, "stage2": 2750, "stage3": 600})
    vocab_size: int = 1000
    max_new_tokens: int = 200  # the longest held-out sentence is about 150 units after merging repeats

    @classmethod
    def quick(cls) -> Sizes:
        return cls(sentences=(150, 20, 10), renditions=(1, 1, 1),
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
                 config_dir: str | Path | None = None, workers: int = 2, seed: int = 1,
                 mfcc_average: int | None = None):
        if hubert and mfcc_average not in (None, 1):
            raise DemoError(f"--mfcc-average {mfcc_average} applies to MFCC units, not to --hubert's")
        if mfcc_average is None:
            mfcc_average = 1 if hubert else MFCC_AVERAGE
        if mfcc_average % 2 == 0:
            raise DemoError(f"--mfcc-average {mfcc_average}: MFCC frames are averaged over an odd number of frames")
        self.out = Path(out).absolute()
        self.sizes, self.hubert, self.layer, self.workers, self.seed = sizes, hubert, layer, workers, seed
        self.mfcc_average = mfcc_average
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
                                "--sentences", *map(str, s.sentences), "--renditions", *map(str, s.renditions),
                                "--vocab-size", str(s.vocab_size), "--seed", str(self.seed),
                                "--workers", str(self.workers), "--overwrite"])]

    def features(self) -> list[str]:
        return ["--hubert", self.hubert, "--layer", str(self.layer)] if self.hubert else []

    def manifests(self) -> list[str]:
        return [*SPLITS, *(f"{split}_assistant" for split in SPLITS), "shapes", "shapes_assistant",
                *(f"qa_{split}_{kind}" for split in SPLITS for kind in ("questions", "answers")), "qa_train_swapped"]

    def unit_steps(self) -> list[Step]:
        kmeans = self.path("units", "kmeans.bin")
        # the k-means file records the averaging, so every later step computes the same features
        averaging = ["--mfcc-average", str(self.mfcc_average)] if self.mfcc_average > 1 else []
        steps = [Step("kmeans", ["speechgpt", "learn-kmeans", self.path("corpus", "train.tsv"), *self.features(),
                                 *averaging, "--n-clusters", str(NUM_UNITS), "--percent", "0.1", "--seed",
                                 str(self.seed), "--out", kmeans, "--overwrite", "--no-progress"])]
        # the vocoder speaks the model's answers, which imitate the assistant's voice: fitted on that voice
        steps.append(Step("vocoder", ["speechgpt", "fit-exemplar-vocoder", self.path("corpus", "train_assistant.tsv"),
                                      *self.features(), "--kmeans", kmeans, "--max-files", "500",
                                      "--out", self.path("units", "vocoder.npz"), "--no-progress"]))
        manifests = [self.path("corpus", f"{name}.tsv") for name in self.manifests()]
        steps.append(Step("units", ["speechgpt", "speech2unit", *manifests, "--each", *self.features(),
                                    "--kmeans", kmeans, "--out", self.path("units"), "--overwrite", "--no-progress"]))
        return steps

    def data_steps(self) -> list[Step]:
        vocab = ["--vocab", self.path("corpus", "tokenizer.model"), "--num-units", str(NUM_UNITS)]
        steps = [Step("stage1-data", ["speechgpt", "prepare-units", *vocab, "--out", self.path("stage1", "data-bin"),
                                      "--overwrite", "--no-progress",
                                      *(f"{s}={self.units(s)}" for s in ("train", "valid"))])]
        # stage 2: speech recognition of the sentences in drawn voices, synthesis in the assistant's voice, and
        # the world's knowledge as text instructions
        for split in SPLITS:
            for task, units, asr_prob in (("asr", self.units(split), "1"), ("tts", self.units(f"{split}_assistant"), "0")):
                steps.append(Step(f"stage2-{task}-{split}", [
                    "speechgpt", "build-cross-modal", "--units", units, "--text", self.path("corpus", f"{split}.wrd"),
                    "--asr-prob", asr_prob, "--num-units", str(NUM_UNITS), "--seed", str(self.seed),
                    "--out", self.stage2_file(task, split), "--no-progress"]))
        steps.append(Step("stage2-text", ["speechgpt", "build-text-instructions", "--manifest",
                                          self.path("corpus", "knowledge.jsonl"),
                                          "--out", self.stage2_file("text", "train"), "--no-progress"]))
        steps.append(Step("stage2-data", [
            "speechgpt", "prepare-sft", *vocab, "--out", self.path("stage2", "data-bin"), "--overwrite",
            "--no-progress",
            *(f"{source}={self.stage2_file(source, 'train')}" for source in STAGE2_SOURCES),
            *(f"{split}={self.stage2_file(task, split)}" for split in ("valid", "test") for task in ("asr", "tts"))]))
        # stage 3: the training questions in every format, "say SENTENCE" answered in speech, the answers' shapes
        # heard, written down and said back (echo), the training questions' transcripts and answers after another
        # question's speech (swap), the world's knowledge typed, restated and answered in the chain's shape
        # (known), and stage 2's data again (rehearsed, so that the knowledge, recognition and synthesis it taught
        # are kept); the held-out questions spoken (s2s) and typed (t2t)
        com = {"com": ("qa_train", COM_MIX, "qa_train_questions", "qa_train_answers"),
               "say": ("say_train", "t2s=1", None, "train_assistant"),
               "echo": ("echo", "s2s=1", "shapes", "shapes_assistant"),
               "swap": ("qa_train", "s2s=1", "qa_train_swapped", "qa_train_answers"),
               "known": ("knowledge_com", "t2t_restated=1", None, None),
               **{name: (f"qa_{split}", mix, f"qa_{split}_questions", f"qa_{split}_answers")
                  for name, split, mix in (("valid", "valid", "s2s=1"), ("test", "test", "s2s=1"),
                                           ("test_typed", "test", "t2t=1"))}}
        for name, (manifest, mix, questions, answers) in com.items():
            units = [*(("--units-i", self.units(questions)) if questions else ()),
                     *(("--units-r", self.units(answers)) if answers else ())]
            steps.append(Step(f"stage3-{name}", [
                "speechgpt", "build-com", "--manifest", self.path("corpus", f"{manifest}.jsonl"), *units,
                "--mix", mix, "--num-units", str(NUM_UNITS), "--seed", str(self.seed),
                "--out", self.stage3_file(name), "--no-progress"]))
        steps.append(Step("stage3-data", [
            "speechgpt", "prepare-sft", *vocab, "--out", self.path("stage3", "data-bin"), "--overwrite",
            "--no-progress",
            *(f"{name}={self.stage3_file(name)}" for name in com),
            *(f"{source}={self.stage2_file(source, 'train')}" for source in STAGE2_SOURCES)]))
        return steps

    def units(self, manifest: str) -> str:
        """speech2unit's SpeechGPT unit strings (repeats merged) of a manifest."""
        return self.path("units", f"{manifest}.units")

    def stage2_file(self, source: str, split: str) -> str:
        return self.path("stage2", f"{source}_{split}.jsonl")

    def stage3_file(self, name: str) -> str:
        return self.path("stage3", f"com_{name}.jsonl")

    def checkpoint(self, stage: str, trained: bool = True) -> str:
        return self.path(stage if trained else "untrained", *(() if trained else (stage,)), "checkpoints",
                         "checkpoint_best.pt")

    def train(self, stage: str, trained: bool = True, start: str | None = None) -> Step:
        updates = self.sizes.updates[stage] if trained else 1
        argv = ["fairseq-hydra-train", "--config-dir", str(self.config_dir), "--config-name", stage,
                f"task.data={self.path(stage, 'data-bin')}", f"common.user_dir={self.user_dir()}",
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
                *(self.train(stage, trained=False) for stage in ("stage1", "stage2", "stage3"))]

    def user_dir(self) -> str:
        """The --user-dir shim of this clone (given to every fairseq command, so that copied configs work too)."""
        return str(Path(speechgpt_fairseq.__file__).resolve().parents[1] / "user_dir")

    def generation(self, stage: str, trained: bool, subset: str = "test") -> str:
        return self.path(stage if trained else "untrained", *(() if trained else (stage,)), f"generate-{subset}.txt")

    def evaluation_steps(self) -> list[Step]:
        steps = []
        for stage, task, subset in (("stage2", "cross_modal_sft", "test"), ("stage3", "com_sft", "test"),
                                    ("stage3", "com_sft", "test_typed")):
            for trained in (True, False):
                gen = Path(self.generation(stage, trained, subset))
                label = f"{stage}-{subset}" if trained else f"untrained-{stage}-{subset}"
                steps.append(Step(f"generate-{label}", [
                    "fairseq-generate", self.path(stage, "data-bin"), "--user-dir", self.user_dir(), "--task", task,
                    "--path", self.checkpoint(stage, trained), "--gen-subset", subset, "--beam", str(BEAM[stage]),
                    "--max-len-a", "1", "--max-len-b", str(self.sizes.max_new_tokens), "--batch-size", "32",
                    "--results-path", str(gen.parent)]))
                steps.append(Step(f"score-{label}", [
                    "speechgpt", "score", str(gen), "--out", str(gen.with_name(f"scores-{subset}.jsonl")),
                    "--summary", str(gen.with_name(f"summary-{subset}.json"))]))
        for trained in (True, False):  # the spoken answers, transcribed by the same model's stage-2 ASR
            gen = Path(self.generation("stage3", trained))
            steps.append(Step("round-trip" if trained else "untrained-round-trip", [
                "speechgpt", "round-trip", str(gen), "--model", self.checkpoint("stage2", trained),
                "--out", str(gen.with_name("roundtrip-test.jsonl")),
                "--summary", str(gen.with_name("roundtrip-test.json")), "--no-progress"]))
        # the ceiling of the round trip: espeak-ng's rendition of the right answers, transcribed by the same ASR
        gen = Path(self.generation("stage3", True))
        steps.append(Step("round-trip-reference", [
            "speechgpt", "round-trip", str(gen), "--of", "reference", "--model", self.checkpoint("stage2"),
            "--out", str(gen.with_name("roundtrip-reference-test.jsonl")),
            "--summary", str(gen.with_name("roundtrip-reference-test.json")), "--no-progress"]))
        return steps

    def chat_step(self) -> Step:
        """One spoken chat turn: the first held-out spoken question."""
        return Step("chat", ["speechgpt", "chat", "--model", self.checkpoint("stage3"), "--kmeans",
                             self.path("units", "kmeans.bin"), *self.features(),
                             "--message", self.path("corpus", "qa", "test_q0000.wav"),
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

