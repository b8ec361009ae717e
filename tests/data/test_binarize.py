"""prepare-units: both unit formats, repeats of k-means labels merged, bos as the tokenizer says, fairseq-readable
output, counted skips, clear errors, nothing partial."""
import dataclasses
import os
from pathlib import Path
import tracemalloc

import numpy as np
import pytest
from fairseq.data import MMapIndexedDataset

from speechgpt_fairseq.data.binarize import (BinarizeError, IndexedDatasetWriter, SplitStats, prepare_units,
                                             write_split)
from speechgpt_fairseq.data.vocabulary import Vocabulary


@pytest.fixture
def vocab():
    return Vocabulary.units_only(50)


def ids(vocab, units, closed=True):
    v = vocab
    return [*v.bos_ids, v.index["<sosp>"], *(v.unit_id(u) for u in units), *([v.index["<eosp>"]] if closed else [])]


def read(prefix):
    ds = MMapIndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_both_formats_give_the_same_records(vocab, tmp_path):
    (tmp_path / "a.km").write_text("1 2 3\n\n49 0\n")
    (tmp_path / "b.txt").write_text("<sosp><1><2><3><eosp>\n  \n<sosp> <49> <0> <eosp>\n")
    stats = prepare_units({"km": tmp_path / "a.km", "sg": tmp_path / "b.txt"}, tmp_path / "out", vocab,
                          show_progress=False)
    assert read(tmp_path / "out" / "km") == read(tmp_path / "out" / "sg") == [ids(vocab, [1, 2, 3]),
                                                                              ids(vocab, [49, 0])]
    assert [(s.records, s.skipped) for s in stats] == [(2, {"empty line": 1}), (2, {"empty line": 1})]
    assert Vocabulary.load(tmp_path / "out") == vocab


def test_kmeans_repeats_are_merged_unless_asked_not_to(vocab, tmp_path):
    """k-means labels come one per frame; SpeechGPT's units (and the vocoder's input) have runs merged. Unit strings
    are taken as written."""
    (tmp_path / "a.km").write_text("7 7 7 3 3 7 9 9\n")
    (tmp_path / "b.txt").write_text("<sosp><7><7><3><eosp>\n")
    prepare_units({"km": tmp_path / "a.km", "sg": tmp_path / "b.txt"}, tmp_path / "out", vocab, show_progress=False)
    assert read(tmp_path / "out" / "km") == [ids(vocab, [7, 3, 7, 9])]
    assert read(tmp_path / "out" / "sg") == [ids(vocab, [7, 7, 3])]
    prepare_units({"km": tmp_path / "a.km"}, tmp_path / "frames", vocab, show_progress=False, dedup=False)
    assert read(tmp_path / "frames" / "km") == [ids(vocab, [7, 7, 7, 3, 3, 7, 9, 9])]


def test_records_start_with_bos_only_when_the_tokenizer_adds_it(vocab, tmp_path):
    (tmp_path / "a.km").write_text("1 2\n")
    no_bos = dataclasses.replace(vocab, add_bos=False)
    prepare_units({"with": tmp_path / "a.km"}, tmp_path / "with", vocab, show_progress=False)
    prepare_units({"without": tmp_path / "a.km"}, tmp_path / "without", no_bos, show_progress=False)
    sosp = vocab.index["<sosp>"]
    assert read(tmp_path / "with" / "with")[0][:2] == [vocab.bos, sosp]
    assert read(tmp_path / "without" / "without")[0][:1] == [sosp]
    assert not Vocabulary.load(tmp_path / "without").add_bos


def test_prompts_stay_open(vocab, tmp_path):
    (tmp_path / "p.km").write_text("4 5\n")
    (tmp_path / "q.txt").write_text("<sosp><4><5>\n")
    prepare_units({"p": tmp_path / "p.km", "q": tmp_path / "q.txt"}, tmp_path / "out", vocab,
                  open_splits=["p", "q"], show_progress=False)
    assert read(tmp_path / "out" / "p") == read(tmp_path / "out" / "q") == [ids(vocab, [4, 5], closed=False)]


