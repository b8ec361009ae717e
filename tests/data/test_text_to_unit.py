"""t2u-export and t2u-import: the documented source and target lines, bad input named by file and line with nothing
written, fairseq-generate's output read back in input order, and the printed recipe run with fairseq's own tools."""
import shlex
from pathlib import Path

import pytest

from speechgpt_fairseq.cli.main import main
from speechgpt_fairseq.cli.text_to_unit import next_commands
from speechgpt_fairseq.data.builders import BuildError
from speechgpt_fairseq.data.text_to_unit import (Split, TextToUnitError, characters, export_splits, read_hypotheses,
                                                 write_units)
from speechgpt_fairseq.speech.units import format_unit_string

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "corpus"
K = 100  # the bundled corpus' units


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def speechgpt(capsys, *args) -> tuple[int, str, str]:
    """`speechgpt ARGS` in this process (the console script is tested in tests/cli): (status, stdout, stderr)."""
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("text,lowercase,expected", [
    ("Hello  World", True, "h e l l o | w o r l d"),
    ("Hello  World", False, "H e l l o | W o r l d"),
    ("\tit's 12, ok.\n", True, "i t ' s | 1 2 , | o k ."),
    ("cafe\u0301 über", True, "c a f é | ü b e r"),  # a decomposed é is one symbol
    ("   ", True, ""),
])
def test_characters(text, lowercase, expected):
    assert characters(text, lowercase) == expected


# ---- export ----------------------------------------------------------------------------------------------------

@pytest.fixture
def pairs(tmp_path):
    text = write(tmp_path / "train.wrd", ["Hello  World", "The cat."])
    units = write(tmp_path / "train.km", ["5 5 7 7 7 3", "1 2 2"])
    return text, units


def test_export_writes_characters_and_deduplicated_units(tmp_path, pairs):
    stats = export_splits([Split("train", *pairs)], tmp_path / "out", num_units=K, show_progress=False)
    assert (tmp_path / "out" / "train.txt").read_text() == "h e l l o | w o r l d\nt h e | c a t .\n"
    assert (tmp_path / "out" / "train.unit").read_text() == "5 7 3\n1 2\n"
    assert stats["train"].written == {"pairs": 2} and not stats["train"].skipped


def test_export_options(tmp_path, pairs):
    export_splits([Split("train", *pairs)], tmp_path / "out", dedup=False, lowercase=False, num_units=K,
                  show_progress=False)
    assert (tmp_path / "out" / "train.txt").read_text().startswith("H e l l o | W o r l d\n")
    assert (tmp_path / "out" / "train.unit").read_text() == "5 5 7 7 7 3\n1 2 2\n"


def test_unit_strings_give_the_same_target(tmp_path, pairs):
    write(pairs[1], [format_unit_string([5, 5, 7, 7, 7, 3]), format_unit_string([1, 2, 2])])
    export_splits([Split("train", *pairs)], tmp_path / "out", num_units=K, show_progress=False)
    assert (tmp_path / "out" / "train.unit").read_text() == "5 7 3\n1 2\n"


def test_text_only_split_is_source_only(tmp_path, pairs):
    out = tmp_path / "out"
    export_splits([Split("train", *pairs), Split("speak", *pairs)], out, num_units=K, show_progress=False)
    speak = write(tmp_path / "speak.txt", ["Say this", "and that"])
    stats = export_splits([Split("speak", speak)], out, show_progress=False)
    assert (out / "speak.txt").read_text() == "s a y | t h i s\na n d | t h a t\n"
    assert not (out / "speak.unit").exists()  # the earlier targets would misalign with the new texts
    assert (out / "train.unit").exists() and stats["speak"].written == {"texts": 2}


