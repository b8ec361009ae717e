"""Reading fairseq-generate's output for scoring: output cut short, two runs in one file and text that is not UTF-8
are refused with the file and line."""
import pytest

from speechgpt_fairseq.evaluation import GenerateOutputError, read_generate_output


def sample(i: int, done: bool = True) -> str:
    lines = f"S-{i}\t[Human]: say {i}<eoh> [SpeechGPT]:\nT-{i}\tword {i}<eoa>\n"
    return lines + (f"H-{i}\t-0.5\tword {i}<eoa>\nD-{i}\t-0.5\tword {i}<eoa>\nP-{i}\t-0.1 -0.2\n" if done else "")


def test_whole_output_reads(tmp_path):
    (tmp_path / "gen.txt").write_text("".join(sample(i) for i in range(3)) + "Generate test with beam=1\n")
    records = read_generate_output(tmp_path / "gen.txt")
    assert list(records) == [0, 1, 2] and records[2]["hypothesis"] == "word 2<eoa>"


def test_output_cut_short_is_refused(tmp_path):
    (tmp_path / "gen.txt").write_text("".join(sample(i) for i in range(3)) + sample(3, done=False) + "S-4\tx\n")
    with pytest.raises(GenerateOutputError, match=r"gen.txt:17: sample 3 has a reference \(T-\) but no hypothesis "
                                                  r"\(D-\): the output is cut short"):
        read_generate_output(tmp_path / "gen.txt")


def test_two_outputs_in_one_file_are_refused(tmp_path):
    run = "".join(sample(i) for i in range(2))
    (tmp_path / "gen.txt").write_text(run + run)
    with pytest.raises(GenerateOutputError, match=r"gen.txt:12: sample 0 again \(its reference is also on line 2\)"):
        read_generate_output(tmp_path / "gen.txt")


def test_text_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "gen.txt").write_bytes(sample(0).encode() + b"T-1\tcaf\xe9\n")
    with pytest.raises(GenerateOutputError, match=r"gen.txt:6: not UTF-8 text \(byte 0xe9 at column 8\)"):
        read_generate_output(tmp_path / "gen.txt")


def test_a_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no such file"):
        read_generate_output(tmp_path)