@pytest.mark.parametrize("content,message", [
    ("1 2\n3 50 4\n", r"a.txt:2: unit 50 is out of range: the vocabulary has 50 units"),
    ("1 2\n3 x 4\n", r"a.txt:2: expected space-separated unit ids"),
    ("<sosp><1><eosp>\n<sosp><1><sil><eosp>\n", r"a.txt:2: unknown token '<sil>' in a unit string"),
    ("<sosp><1><eosp>\nhello <1>\n", r"a.txt:2: expected a unit token like <12>, found 'hello <1>'"),
    ("<sosp><1><eosp>\n<1><2><eosp>\n", r"a.txt:2: a unit string starts with <sosp>"),
    ("<sosp><1><eosp>\n<sosp><1><eosp><2>\n", r"a.txt:2: unknown token '<eosp>'"),
    ("\n\n", r"a.txt: no utterances"),
    ("<sosp><1><eosp>\n<sosp><1><2>\n", r"a.txt:2: a unit string without the closing <eosp> .*--open"),
    (b"1 2\n3 \xff 4\n", r"a.txt:2: not UTF-8 text \(byte 0xff at column 3\)"),
])
def test_bad_lines_name_file_and_line_and_leave_nothing(vocab, tmp_path, content, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"earlier output")
    (tmp_path / "a.txt").write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "ok.km").write_text("1 2 3\n")
    with pytest.raises(BinarizeError, match=message):
        prepare_units({"valid": tmp_path / "ok.km", "train": tmp_path / "a.txt"}, out, vocab, show_progress=False,
                      overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["train.bin"]  # no partial split, no vocab
    assert (out / "train.bin").read_bytes() == b"earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ok.km", "out"]  # no scratch


def test_missing_input_is_named(vocab, tmp_path):
    with pytest.raises(BinarizeError, match="nope.km: no such file"):
        prepare_units({"train": tmp_path / "nope.km"}, tmp_path / "out", vocab, show_progress=False)


