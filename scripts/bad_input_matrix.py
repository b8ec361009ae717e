"""The bad-input matrix: every `speechgpt` verb (and fairseq-hydra-train) fed bad input, each outcome classified.

Builds tiny inputs in a temporary directory (the shipped examples/corpus, a tiny random LLaMA converted with
convert-hf, tiny vocoders and k-means files), runs each bad case as a subprocess, as a user would, and sorts the
outcome into one column:

    clear      exit status != 0, no traceback, and the last line of stderr is a one-line `...: error: ...` that
               names what the case says it must name (a file, a record); for fairseq-hydra-train, whose errors
               are tracebacks, the last exception line is ours (speechgpt_fairseq...) and names it
    unclear    exit status != 0 without a traceback, but the last line does not name it
    traceback  a Python traceback reached the user
    silent     exit status 0 on bad input (a case that asked for skipping must instead report the skip)
    partial    a failed run left files behind at its output path

Run it from anywhere (about 10 minutes on two CPU cores):

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/checkout python scripts/bad_input_matrix.py [--only SUBSTRING] [-v]

It prints one line per case and the totals per column; the exit status is 1 when any case is not `clear`.
`--code DIR` runs the cases against another checkout of the package (e.g. an older commit unpacked with
`git archive`), to compare before and after a change. It is not part of the test suite (too slow); each
behaviour it found wrong has its own fast test beside the code that guards it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "corpus"
COLUMNS = ("clear", "unclear", "traceback", "silent", "partial")


@dataclass
class Case:
    """One bad input: the command (after the program name), what its error must name, and where it writes."""

    name: str
    argv: list[str]
    names: str = ""  # a substring the last stderr line must hold (the file or record)
    outputs: list[Path] = field(default_factory=list)  # must not exist after a failed run
    skip_report: str | None = None  # the user asked to skip: exit 0 with this in stdout is right
    program: str = "speechgpt"
    stdin: str | None = None


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def build_fixtures(tmp: Path, code: Path) -> dict[str, Path]:
    """The tiny model, vocoders, k-means files and generate outputs the cases use."""
    sys.path[:0] = [str(code), str(REPO / "tests")]
    import numpy as np
    from conftest import write_hf_llama, write_tiny_vocoder

    from speechgpt_fairseq.models.hf import convert_hf
    from speechgpt_fairseq.speech.exemplar_vocoder import ExemplarVocoder
    from speechgpt_fairseq.speech.kmeans import fit_kmeans, save_kmeans

    f = {}
    f["model_dir"] = convert_hf(write_hf_llama(tmp / "hf", CORPUS / "tokenizer.model", kv_heads=2),
                                tmp / "fs", num_units=100)
    f["model"] = f["model_dir"] / "checkpoint.pt"
    f["truncated_model"] = write(tmp / "truncated.pt", f["model"].read_bytes()[:5000])
    f["garbage"] = write(tmp / "garbage.bin", b"\x00\x01not a model at all\xff" * 10)
    f["vocoder"], f["vocoder_config"] = write_tiny_vocoder(tmp / "vocoder", num_units=100)
    f["vocoder_k200"], f["vocoder_k200_config"] = write_tiny_vocoder(tmp / "vocoder200", num_units=200)
    for k in (100, 200):
        ExemplarVocoder(np.zeros((k, 400)), np.ones(k), 160).save(tmp / f"exemplar{k}.npz")
        f[f"exemplar{k}"] = tmp / f"exemplar{k}.npz"
    save_kmeans(fit_kmeans(np.random.default_rng(0).normal(size=(300, 39)).astype(np.float32), 50, n_init=1),
                tmp / "km50.bin")
    f["km50"] = tmp / "km50.bin"
    f["wav"] = tmp / "tone.wav"
    import soundfile as sf
    sf.write(f["wav"], (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    gen = "".join(f"S-{i}\t[Human]: say {i}<eoh> [SpeechGPT]:\nT-{i}\tword {i}<eoa>\nH-{i}\t-0.5\tword {i}<eoa>\n"
                  f"D-{i}\t-0.5\tword {i}<eoa>\n" for i in range(4))
    f["gen"] = write(tmp / "gen.txt", gen + "Generate test with beam=1: BLEU4 = 0.00\n")
    f["gen_truncated"] = write(tmp / "gen_truncated.txt", gen + "S-4\t[Human]: say 4<eoh> [SpeechGPT]:\n"
                                 "T-4\tword 4<eoa>\n")
    f["gen_concatenated"] = write(tmp / "gen_concatenated.txt", f["gen"].read_text() * 2)
    return f


def cases(tmp: Path, f: dict[str, Path], code: Path) -> list[Case]:
    bad_utf8 = b"13 75 69\n12 \xff\xfe 7\n"
    cm = json.dumps({"prefix": "", "plain_text": "[Human]: hi<eoh> [SpeechGPT]: hello<eoa>"})
    out = lambda name: tmp / "out" / name  # noqa: E731
    km = str(CORPUS / "train.km")
    unclosed = write(tmp / "open.units", "<sosp><1><2><eosp>\n<sosp><3><4>\n")
    bad_json = write(tmp / "bad.jsonl", cm + "\n{oops\n")
    latin_jsonl = write(tmp / "latin.jsonl", cm.encode() + b"\n" + cm.encode()[:-3] + b'\xe9"}\n')
    blank = write(tmp / "blank.jsonl", "\n\n")
    big_unit = write(tmp / "u.jsonl", json.dumps({"prefix": "", "plain_text": "[Human]: <sosp><500><eosp><eoh> "
                                                  "[SpeechGPT]: hi<eoa>"}) + "\n")
    big_km = write(tmp / "big.km", "1 2 5000\n")
    no_field = write(tmp / "nofield.jsonl", '{"prefix": ""}\n')
    json_list = write(tmp / "list.jsonl", "[1, 2]\n")
    c = [
        # prepare-units
        Case("prepare-units: missing file", ["prepare-units", f"train={tmp / 'no.km'}", "--out", str(out("pu1"))],
             "no.km", [out("pu1")]),
        Case("prepare-units: a directory", ["prepare-units", f"train={tmp}", "--out", str(out("pu2"))], str(tmp),
             [out("pu2")]),
        Case("prepare-units: empty file", ["prepare-units", f"train={write(tmp / 'empty.km', '')}", "--out",
                                           str(out("pu3"))], "empty.km", [out("pu3")]),
        Case("prepare-units: non-UTF-8 line", ["prepare-units", f"train={write(tmp / 'latin.km', bad_utf8)}",
                                               "--out", str(out("pu4"))], "latin.km:2", [out("pu4")]),
        Case("prepare-units: unit string without <eosp>",
             ["prepare-units", f"train={unclosed}", "--out",
              str(out("pu5"))], "open.units:2", [out("pu5")]),
        Case("prepare-units: unit out of range", ["prepare-units", f"train={big_km}",
                                                  "--out", str(out("pu6"))], "big.km:1", [out("pu6")]),
        Case("prepare-units: words, not units", ["prepare-units", f"train={CORPUS / 'train.wrd'}", "--out",
                                                 str(out("pu7"))], "train.wrd:1", [out("pu7")]),
        Case("prepare-units: SPLIT=FILE missing '='", ["prepare-units", km, "--out", str(out("pu8"))], "train.km",
             [out("pu8")]),
        Case("prepare-units: --num-units 0", ["prepare-units", f"train={km}", "--num-units", "0", "--out",
                                              str(out("pu9"))], "--num-units", [out("pu9")]),
        Case("prepare-units: --num-units -5", ["prepare-units", f"train={km}", "--num-units", "-5", "--out",
                                               str(out("pu10"))], "--num-units", [out("pu10")]),
        Case("prepare-units: --vocab missing", ["prepare-units", f"train={km}", "--vocab", str(tmp / "novocab"),
                                                "--out", str(out("pu11"))], "novocab", [out("pu11")]),
        Case("prepare-units: --vocab a units file", ["prepare-units", f"train={km}", "--vocab", km, "--out",
                                                     str(out("pu12"))], "train.km", [out("pu12")]),
        Case("prepare-units: --open unknown split", ["prepare-units", f"train={km}", "--open", "valid", "--out",
                                                     str(out("pu13"))], "valid", [out("pu13")]),
        Case("prepare-units: --num-units against vocab", ["prepare-units", f"train={km}", "--vocab",
                                                          str(f["model_dir"]), "--num-units", "50", "--out",
                                                          str(out("pu14"))], str(f["model_dir"]), [out("pu14")]),
        Case("prepare-units: units above the vocabulary's K", ["prepare-units", f"train={km}", "--num-units", "50",
                                                               "--out", str(out("pu15"))], "train.km:", [out("pu15")]),
        # prepare-sft
        Case("prepare-sft: malformed JSON", ["prepare-sft", f"train={bad_json}",
                                             "--vocab", str(f["model_dir"]), "--out", str(out("ps1"))],
             "bad.jsonl:2", [out("ps1")]),
        Case("prepare-sft: non-UTF-8 line",
             ["prepare-sft", f"train={latin_jsonl}",
              "--vocab", str(f["model_dir"]), "--out", str(out("ps2"))], "latin.jsonl:2", [out("ps2")]),
        Case("prepare-sft: non-UTF-8 line, --skip-bad",
             ["prepare-sft", f"train={tmp / 'latin.jsonl'}", "--vocab", str(f["model_dir"]), "--skip-bad", "--out",
              str(out("ps3"))], skip_report="skipped 1"),
        Case("prepare-sft: missing field", ["prepare-sft", f"train={no_field}",
                                            "--vocab", str(f["model_dir"]), "--out", str(out("ps4"))],
             "nofield.jsonl:1", [out("ps4")]),
        Case("prepare-sft: units-only vocabulary", ["prepare-sft", f"train={tmp / 'bad.jsonl'}", "--vocab",
                                                    str(tmp / "data_units_only"), "--out", str(out("ps5"))],
             "units-only vocabulary", [out("ps5")]),
        Case("prepare-sft: empty file", ["prepare-sft", f"train={write(tmp / 'empty.jsonl', '')}", "--vocab",
                                         str(f["model_dir"]), "--out", str(out("ps6"))], "empty.jsonl", [out("ps6")]),
        Case("prepare-sft: only empty lines", ["prepare-sft", f"train={blank}",
                                               "--vocab", str(f["model_dir"]), "--out", str(out("ps7"))],
             "blank.jsonl", [out("ps7")]),
        Case("prepare-sft: JSON list", ["prepare-sft", f"train={json_list}", "--vocab",
                                        str(f["model_dir"]), "--out", str(out("ps8"))], "list.jsonl:1", [out("ps8")]),
        Case("prepare-sft: unit out of range", ["prepare-sft", f"train={big_unit}",
                                                "--vocab", str(f["model_dir"]), "--out", str(out("ps9"))],
             "u.jsonl:1", [out("ps9")]),
        Case("prepare-sft: missing --vocab dir", ["prepare-sft", f"train={tmp / 'bad.jsonl'}", "--vocab",
                                                  str(tmp / "novocab"), "--out", str(out("ps10"))], "novocab",
             [out("ps10")]),
        # build-cross-modal
        Case("build-cross-modal: line counts differ",
             ["build-cross-modal", "--units", km, "--text", str(CORPUS / "valid.wrd"), "--out", str(out("cm1.jsonl"))],
             "valid.wrd", [out("cm1.jsonl")]),
        Case("build-cross-modal: missing --text", ["build-cross-modal", "--units", km, "--text", str(tmp / "no.wrd"),
                                                   "--out", str(out("cm2.jsonl"))], "no.wrd", [out("cm2.jsonl")]),
        Case("build-cross-modal: non-UTF-8 transcript",
             ["build-cross-modal", "--units", str(write(tmp / "two.km", "1 2 3\n4 5 6\n")), "--text",
              str(write(tmp / "latin.wrd", b"hello\ncaf\xe9\n")), "--out", str(out("cm3.jsonl"))], "latin.wrd:2",
             [out("cm3.jsonl")]),
        Case("build-cross-modal: non-UTF-8 transcript, --skip-bad",
             ["build-cross-modal", "--units", str(tmp / "two.km"), "--text", str(tmp / "latin.wrd"), "--skip-bad",
              "--out", str(out("cm4.jsonl"))], skip_report="skipped 1"),
        Case("build-cross-modal: --asr-prob 1.5", ["build-cross-modal", "--units", km, "--text",
                                                   str(CORPUS / "train.wrd"), "--asr-prob", "1.5", "--out",
                                                   str(out("cm5.jsonl"))], "--asr-prob", [out("cm5.jsonl")]),
        Case("build-cross-modal: no input", ["build-cross-modal", "--out", str(out("cm6.jsonl"))], "--units",
             [out("cm6.jsonl")]),
        Case("build-cross-modal: empty inputs", ["build-cross-modal", "--units", str(tmp / "empty.km"), "--text",
                                                 str(write(tmp / "empty.wrd", "")), "--out", str(out("cm7.jsonl"))],
             "empty.km", [out("cm7.jsonl")]),
        Case("build-cross-modal: words as units", ["build-cross-modal", "--units", str(CORPUS / "train.wrd"),
                                                   "--text", str(CORPUS / "train.wrd"), "--out",
                                                   str(out("cm8.jsonl"))], "train.wrd:1", [out("cm8.jsonl")]),
        Case("build-cross-modal: --num-units 0", ["build-cross-modal", "--units", km, "--text",
                                                  str(CORPUS / "train.wrd"), "--num-units", "0", "--out",
                                                  str(out("cm9.jsonl"))], "--num-units", [out("cm9.jsonl")]),
        # build-text-instructions
        Case("build-text-instructions: malformed JSON", ["build-text-instructions", "--manifest",
                                                         str(tmp / "bad.jsonl"), "--out", str(out("ti1.jsonl"))],
             "bad.jsonl:", [out("ti1.jsonl")]),
        Case("build-text-instructions: missing manifest", ["build-text-instructions", "--manifest",
                                                           str(tmp / "no.jsonl"), "--out", str(out("ti2.jsonl"))],
             "no.jsonl", [out("ti2.jsonl")]),
        Case("build-text-instructions: empty manifest", ["build-text-instructions", "--manifest",
                                                         str(tmp / "empty.jsonl"), "--out", str(out("ti3.jsonl"))],
             "empty.jsonl", [out("ti3.jsonl")]),
        Case("build-text-instructions: no output field",
             ["build-text-instructions", "--manifest", str(write(tmp / "alp.jsonl", '{"instruction": "x"}\n')),
              "--out", str(out("ti4.jsonl"))], "alp.jsonl:1", [out("ti4.jsonl")]),
        Case("build-text-instructions: non-UTF-8",
             ["build-text-instructions", "--manifest",
              str(write(tmp / "alp8.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n')), "--out",
              str(out("ti5.jsonl"))], "alp8.jsonl:1", [out("ti5.jsonl")]),
        # build-com
        Case("build-com: bad --mix", ["build-com", "--manifest", str(CORPUS / "qa_valid.jsonl"), "--mix", "s2x=1",
                                      "--num-units", "100", "--out", str(out("com1.jsonl"))], "--mix",
             [out("com1.jsonl")]),
        Case("build-com: missing manifest", ["build-com", "--manifest", str(tmp / "no.jsonl"), "--out",
                                             str(out("com2.jsonl"))], "no.jsonl", [out("com2.jsonl")]),
        Case("build-com: --units-i line count", ["build-com", "--manifest", str(CORPUS / "qa_valid.jsonl"),
                                                 "--units-i", str(tmp / "two.km"), "--num-units", "100", "--out",
                                                 str(out("com3.jsonl"))], "two.km", [out("com3.jsonl")]),
        Case("build-com: empty manifest", ["build-com", "--manifest", str(tmp / "empty.jsonl"), "--out",
                                           str(out("com4.jsonl"))], "empty.jsonl", [out("com4.jsonl")]),
        Case("build-com: units above --num-units", ["build-com", "--manifest", str(CORPUS / "qa_valid.jsonl"),
                                                    "--num-units", "10", "--out", str(out("com5.jsonl"))],
             "qa_valid.jsonl:1", [out("com5.jsonl")]),
        # score
        Case("score: missing file", ["score", str(tmp / "no_gen.txt")], "no_gen.txt"),
        Case("score: not generate output", ["score", str(CORPUS / "train.wrd")], "train.wrd"),
        Case("score: truncated generate output", ["score", str(f["gen_truncated"])], "gen_truncated.txt"),
        Case("score: two generate outputs concatenated", ["score", str(f["gen_concatenated"])],
             "gen_concatenated.txt"),
        Case("score: empty file", ["score", str(write(tmp / "empty_gen.txt", ""))], "empty_gen.txt"),
        Case("score: D- line without a score", ["score", str(write(tmp / "noscore.txt", "T-0\thi\nD-0\thi\n"))],
             "noscore.txt:2"),
        Case("score: a directory", ["score", str(tmp)], str(tmp)),
        Case("score: non-UTF-8", ["score", str(write(tmp / "gen8.txt", b"T-0\tcaf\xe9\nD-0\t-1\tx\n"))], "gen8.txt:1"),
        # round-trip
        Case("round-trip: missing model", ["round-trip", str(f["gen"]), "--model", str(tmp / "no.pt")], "no.pt"),
        Case("round-trip: corrupt model", ["round-trip", str(f["gen"]), "--model", str(f["garbage"])], "garbage.bin"),
        # chat
        Case("chat: missing model", ["chat", "--model", str(tmp / "no.pt"), "--message", "hi"], "no.pt"),
        Case("chat: corrupt model", ["chat", "--model", str(f["garbage"]), "--message", "hi"], "garbage.bin"),
        Case("chat: truncated model", ["chat", "--model", str(f["truncated_model"]), "--message", "hi"],
             "truncated.pt"),
        Case("chat: exemplar vocoder of another K", ["chat", "--model", str(f["model"]), "--vocoder",
                                                     str(f["exemplar200"]), "--message", "hi", "--out",
                                                     str(out("chat1"))], "exemplar200.npz", [out("chat1")]),
        Case("chat: HiFi-GAN vocoder of another K", ["chat", "--model", str(f["model"]), "--vocoder",
                                                     str(f["vocoder_k200"]), "--vocoder-config",
                                                     str(f["vocoder_k200_config"]), "--speaker", "0", "--message",
                                                     "hi", "--out", str(out("chat2"))], "config.json", [out("chat2")]),
        Case("chat: k-means file that is not one", ["chat", "--model", str(f["model"]), "--kmeans",
                                                    str(f["garbage"]), "--message", "hi"], "garbage.bin"),
        Case("chat: k-means of another K", ["chat", "--model", str(f["model"]), "--kmeans", str(f["km50"]),
                                            "--message", "hi"], "km50.bin"),
        Case("chat: vocoder without config", ["chat", "--model", str(f["model"]), "--vocoder", str(f["vocoder"]),
                                              "--message", "hi"], "config.json"),
        Case("chat: missing --system-file", ["chat", "--model", str(f["model"]), "--system-file",
                                             str(tmp / "nosys.txt"), "--message", "hi"], "nosys.txt"),
        Case("chat: missing audio question", ["chat", "--model", str(f["model"]), "--message",
                                              str(tmp / "nothere.wav")], "nothere.wav"),
        Case("chat: --max-new-tokens -1", ["chat", "--model", str(f["model"]), "--message", "hi",
                                           "--max-new-tokens", "-1"], "--max-new-tokens"),
        Case("chat: --top-p 2", ["chat", "--model", str(f["model"]), "--message", "hi", "--top-p", "2"], "top-p"),
        # checkpoints
        Case("convert-hf: missing directory", ["convert-hf", str(tmp / "nohf"), str(out("hf1"))], "nohf",
             [out("hf1")]),
        Case("convert-hf: empty directory", ["convert-hf", str(out("emptydir")), str(out("hf2"))], "emptydir",
             [out("hf2")]),
        Case("convert-hf: --num-units 0", ["convert-hf", str(tmp / "hf"), str(out("hf3")), "--num-units", "0"],
             "--num-units", [out("hf3")]),
        Case("export-hf: corrupt checkpoint", ["export-hf", str(f["garbage"]), str(out("ex1"))], "garbage.bin",
             [out("ex1")]),
        Case("export-hf: truncated checkpoint", ["export-hf", str(f["truncated_model"]), str(out("ex2"))],
             "truncated.pt", [out("ex2")]),
        Case("export-hf: missing checkpoint", ["export-hf", str(tmp / "no.pt"), str(out("ex3"))], "no.pt",
             [out("ex3")]),
        Case("import-peft: missing adapter", ["import-peft", str(f["model"]), str(out("pe1")), "--adapter",
                                              str(tmp / "noadapter")], "noadapter", [out("pe1")]),
        Case("import-peft: corrupt base", ["import-peft", str(f["garbage"]), str(out("pe2")), "--adapter",
                                           str(f["model_dir"])], "garbage.bin", [out("pe2")]),
        # speech
        Case("speech2unit: k-means file that is not one", ["speech2unit", str(f["wav"]), "--kmeans",
                                                           str(f["garbage"]), "--out", str(out("s2u1"))],
             "garbage.bin", [out("s2u1")]),
        Case("speech2unit: missing input", ["speech2unit", str(tmp / "no.wav"), "--kmeans", str(f["km50"]),
                                            "--out", str(out("s2u2"))], "no.wav", [out("s2u2")]),
        Case("speech2unit: empty directory", ["speech2unit", str(out("emptydir")), "--kmeans", str(f["km50"]),
                                              "--out", str(out("s2u3"))], "emptydir", [out("s2u3")]),
        Case("speech2unit: text file named .wav", ["speech2unit", str(write(tmp / "fake.wav", "not audio\n")),
                                                   "--kmeans", str(f["km50"]), "--out", str(out("s2u4"))],
             "fake.wav", [out("s2u4")]),
        Case("speech2unit: corrupt HuBERT", ["speech2unit", str(f["wav"]), "--kmeans", str(f["km50"]), "--hubert",
                                             str(f["garbage"]), "--out", str(out("s2u5"))], "garbage.bin",
             [out("s2u5")]),
        Case("speech2unit: missing k-means", ["speech2unit", str(f["wav"]), "--kmeans", str(tmp / "nokm.bin"),
                                              "--out", str(out("s2u6"))], "nokm.bin", [out("s2u6")]),
        Case("learn-kmeans: missing input", ["learn-kmeans", str(tmp / "no.wav"), "--n-clusters", "5", "--out",
                                             str(out("km1.bin"))], "no.wav", [out("km1.bin")]),
        Case("learn-kmeans: --n-clusters 0", ["learn-kmeans", str(f["wav"]), "--n-clusters", "0", "--out",
                                              str(out("km2.bin"))], "--n-clusters", [out("km2.bin")]),
        Case("learn-kmeans: more clusters than frames", ["learn-kmeans", str(f["wav"]), "--n-clusters", "100000",
                                                         "--out", str(out("km3.bin"))], "100000", [out("km3.bin")]),
        Case("unit2speech: missing units file", ["unit2speech", str(tmp / "no.units"), "--vocoder",
                                                 str(f["vocoder"]), "--vocoder-config", str(f["vocoder_config"]),
                                                 "--speaker", "0", "--out", str(out("u2s1"))], "no.units",
             [out("u2s1")]),
        Case("unit2speech: config not JSON", ["unit2speech", km, "--vocoder", str(f["vocoder"]), "--vocoder-config",
                                              km, "--speaker", "0", "--out", str(out("u2s2"))], "train.km",
             [out("u2s2")]),
        Case("unit2speech: corrupt vocoder", ["unit2speech", km, "--vocoder", str(f["garbage"]),
                                              "--vocoder-config", str(f["vocoder_config"]), "--speaker", "0", "--out",
                                              str(out("u2s3"))], "garbage.bin", [out("u2s3")]),
        Case("unit2speech: unit out of range", ["unit2speech", str(tmp / "big.km"), "--vocoder", str(f["vocoder"]),
                                                "--vocoder-config", str(f["vocoder_config"]), "--speaker", "0",
                                                "--out", str(out("u2s4"))], "big.km:1", [out("u2s4")]),
        Case("unit2speech: empty units file", ["unit2speech", str(tmp / "empty.km"), "--vocoder", str(f["vocoder"]),
                                               "--vocoder-config", str(f["vocoder_config"]), "--speaker", "0",
                                               "--out", str(out("u2s5"))], "empty.km", [out("u2s5")]),
        Case("unit2speech: non-UTF-8 units", ["unit2speech", str(tmp / "latin.km"), "--vocoder", str(f["vocoder"]),
                                              "--vocoder-config", str(f["vocoder_config"]), "--speaker", "0",
                                              "--out", str(out("u2s6"))], "latin.km:2", [out("u2s6")]),
        Case("fit-exemplar-vocoder: k-means file that is not one", ["fit-exemplar-vocoder", str(f["wav"]),
                                                                    "--kmeans", str(f["garbage"]), "--out",
                                                                    str(out("ev1.npz"))], "garbage.bin",
             [out("ev1.npz")]),
        Case("fit-exemplar-vocoder: missing input", ["fit-exemplar-vocoder", str(tmp / "no.wav"), "--kmeans",
                                                     str(f["km50"]), "--out", str(out("ev2.npz"))], "no.wav",
             [out("ev2.npz")]),
        # text to unit
        Case("t2u-export: missing --text", ["t2u-export", "--text", str(tmp / "no.wrd"), "--out", str(out("t2u1"))],
             "no.wrd", [out("t2u1")]),
        Case("t2u-export: line counts differ", ["t2u-export", "--text", f"train={CORPUS / 'valid.wrd'}", "--units",
                                                f"train={km}", "--out", str(out("t2u2"))], "valid.wrd",
             [out("t2u2")]),
        Case("t2u-export: non-UTF-8 text", ["t2u-export", "--text", f"train={tmp / 'latin.wrd'}", "--out",
                                            str(out("t2u3"))], "latin.wrd:2", [out("t2u3")]),
        Case("t2u-export: empty text", ["t2u-export", "--text", f"train={tmp / 'empty.wrd'}", "--out",
                                        str(out("t2u4"))], "empty.wrd", [out("t2u4")]),
        Case("t2u-import: not generate output", ["t2u-import", km, "--out", str(out("t2u5.units"))], "train.km",
             [out("t2u5.units")]),
        Case("t2u-import: missing file", ["t2u-import", str(tmp / "nogen.txt"), "--out", str(out("t2u6.units"))],
             "nogen.txt", [out("t2u6.units")]),
        # demo helpers
        Case("make-corpus: --sentences 0", ["make-corpus", "--out", str(out("mc1")), "--sentences", "0", "10", "10"],
             "--sentences", [out("mc1")]),
        Case("make-corpus: --renditions -1", ["make-corpus", "--out", str(out("mc2")), "--renditions", "-1", "1", "1"],
             "--renditions", [out("mc2")]),
        Case("demo: --config-dir missing", ["demo", "--out", str(out("demo1")), "--config-dir", str(tmp / "nocfg")],
             "nocfg", []),
    ]
    # fairseq-hydra-train: data of another vocabulary than the checkpoint's, and no data at all
    units_only = tmp / "data_units_only"
    subprocess.run([sys.executable, "-m", "speechgpt_fairseq.cli.main", "prepare-units", f"train={km}",
                    f"valid={CORPUS / 'valid.km'}", "--num-units", "100", "--out", str(units_only), "--no-progress"],
                   check=True, capture_output=True, env=env_for(code))
    swapped = tmp / "data_swapped"
    shutil.copytree(REPO / "examples" / "stage1" / "data-bin", swapped)
    vocab = json.loads((swapped / "vocab.json").read_text())
    tokens = vocab["tokens"]
    tokens[-3], tokens[-4] = tokens[-4], tokens[-3]
    (swapped / "vocab.json").write_text(json.dumps(vocab))
    train = ["--config-dir", str(REPO / "examples" / "stage1"), "--config-name", "tiny", "hydra.run.dir=" + str(tmp),
             f"checkpoint.save_dir={tmp / 'ckpt'}", "optimization.max_update=2", "model.decoder_layers=2",
             "model.decoder_embed_dim=64", "model.decoder_ffn_embed_dim=160", "model.decoder_attention_heads=4",
             "model.decoder_kv_heads=2", "model.max_target_positions=256",
             f"checkpoint.finetune_from_model={f['model']}"]
    c += [Case("fairseq-hydra-train: checkpoint of another vocabulary (size)", train + [f"task.data={units_only}"],
               "1106 tokens against 109", program="fairseq-hydra-train"),
          Case("fairseq-hydra-train: checkpoint of another vocabulary (same size)",
               train + [f"task.data={swapped}"], "'[Human]' against '[SpeechGPT]'", program="fairseq-hydra-train"),
          Case("fairseq-hydra-train: missing data directory", train + [f"task.data={tmp / 'nodata'}"], "nodata",
               program="fairseq-hydra-train")]
    return c


def env_for(code: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(code), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def classify(case: Case, proc: subprocess.CompletedProcess) -> tuple[str, str]:
    """(column, the line the user reads as the reason)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback (most recent call last)" in proc.stderr and case.program == "speechgpt":
        return "traceback", last
    if case.program != "speechgpt" and proc.returncode != 0:  # fairseq's tools end with a traceback: our reason
        last = next((line for line in reversed(lines) if re.match(r"[\w.]*(Error|Exception): ", line)), last)
        return ("clear" if case.names in last and "speechgpt_fairseq" in last else "traceback"), last
    if case.skip_report is not None:  # the user asked to skip the bad record: it must be skipped and reported
        ok = proc.returncode == 0 and case.skip_report in proc.stdout + proc.stderr
        return ("clear" if ok else "unclear"), (proc.stdout.strip().splitlines() or [""])[-1] if ok else last
    if proc.returncode == 0:
        return "silent", last
    if any(p.exists() and (p.is_file() or any(p.iterdir())) for p in case.outputs):
        return "partial", last
    one_line = re.search(r": error: ", last) or case.program != "speechgpt"
    return ("clear" if one_line and case.names in last else "unclear"), last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(REPO), help="checkout whose package the cases run (default: this one)")
    parser.add_argument("--only", default=None, help="run only the cases whose name holds this")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each case's last stderr line")
    args = parser.parse_args()
    code = Path(args.code).resolve()
    env = env_for(code)
    totals = dict.fromkeys(COLUMNS, 0)
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "out" / "emptydir").mkdir(parents=True)
        fixtures = build_fixtures(tmp, code)
        for case in cases(tmp, fixtures, code):
            if args.only and args.only not in case.name:
                continue
            if case.program == "speechgpt":
                cmd = [sys.executable, "-m", "speechgpt_fairseq.cli.main", *case.argv]
            else:
                cmd = [str(Path(sys.executable).parent / case.program), *case.argv]
            try:
                proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300,
                                      input=case.stdin or "")
                outcome, last = classify(case, proc)
            except subprocess.TimeoutExpired:
                outcome, last = "silent", "(timed out: no answer in 300 s)"
            totals[outcome] += 1
            print(f"{outcome:10} {case.name}" + (f"\n           {last[:300]}" if args.verbose else ""), flush=True)
    print("\n" + "  ".join(f"{name} {n}" for name, n in totals.items()) + f"  (cases {sum(totals.values())})")
    return int(any(totals[c] for c in COLUMNS[1:]))


if __name__ == "__main__":
    sys.exit(main())