def test_a_killed_export_never_leaves_texts_beside_units_of_another_export(tmp_path, pairs, monkeypatch):
    """Kill simulated after the first file of the export landed: each split's pair of files is the old pair, the new
    one, or incomplete (fairseq-preprocess stops on the missing file), never a new NAME.txt with an old NAME.unit.
    The next export removes the killed one's scratch."""
    import os

    from speechgpt_fairseq import atomic_files

    class Killed(BaseException):
        pass

    out = tmp_path / "out"
    export_splits([Split("train", *pairs)], out, num_units=K, show_progress=False)
    old = {suffix: (out / f"train.{suffix}").read_text() for suffix in ("txt", "unit")}
    new_pairs = (write(tmp_path / "b.wrd", ["Other words", "here"]), write(tmp_path / "b.km", ["9 9 8", "4"]))
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst).parent == out:
            raise Killed

    monkeypatch.setattr(os, "replace", replace_then_die)
    monkeypatch.setattr(atomic_files, "_process_gone", lambda pid: True)  # the killed run's process is gone
    with monkeypatch.context() as m:
        m.setattr(atomic_files.shutil, "rmtree", lambda *a, **k: None)  # a kill runs no clean-up either
        with pytest.raises(Killed):
            export_splits([Split("train", *new_pairs)], out, num_units=K, show_progress=False)
    files = {suffix: (out / f"train.{suffix}").read_text() for suffix in ("txt", "unit")
             if (out / f"train.{suffix}").exists()}
    assert files == old or len(files) < 2, files
    assert [p.name for p in out.iterdir() if p.name.startswith(".incomplete-")]  # what the kill left
    monkeypatch.setattr(os, "replace", real_replace)
    export_splits([Split("train", *new_pairs)], out, num_units=K, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["train.txt", "train.unit"]
    assert (out / "train.txt").read_text() == "o t h e r | w o r d s\nh e r e\n"


@pytest.mark.parametrize("text,units,message", [
    (["a", "b", "c"], ["1", "2"], "train.wrd:3: {d}/train.km ends at line 2: the units and text files must have "
                                  "one line per utterance, in the same order"),
    (["a", "b"], ["1", "2", "3"], "train.km:3: {d}/train.wrd ends at line 2"),
    (["a", "b"], ["1", "100 2"], "train.km:2: unit 100 is out of range: the vocabulary has 100 units (0..99)"),
    (["a", "b"], ["1", "2 x"], "train.km:2: expected space-separated unit ids (k-means labels), found 'x'"),
    (["a", " "], ["1", "2"], "train.wrd:2: empty text (expected a sentence"),
    (["a", "b"], ["1", ""], "train.km:2: empty line, but {d}/train.wrd:2 has a transcript"),
    (["a|b", "b"], ["1", "2"], "train.wrd:1: the text contains '|', the word-boundary symbol"),
])
def test_bad_pairs_are_named_and_nothing_is_written(tmp_path, capsys, text, units, message):
    write(tmp_path / "train.wrd", text)
    write(tmp_path / "train.km", units)
    good = write(tmp_path / "valid.txt", ["fine"])
    status, out, err = speechgpt(capsys, "t2u-export", "--text", good, "--text", tmp_path / "train.wrd", "--units",
                                 tmp_path / "train.km", "--out", tmp_path / "out", "--num-units", K, "--no-progress")
    assert status == 1 and not out
    assert err.startswith(f"speechgpt t2u-export: error: {tmp_path}/") and message.format(d=tmp_path) in err
    assert not list((tmp_path / "out").iterdir())  # not even the good split


def test_bad_text_only_line_is_named(tmp_path):
    speak = write(tmp_path / "speak.txt", ["one", "", "three"])
    with pytest.raises(BuildError, match=f"^{speak}:2: empty text"):  # TextToUnitError is a BuildError too
        export_splits([Split("speak", speak)], tmp_path / "out", show_progress=False)


def test_skip_bad_counts_each_reason(tmp_path, capsys):
    write(tmp_path / "t.wrd", ["a", "", "c", "d|e", "f"])
    write(tmp_path / "t.km", ["1", "2", "300", "4", "5"])
    status, out, _ = speechgpt(capsys, "t2u-export", "--text", f"train={tmp_path / 't.wrd'}", "--units",
                               f"train={tmp_path / 't.km'}", "--out", tmp_path / "out", "--num-units", K,
                               "--skip-bad", "--no-progress")
    assert status == 0
    assert out.splitlines()[0] == (f"wrote {tmp_path}/out/train.txt, .unit: 2 pairs; skipped 3 (bad text: 1, "
                                   f"empty text: 1, unit out of range: 1)")
    assert (tmp_path / "out" / "train.unit").read_text() == "1\n5\n"


@pytest.mark.parametrize("args,message", [
    (["--text", "x/a.wrd", "--units", "b.km"], "--units b.km: split 'b' has no --text (give --text b=FILE; "
                                               "splits given: a)"),
    (["--text", "x/a.wrd", "--text", "y/a.txt"], "--text: split 'a' is given twice (x/a.wrd and y/a.txt)"),
    (["--text", "=a.txt"], "--text '=a.txt': expected [SPLIT=]FILE"),
    (["--text", "a/b=c.txt"], "'a/b': a split name is letters, digits"),
    (["--text", "missing.txt"], "missing.txt: no such file (texts of split 'missing')"),
])
def test_bad_splits_are_refused(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    status, _, err = speechgpt(capsys, "t2u-export", *args, "--out", "out")
    assert status == 1 and message in err


def test_a_split_with_nothing_to_write_is_an_error(tmp_path):
    speak = write(tmp_path / "speak.txt", ["", "a|b"])
    with pytest.raises(BuildError, match=r"speak.txt: no texts to write for split 'speak' \(2 lines read; "
                                         r"empty text: 1, bad text: 1\)"):
        export_splits([Split("speak", speak)], tmp_path / "out", skip_bad=True, show_progress=False)


def test_commands_for_a_held_out_test_set_without_valid(tmp_path):
    commands = [shlex.join(c) for c in next_commands(tmp_path, [Split("train", Path("t"), Path("u")),
                                                                Split("test", Path("t2"), Path("u2"))])]
    assert "--validpref" not in commands[0] and commands[1].endswith("--disable-validation")
    assert f"--srcdict {tmp_path}/bin/dict.txt.txt --tgtdict {tmp_path}/bin/dict.unit.txt --testpref" in commands[2]
    assert f"--gen-subset test --path {tmp_path}/checkpoints/checkpoint_last.pt" in commands[3]
    assert [c.split()[0] for c in commands] == ["fairseq-preprocess", "fairseq-train", "fairseq-preprocess",
                                                "fairseq-generate", "speechgpt"]
    texts_named_train = next_commands(tmp_path, [Split("train", Path("t"))])  # decoded, not trained on
    assert [c[0] for c in texts_named_train] == ["fairseq-preprocess", "cp", "fairseq-generate", "speechgpt"]


def test_an_input_is_never_overwritten(tmp_path):
    text = write(tmp_path / "test.txt", ["prompts of another tool"])
    with pytest.raises(TextToUnitError, match="would overwrite its own input"):
        export_splits([Split("test", text)], tmp_path, show_progress=False)
    assert text.read_text() == "prompts of another tool\n"


# ---- import ----------------------------------------------------------------------------------------------------

GENERATED = """\
2026-01-01 00:00:00 | INFO | fairseq_cli.generate | loading model(s)
S-2\tb y e
H-2\t-0.25\t9 9 4
D-2\t-0.25\t9 9 4
P-2\t-0.1 -0.2 -0.3 -0.4
H-2\t-0.75\t1 1
S-0\th i
T-0\t3 4
H-0\t-0.5\t3 4
H-1\t-1.5\t
2026-01-01 00:00:01 | INFO | fairseq_cli.generate | Translated 3 sentences
"""


def test_hypotheses_in_input_order(tmp_path):
    path = tmp_path / "generate-test.txt"
    path.write_text(GENERATED)
    # sample order, the best of an n-best list, and an empty prediction kept as an empty line
    assert read_hypotheses(path) == [[3, 4], [], [9, 9, 4]]
    assert read_hypotheses(path, expected=3) == [[3, 4], [], [9, 9, 4]]


@pytest.mark.parametrize("lines,expected,message", [
    (["H-0\t-1\t1", "H-2\t-1\t2"], None, "no hypothesis for sample 1 (source line 2); expected samples 0..2"),
    (["H-0\t-1\t1"], 3, "no hypothesis for sample 1 (source line 2) and 1 more; expected samples 0..2"),
    (["H-5\t-1\t1", "H-0\t-1\t1", "H-1\t-1\t2", "H-2\t-1\t3"], 2,
     "hypotheses for 2 samples beyond the 2 source lines (sample 2)"),
    (["S-0\tx", "H-0\t-1\t1 <unk> 2"], None, "generate-test.txt:2: sample 0: '<unk>' is not a unit id"),
    (["H-x\t-1\t1"], None, "generate-test.txt:1: expected 'H-<sample id><TAB><score><TAB><units>'"),
    (["S-0\tx"], None, "generate-test.txt: no H- lines (expected the output of fairseq-generate)"),
])
def test_bad_generate_output_is_named(tmp_path, lines, expected, message):
    path = write(tmp_path / "generate-test.txt", lines)
    with pytest.raises(TextToUnitError, match="^" + str(path).replace(".", r"\.")) as e:
        read_hypotheses(path, expected)
    assert message in str(e.value)


@pytest.mark.parametrize("fmt,expected", [("kmeans", "3 4\n\n9 4\n"), ("speechgpt", "<sosp><3><4><eosp>\n"
                                                                                      "<sosp><eosp>\n"
                                                                                      "<sosp><9><4><eosp>\n")])
def test_import_writes_either_format(tmp_path, capsys, fmt, expected):
    (tmp_path / "gen.txt").write_text(GENERATED)
    write(tmp_path / "src.txt", ["h i", "x", "b y e"])
    status, out, _ = speechgpt(capsys, "t2u-import", tmp_path / "gen.txt", "--out", tmp_path / "u" / "pred",
                               "--format", fmt, "--source", tmp_path / "src.txt", "--dedup")
    assert status == 0 and (tmp_path / "u" / "pred").read_text() == expected
    assert out.strip() == (f"wrote {tmp_path}/u/pred: 3 utterances, 1.3 units on average; 1 empty predictions "
                           f"(the model ended at once)")
    write(tmp_path / "src.txt", ["h i", "x", "b y e", "more"])
    status, _, err = speechgpt(capsys, "t2u-import", tmp_path / "gen.txt", "--out", tmp_path / "u" / "pred",
                               "--source", tmp_path / "src.txt")
    assert status == 1 and "no hypothesis for sample 3 (source line 4)" in err
    assert (tmp_path / "u" / "pred").read_text() == expected  # the earlier output is left whole


def test_write_units_refuses_an_unknown_format(tmp_path):
    with pytest.raises(TextToUnitError, match="unknown unit format 'wav'"):
        write_units([[1]], tmp_path / "x", "wav")


# ---- the recipe, with fairseq's own tools ------------------------------------------------------------------------

# CPU-second settings appended to the printed commands (argparse keeps the last value of an option)
TINY_TRAIN = ("--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
              "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
              "--decoder-attention-heads 2 --max-tokens 2048 --max-update 20 --warmup-updates 5 --num-workers 0")
TINY_GENERATE = "--beam 1 --max-len-a 0 --max-len-b 30 --batch-size 32 --num-workers 0"


def test_printed_recipe_trains_decodes_and_imports(tmp_path, capsys, cli, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a 32-wide model only loses time to more threads
    splits = {"train": 300, "valid": 30}
    for name, n in splits.items():
        for suffix in ("wrd", "km"):
            write(tmp_path / f"{name}.{suffix}", (CORPUS / f"{name}.{suffix}").read_text().splitlines()[:n])
    speak = (CORPUS / "test.wrd").read_text().splitlines()
    write(tmp_path / "speak.txt", speak)
    out = tmp_path / "t2u"
    status, printed, _ = speechgpt(capsys, "t2u-export", "--text", tmp_path / "train.wrd", "--units",
                                   tmp_path / "train.km", "--text", tmp_path / "valid.wrd", "--units",
                                   tmp_path / "valid.km", "--text", tmp_path / "speak.txt", "--out", out,
                                   "--num-units", K, "--no-progress")
    assert status == 0
    commands = [shlex.split(line) for line in printed.splitlines() if not line.startswith(("wrote ", "#"))]
    assert [c[0] for c in commands] == ["fairseq-preprocess", "fairseq-train", "fairseq-preprocess", "cp",
                                        "fairseq-generate", "speechgpt"]
    for command in commands:
        if command[0] == "cp":
            (Path(command[2]) / Path(command[1]).name).write_bytes(Path(command[1]).read_bytes())
        elif command[0] == "speechgpt":
            assert speechgpt(capsys, *command[1:])[0] == 0
        else:
            extra = {"fairseq-train": TINY_TRAIN, "fairseq-generate": TINY_GENERATE}.get(command[0], "")
            cli(*command, *extra.split())

    predicted = (out / "speak.predicted.km").read_text().splitlines()
    assert len(predicted) == len(speak)
    trained_units = {line.split()[0] for line in (out / "bin" / "dict.unit.txt").read_text().splitlines()}
    assert all(line.split() and set(line.split()) <= trained_units for line in predicted)
    assert all(0 <= int(u) < K for line in predicted for u in line.split())