def test_writer_streams_in_flat_memory(tmp_path):
    """300k utterances of 60 tokens (36 MB of ids) pass through the writer in a few MB."""
    n, length = 300_000, 60

    def records():
        rng = np.random.default_rng(0)
        for _ in range(n):
            yield rng.integers(0, 109, length).tolist()

    tracemalloc.start()
    write_split(((r,) for r in records()), [(tmp_path / "big", 109)], SplitStats("gen"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ds = MMapIndexedDataset(str(tmp_path / "big"))
    assert len(ds) == n and int(ds.sizes.sum()) == n * length
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MB"


def test_writer_matches_fairseq_builder(tmp_path):
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(1)
    recs = [rng.integers(0, 33006, rng.integers(1, 40)).tolist() for _ in range(500)]
    w = IndexedDatasetWriter(tmp_path / "ours", 33006)
    for r in recs:
        w.add(r)
    w.close()
    import torch
    b = MMapIndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for r in recs:
        b.add_item(torch.tensor(r))
    b.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


# ---- the data directory as one unit ------------------------------------------------------------------------------

def test_an_earlier_data_directory_is_replaced_whole_and_only_when_asked(tmp_path, speechgpt_main):
    """A data directory of another vocabulary is refused; --overwrite replaces every split of it (none survives
    beside the new ones), and never a file prepare-units did not write."""
    from speechgpt_fairseq.tasks.base import TaskDataError, load_split

    (tmp_path / "a.km").write_text("1 2 3\n")
    (tmp_path / "b.km").write_text("4 5\n")
    out = tmp_path / "data"
    assert speechgpt_main(["prepare-units", f"train={tmp_path / 'a.km'}", f"old={tmp_path / 'b.km'}", "--num-units", 50,
                    "--out", out, "--no-progress"])[0] == 0
    again = ["prepare-units", f"train={tmp_path / 'a.km'}", "--num-units", 20, "--out", out, "--no-progress"]
    assert speechgpt_main(again) == (1, f"speechgpt prepare-units: error: {out}: exists and is not empty (pass "
                                         f"--overwrite to replace it)")
    assert Vocabulary.load(out).num_units == 50
    assert sorted(p.name for p in out.iterdir()) == ["old.bin", "old.idx", "train.bin", "train.idx", "vocab.json"]

    assert speechgpt_main(again + ["--overwrite"])[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "train.idx", "vocab.json"]
    assert Vocabulary.load(out).num_units == 20 and read(out / "train") == [ids(Vocabulary.units_only(20), [1, 2, 3])]
    with pytest.raises(TaskDataError, match="split 'old' not found"):
        load_split(str(out), "old")

    (out / "notes.txt").write_text("mine")
    status, err = speechgpt_main(again + ["--overwrite"])
    assert (status, err) == (1, f"speechgpt prepare-units: error: {out}: holds 'notes.txt', which this command does "
                                f"not write; --overwrite replaces only a directory of its own output (move that "
                                f"away, or write elsewhere)")
    assert (out / "notes.txt").read_text() == "mine" and (out / "train.bin").exists()


def test_a_killed_commit_never_leaves_a_mix_a_reader_accepts(tmp_path, monkeypatch):
    """Kill simulated inside the commit, right after its first rename: a reader (the tasks' load_data_vocabulary
    and load_split) sees the old data directory, the new one, or none, never new splits beside old ones."""
    from speechgpt_fairseq import atomic_files
    from speechgpt_fairseq.tasks.base import TaskDataError, load_data_vocabulary, load_split

    (tmp_path / "a.km").write_text("1 2 3\n4 4\n")
    (tmp_path / "b.km").write_text("7 8 9 10 11 12 13\n9 10\n")  # longer: old .idx over new .bin reads
    old_vocab, new_vocab = Vocabulary.units_only(50), Vocabulary.units_only(20)
    expected = {"old": (50, [ids(old_vocab, [1, 2, 3]), ids(old_vocab, [4])]),
                "new": (20, [ids(new_vocab, [7, 8, 9, 10, 11, 12, 13]), ids(new_vocab, [9, 10])])}

    def reader_sees(out):
        try:
            seen = (load_data_vocabulary(str(out)).num_units, read(out / "train"))
            load_split(str(out), "train")
        except (TaskDataError, OSError, ValueError):
            return "nothing"
        return next((name for name, view in expected.items() if view == seen), f"a mix: {seen}")

    class Killed(BaseException):
        pass

    real_replace, real_exchange = os.replace, atomic_files._exchange
    for exchange in ("exchange", "two renames"):
        out = tmp_path / exchange.replace(" ", "-")
        prepare_units({"train": tmp_path / "a.km"}, out, old_vocab, show_progress=False)

        def replace_then_die(src, dst):  # dies after the first rename of the commit, into `out` or beside it
            real_replace(src, dst)
            if Path(dst).parent in (tmp_path, out):
                raise Killed

        def exchange_then_die(a, b):
            assert real_exchange(a, b)
            raise Killed

        with monkeypatch.context() as m:
            m.setattr(os, "replace", replace_then_die)
            m.setattr(atomic_files, "_exchange", exchange_then_die if exchange == "exchange" else lambda a, b: False)
            with pytest.raises(Killed):
                prepare_units({"train": tmp_path / "b.km"}, out, new_vocab, show_progress=False, overwrite=True)
        assert reader_sees(out) in ("old", "new", "nothing"), exchange
        if exchange == "exchange":
            assert reader_sees(out) == "new"
        prepare_units({"train": tmp_path / "b.km"}, out, new_vocab, show_progress=False, overwrite=True)
        assert reader_sees(out) == "new"
