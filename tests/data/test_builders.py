"""build-cross-modal, build-text-instructions and build-com: the shipped instructions, the documented line format, seeded mixes, every
input layout giving the same file, and bad input named by file and line with nothing written."""
import json
import random
import re
from collections import Counter

import pytest

from speechgpt_fairseq.data.builders import (TEMPLATES_DIR, BuildError, build_com, build_cross_modal,
                                             build_text_instructions, load_templates, parse_mix, shipped_templates)
from speechgpt_fairseq.data.prompts import chain_of_modality, parse_response, split_turn
from speechgpt_fairseq.speech.units import dedup_units, format_kmeans_labels, format_unit_string

K = 50
WORDS = "the a cat sat on mat speech unit model hello world café 12 über".split()
ASR = re.compile(r"\[Human\]: (.+) This is input: (<sosp>(?:<\d+>)+<eosp>)<eoh> \[SpeechGPT\]: (.+)<eoa>")
TTS = re.compile(r"\[Human\]: (.+) This is input: (.+)<eoh> \[SpeechGPT\]: (<sosp>(?:<\d+>)+<eosp>)<eoa>")


def make_pairs(n: int, seed: int = 0) -> list[tuple[list[int], str]]:
    """(units with repeats, transcript) pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        units = [u for _ in range(rng.randint(1, 8)) for u in [rng.randrange(K)] * rng.randint(1, 3)]
        pairs.append((units, " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))))
    return pairs


def write_aligned(tmp_path, pairs, unit_strings=False):
    fmt = format_unit_string if unit_strings else format_kmeans_labels
    (tmp_path / "units.txt").write_text("".join(fmt(u) + "\n" for u, _ in pairs), encoding="utf-8")
    (tmp_path / "text.txt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return dict(units=tmp_path / "units.txt", text=tmp_path / "text.txt")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def cross_modal(tmp_path, out="out.jsonl", **kwargs):
    """build_cross_modal with K units and no progress bar; returns (lines as dicts, stats)."""
    kwargs.setdefault("num_units", K)
    stats = build_cross_modal(tmp_path / out, show_progress=False, **kwargs)
    return [json.loads(line) for line in (tmp_path / out).read_text(encoding="utf-8").splitlines()], stats


def com(tmp_path, records, out="com.jsonl", **kwargs):
    kwargs.setdefault("num_units", K)
    stats = build_com(write_jsonl(tmp_path / "com_in.jsonl", records), tmp_path / out, show_progress=False,
                      **kwargs)
    return [json.loads(line) for line in (tmp_path / out).read_text(encoding="utf-8").splitlines()], stats


# ---- templates -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["asr", "tts"])
def test_shipped_templates_are_many_distinct_and_plain(task):
    templates = shipped_templates(task)
    assert len(templates) >= 120
    normalised = {re.sub(r"[^a-z0-9 ]", "", t.lower()).strip() for t in templates}
    assert len(normalised) == len(templates)  # distinct beyond case and punctuation
    raw = (TEMPLATES_DIR / f"{task}.txt").read_text(encoding="utf-8")
    assert not set("<>[]") & set(raw)
    assert all(t == t.strip() and len(t.split()) >= 1 for t in templates)


def test_templates_differ_between_tasks():
    assert not set(shipped_templates("asr")) & set(shipped_templates("tts"))


@pytest.mark.parametrize("content,message", [
    ("# c\nSay it.\n\nSay it.\n", r"t.txt:4: duplicate template \(first at line 2\): 'Say it.'"),
    ("Say it.\nSay <this>.\n", r"t.txt:2: a template must not contain"),
    ("Say [it].\n", r"t.txt:1: a template must not contain"),
    ("# only a comment\n\n", r"t.txt: no templates"),
])
def test_bad_templates_are_named(tmp_path, content, message):
    (tmp_path / "t.txt").write_text(content)
    with pytest.raises(BuildError, match=message):
        load_templates(tmp_path / "t.txt")


def test_templates_skip_comments_and_blank_lines(tmp_path):
    (tmp_path / "t.txt").write_text("# heading\n\n  Write it down.  \n#x\nType it.\n")
    assert load_templates(tmp_path / "t.txt") == ["Write it down.", "Type it."]


# ---- cross-modal -----------------------------------------------------------------------------------------------

def test_lines_have_the_documented_form(tmp_path):
    pairs = make_pairs(300)
    lines, stats = cross_modal(tmp_path, **write_aligned(tmp_path, pairs), prefix="You are SpeechGPT.")
    asr, tts = set(shipped_templates("asr")), set(shipped_templates("tts"))
    assert len(lines) == 300 and stats.written["asr"] + stats.written["tts"] == 300
    for line, (units, text) in zip(lines, pairs):
        assert set(line) == {"prefix", "plain_text"} and line["prefix"] == "You are SpeechGPT."
        unit_string = format_unit_string(dedup_units(units))
        if m := ASR.fullmatch(line["plain_text"]):
            assert m.group(1) in asr and m.groups()[1:] == (unit_string, text)
            assert parse_response(split_turn(line["plain_text"])[1]) == {"text": text}
        else:
            m = TTS.fullmatch(line["plain_text"])
            assert m and m.group(1) in tts and m.groups()[1:] == (text, unit_string)
            assert parse_response(split_turn(line["plain_text"])[1]) == {"units": dedup_units(units)}


@pytest.mark.parametrize("p", [0.5, 0.2, 0.9])
def test_asr_share_follows_p_and_the_seed(tmp_path, p):
    files = write_aligned(tmp_path, make_pairs(2000))
    lines, stats = cross_modal(tmp_path, asr_prob=p, seed=1, **files)
    is_asr = [bool(ASR.fullmatch(line["plain_text"])) for line in lines]
    assert abs(sum(is_asr) / 2000 - p) < 0.04 and stats.written["asr"] == sum(is_asr)
    again, _ = cross_modal(tmp_path, out="again.jsonl", asr_prob=p, seed=1, **files)
    other, _ = cross_modal(tmp_path, out="other.jsonl", asr_prob=p, seed=2, **files)
    assert again == lines and other != lines
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


@pytest.mark.parametrize("p,kind", [(0.0, "tts"), (1.0, "asr")])
def test_asr_prob_at_the_ends(tmp_path, p, kind):
    _, stats = cross_modal(tmp_path, asr_prob=p, **write_aligned(tmp_path, make_pairs(200)))
    assert stats.written == {kind: 200}


def test_every_template_appears(tmp_path):
    lines, _ = cross_modal(tmp_path, **write_aligned(tmp_path, make_pairs(5000)))
    used = Counter()
    for line in lines:
        m = ASR.fullmatch(line["plain_text"]) or TTS.fullmatch(line["plain_text"])
        used[m.group(1)] += 1
    assert set(used) == set(shipped_templates("asr")) | set(shipped_templates("tts"))


def test_own_templates_replace_the_shipped_ones(tmp_path):
    lines, _ = cross_modal(tmp_path, asr_templates=["Write it."], tts_templates=["Say it."],
                           **write_aligned(tmp_path, make_pairs(50)))
    assert {line["plain_text"].split(" This is input:")[0] for line in lines} == {"[Human]: Write it.",
                                                                                    "[Human]: Say it."}


def test_every_input_layout_gives_the_same_file(tmp_path):
    pairs = make_pairs(400)
    outputs = []

    def build(name, **inputs):
        cross_modal(tmp_path, out=name, seed=3, **inputs)
        outputs.append((tmp_path / name).read_bytes())

    build("aligned_km", **write_aligned(tmp_path, pairs))
    build("aligned_sg", **write_aligned(tmp_path, pairs, unit_strings=True))
    for fmt, name in ((format_kmeans_labels, "km.tsv"), (format_unit_string, "sg.tsv")):
        (tmp_path / name).write_text("\ufeffid\ttext\tunits\n" + "".join(  # a BOM, as spreadsheets write
            f"utt{i}\t{t}\t{fmt(u)}\n" for i, (u, t) in enumerate(pairs)), encoding="utf-8")
        build(f"out_{name}", manifest=tmp_path / name)
    build("list", manifest=write_jsonl(tmp_path / "list.jsonl", [{"units": u, "text": t} for u, t in pairs]))
    build("sg", manifest=write_jsonl(tmp_path / "sg.jsonl",
                                     [{"text": t, "units": format_unit_string(u), "id": 1} for u, t in pairs]))
    assert len(outputs) == 6 and len(set(outputs)) == 1


def test_dedup_can_be_turned_off(tmp_path):
    pairs = [([3, 3, 3, 7, 7, 3], "hi")]
    lines, _ = cross_modal(tmp_path, asr_prob=1.0, dedup=False, **write_aligned(tmp_path, pairs))
    assert "<sosp><3><3><3><7><7><3><eosp>" in lines[0]["plain_text"]
    lines, _ = cross_modal(tmp_path, asr_prob=1.0, **write_aligned(tmp_path, pairs))
    assert "<sosp><3><7><3><eosp>" in lines[0]["plain_text"]


def test_empty_lines_are_skipped_and_counted(tmp_path):
    (tmp_path / "u.km").write_text("1 2\n\n3 4\n\n")
    (tmp_path / "t.txt").write_text("one\n  \ntwo\n")  # the text file lacks the last, empty, line
    lines, stats = cross_modal(tmp_path, units=tmp_path / "u.km", text=tmp_path / "t.txt")
    assert len(lines) == 2 and stats.read == 2 and stats.skipped == {"empty line": 2}
    (tmp_path / "m.jsonl").write_text('\n{"units": [1], "text": "a"}\n\n')
    lines, stats = cross_modal(tmp_path, manifest=tmp_path / "m.jsonl")
    assert len(lines) == 1 and stats.skipped == {"empty line": 2}


# ---- bad input -------------------------------------------------------------------------------------------------

BAD_JSONL = [  # (second line of a JSON lines manifest, error, skip reason)
    ('{"units": [1, 2], "text": "ok"', r"m.jsonl:2: not valid JSON", "malformed JSON"),
    ('[1, 2]', r"m.jsonl:2: expected a JSON object, found list", "malformed JSON"),
    ('{"units": [1, 2]}', r"m.jsonl:2: no field 'text'", "missing field"),
    ('{"units": null, "text": "a"}', r"m.jsonl:2: no field 'units'", "missing field"),
    ('{"units": [1, 50], "text": "a"}', r"m.jsonl:2: field 'units': unit 50 is out of range", "unit out of range"),
    ('{"units": "<sosp><77><eosp>", "text": "a"}', r"m.jsonl:2: field 'units': unit 77 is out of range",
     "unit out of range"),
    ('{"units": "1 2", "text": "a"}', r"m.jsonl:2: field 'units': expected SpeechGPT unit strings as in the first "
                                      r"record, found '1 2'", "bad units"),
    ('{"units": "<sosp><1><sil><eosp>", "text": "a"}', r"m.jsonl:2: field 'units': unknown token '<sil>'",
     "bad units"),
    ('{"units": [1, -2], "text": "a"}', r"m.jsonl:2: field 'units': expected a list of unit ids", "bad units"),
    ('{"units": "<sosp><eosp>", "text": "a"}', r"m.jsonl:2: field 'units': no units", "empty units"),
    ('{"units": [1], "text": "   "}', r"m.jsonl:2: field 'text': empty transcript", "empty transcript"),
    ('{"units": [1], "text": 5}', r"m.jsonl:2: field 'text': expected a string, found int", "bad text"),
]


@pytest.mark.parametrize("line,message,reason", BAD_JSONL, ids=[r for _, _, r in BAD_JSONL])
def test_bad_manifest_lines_are_named_and_nothing_is_written(tmp_path, line, message, reason):
    (tmp_path / "m.jsonl").write_text('{"units": "<sosp><1><2><eosp>", "text": "ok"}\n' + line + "\n")
    (tmp_path / "out.jsonl").write_text("earlier output\n")
    with pytest.raises(BuildError, match=message):
        cross_modal(tmp_path, manifest=tmp_path / "m.jsonl")
    assert (tmp_path / "out.jsonl").read_text() == "earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "out.jsonl"]  # no temporary left


@pytest.mark.parametrize("units,text,message", [
    ("1 2\n3 4\n5\n", "a\nb\n", r"u.km:3: \S+/t.txt ends at line 2: the units and text files must have one line"),
    ("1 2\n", "a\nb\n", r"t.txt:2: \S+/u.km ends at line 1"),
    ("1 2\n\n", "a\nb\n", r"u.km:2: empty line, but \S+/t.txt:2 has a transcript"),
    ("1 2\n3 4\n", "a\n\n", r"t.txt:2: empty transcript"),
    ("1 2\n3 x\n", "a\nb\n", r"u.km:2: expected space-separated unit ids"),
    ("<sosp><1><eosp>\n<sosp><1><eoh><eosp>\n", "a\nb\n", r"u.km:2: unknown token '<eoh>'"),
    ("1 2\n3 50\n", "a\nb\n", r"u.km:2: unit 50 is out of range"),
])
def test_bad_aligned_files_are_named(tmp_path, units, text, message):
    (tmp_path / "u.km").write_text(units)
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(BuildError, match=message):
        cross_modal(tmp_path, units=tmp_path / "u.km", text=tmp_path / "t.txt")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("content,message", [
    ("id\tunits\nu1\t1 2\n", r"m.tsv:1: the header has no column 'text'"),
    ("units\ttext\n1 2\ta\n3 4\n", r"m.tsv:3: 1 columns, the header has 2"),
    ("units\ttext\n1 2\ta\n1 99\tb\n", r"m.tsv:3: column 'units': unit 99 is out of range"),
])
def test_bad_tsv_is_named(tmp_path, content, message):
    (tmp_path / "m.tsv").write_text(content)
    with pytest.raises(BuildError, match=message):
        cross_modal(tmp_path, manifest=tmp_path / "m.tsv")
    assert not (tmp_path / "out.jsonl").exists()


def test_skip_bad_counts_each_reason(tmp_path):
    good = '{"units": [1, 2], "text": "ok"}'
    (tmp_path / "m.jsonl").write_text("\n".join([good, "", *(line for line, _, _ in BAD_JSONL), good, ""]) + "\n")
    lines, stats = cross_modal(tmp_path, manifest=tmp_path / "m.jsonl", skip_bad=True)
    assert len(lines) == 2 and stats.read == 2 + len(BAD_JSONL)
    assert stats.skipped == {"empty line": 2, **Counter(reason for _, _, reason in BAD_JSONL)}

    (tmp_path / "u.km").write_text("1 2\n3 99\n4\n5\n6\n")
    (tmp_path / "t.txt").write_text("a\nb\n\nc\n")
    lines, stats = cross_modal(tmp_path, units=tmp_path / "u.km", text=tmp_path / "t.txt", skip_bad=True)
    assert len(lines) == 2
    assert stats.skipped == {"unit out of range": 1, "empty transcript": 1, "unpaired line": 1}


def test_a_line_that_is_not_utf8_is_named_or_skipped(tmp_path):
    (tmp_path / "u.km").write_text("1 2\n3 4\n5 6\n")
    (tmp_path / "t.txt").write_bytes(b"one\ncaf\xe9\nthree\n")
    with pytest.raises(BuildError, match=r"t.txt:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
        cross_modal(tmp_path, units=tmp_path / "u.km", text=tmp_path / "t.txt")
    assert not (tmp_path / "out.jsonl").exists()
    lines, stats = cross_modal(tmp_path, units=tmp_path / "u.km", text=tmp_path / "t.txt", skip_bad=True)
    assert len(lines) == 2 and stats.skipped == {"not UTF-8": 1}
    (tmp_path / "m.jsonl").write_bytes(b'{"units": [1], "text": "a"}\n{"units": [1], "text": "\xff"}\n')
    with pytest.raises(BuildError, match=r"m.jsonl:2: not UTF-8 text \(byte 0xff at column 25\)"):
        cross_modal(tmp_path, manifest=tmp_path / "m.jsonl")


def test_an_empty_input_is_an_error_naming_it(tmp_path):
    """An empty input would give an empty output: it is refused, the input named, nothing written."""
    (tmp_path / "m.jsonl").write_text("\n")
    with pytest.raises(BuildError, match=r"out.jsonl: no examples to write \(0 records read from \S*m.jsonl; "
                                         r"empty line: 1\)"):
        cross_modal(tmp_path, manifest=tmp_path / "m.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_nothing_to_write_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"units": [99], "text": "a"}\n\n')
    with pytest.raises(BuildError, match=r"out.jsonl: no examples to write \(1 records read from .*; unit out of "
                                         r"range: 1, "
                                         r"empty line: 1\)"):
        cross_modal(tmp_path, manifest=tmp_path / "m.jsonl", skip_bad=True)
    assert not (tmp_path / "out.jsonl").exists()


def test_inputs_are_checked(tmp_path):
    with pytest.raises(BuildError, match="nope.jsonl: no such file"):
        cross_modal(tmp_path, manifest=tmp_path / "nope.jsonl")
    with pytest.raises(BuildError, match="give a units file and a text file"):
        cross_modal(tmp_path, units=tmp_path / "u.km")
    with pytest.raises(BuildError, match=r"the ASR probability must lie in \[0, 1\]"):
        cross_modal(tmp_path, asr_prob=1.5, **write_aligned(tmp_path, make_pairs(2)))


# ---- chain of modality -----------------------------------------------------------------------------------------

def com_records(n, fields=("units_i", "units_r"), seed=0):
    rng = random.Random(seed)
    records = []
    for i, (units, text) in enumerate(make_pairs(n, seed)):
        r = {"text_i": text, "text_r": f"answer {i}"}
        if "units_i" in fields:
            r["units_i"] = units
        if "units_r" in fields:
            r["units_r"] = format_unit_string([rng.randrange(K) for _ in range(3)])
        records.append(r)
    return records


def format_of(plain_text: str) -> str:
    prompt, response = split_turn(plain_text)
    speech_i = "<sosp>" in prompt
    speech_r = "[ua]" in response
    fmt = ("s" if speech_i else "t") + "2" + ("s" if speech_r else "t")
    return "t2t_restated" if fmt == "t2t" and not response.startswith(" [ta]") else fmt


def test_com_lines_are_the_documented_formats(tmp_path):
    records = com_records(200)
    lines, stats = com(tmp_path, records, prefix="P")
    assert len(lines) == 200 and sum(stats.written.values()) == 200
    for line, r in zip(lines, records):
        assert set(line) == {"prefix", "plain_text"} and line["prefix"] == "P"
        fmt = format_of(line["plain_text"])
        units_r = [int(u) for u in re.findall(r"\d+", r["units_r"])]
        assert line["plain_text"] == chain_of_modality(fmt, r["text_i"], r["text_r"], dedup_units(r["units_i"]),
                                                       dedup_units(units_r))


@pytest.mark.parametrize("fields,mix,expected", [
    (("units_i", "units_r"), "s2s=0.4,s2t=0.2,t2s=0.2,t2t=0.2", {"s2s": .4, "s2t": .2, "t2s": .2, "t2t": .2}),
    (("units_i", "units_r"), "s2s=2,t2t=6", {"s2s": .25, "t2t": .75}),
    (("units_i",), "s2s=0.4,s2t=0.2,t2s=0.2,t2t=0.2", {"s2t": .5, "t2t": .5}),
    (("units_r",), "s2s=0.4,s2t=0.2,t2s=0.3,t2t=0.1", {"t2s": .75, "t2t": .25}),
    ((), "s2s=0.4,s2t=0.2,t2s=0.2,t2t=0.2", {"t2t": 1.0}),
    ((), "s2s=0.4,t2t=0.2,t2t_restated=0.6", {"t2t": .25, "t2t_restated": .75}),
])
def test_com_formats_follow_the_mix_and_the_fields(tmp_path, fields, mix, expected):
    lines, stats = com(tmp_path, com_records(2000, fields), mix=mix, seed=5)
    shares = Counter(format_of(line["plain_text"]) for line in lines)
    assert set(shares) == set(expected) and stats.written == dict(shares)
    for fmt, share in expected.items():
        assert abs(shares[fmt] / 2000 - share) < 0.04, (fmt, shares)
    again, _ = com(tmp_path, com_records(2000, fields), out="again.jsonl", mix=mix, seed=5)
    assert again == lines
    if len(expected) > 1:
        other, _ = com(tmp_path, com_records(2000, fields), out="other.jsonl", mix=mix, seed=6)
        assert other != lines


def test_com_counts_records_no_format_fits(tmp_path):
    records = com_records(10) + com_records(5, fields=("units_i",))
    lines, stats = com(tmp_path, records, mix="s2s=1,t2s=1")
    assert len(lines) == 10 and stats.skipped == {"no selected format fits its fields": 5}
    with pytest.raises(BuildError, match="no examples to write"):
        com(tmp_path, com_records(3, fields=()), out="none.jsonl", mix="s2s=1")
    assert not (tmp_path / "none.jsonl").exists()


def test_com_reads_units_only_where_a_selected_format_needs_them(tmp_path):
    records = [{"text_i": "q", "text_r": "a", "units_i": [999], "units_r": "<sosp><junk>"}]
    lines, _ = com(tmp_path, records, mix="t2t=1")
    assert lines[0]["plain_text"] == "[Human]: q<eoh>. [SpeechGPT]: [ta] a<eoa>."
    lines, _ = com(tmp_path, records, out="restated.jsonl", mix="t2t_restated=1")
    assert lines[0]["plain_text"] == "[Human]: q<eoh>. [SpeechGPT]: q; [ta] a<eoa>."
    with pytest.raises(BuildError, match=r"com_in.jsonl:1: field 'units_i': unit 999 is out of range"):
        com(tmp_path, records, out="x.jsonl", mix="s2t=1")


@pytest.mark.parametrize("record,message,reason", [
    ({"text_i": "q"}, r"com_in.jsonl:2: no field 'text_r'", "missing field"),
    ({"text_i": "", "text_r": "a"}, r"com_in.jsonl:2: field 'text_i': empty text", "empty text"),
    ({"text_i": "q", "text_r": "a", "units_r": [1, 60]}, r"com_in.jsonl:2: field 'units_r': unit 60 is out of range",
     "unit out of range"),
    ({"text_i": "q", "text_r": "a", "units_i": "<sosp><1>x"}, r"com_in.jsonl:2: field 'units_i': expected a unit",
     "bad units"),
])
def test_com_bad_records(tmp_path, record, message, reason):
    records = [{"text_i": "q", "text_r": "a"}, record]
    with pytest.raises(BuildError, match=message):
        com(tmp_path, records)
    assert not (tmp_path / "com.jsonl").exists()
    lines, stats = com(tmp_path, records, skip_bad=True)
    assert len(lines) == 1 and stats.skipped == {reason: 1}


@pytest.mark.parametrize("spec,message", [
    ("s2s=0.5,x2y=0.5", r"'x2y=0.5': expected FORMAT=WEIGHT"),
    ("s2s", r"'s2s': expected FORMAT=WEIGHT"),
    ("s2s=lots", r"'s2s=lots': the weight is not a number"),
    ("s2s=-1,t2t=2", r"'s2s=-1': weights must be non-negative"),
    ("s2s=0,t2t=0", r"at least one format needs a positive weight"),
])
def test_bad_mix(spec, message):
    with pytest.raises(BuildError, match=message):
        parse_mix(spec)


def test_mix_is_normalised():
    assert parse_mix("t2t=3, s2t=1") == {"s2s": 0.0, "s2t": 0.25, "t2s": 0.0, "t2t": 0.75, "t2t_restated": 0.0}


# ---- the command line ------------------------------------------------------------------------------------------

def test_build_cross_modal_end_to_end(cli, tmp_path):
    pairs = make_pairs(100)
    files = write_aligned(tmp_path, pairs)
    (tmp_path / "asr.txt").write_text("Write it.\n")
    run = cli("speechgpt", "build-cross-modal", "--units", files["units"], "--text", files["text"],
              "--out", tmp_path / "sub" / "cm.jsonl", "--asr-prob", "0.3", "--seed", "4", "--no-dedup",
              "--prefix", "SYS", "--num-units", K, "--asr-templates", tmp_path / "asr.txt", "--no-progress")
    lines = [json.loads(x) for x in (tmp_path / "sub" / "cm.jsonl").read_text().splitlines()]
    n_asr = sum(x["plain_text"].startswith("[Human]: Write it. This is input: <sosp>") for x in lines)
    assert run.stdout.strip() == (f"wrote {tmp_path / 'sub' / 'cm.jsonl'}: 100 examples from 100 pairs read "
                                  f"(ASR {n_asr}, TTS {100 - n_asr}); skipped 0")
    same, _ = cross_modal(tmp_path, asr_prob=0.3, seed=4, dedup=False, prefix="SYS", asr_templates=["Write it."],
                          **files)
    assert lines == same

    (tmp_path / "bad.jsonl").write_text('{"units": [1], "text": "a"}\n{"units": [1], "text": ""}\n')
    run = cli("speechgpt", "build-cross-modal", "--manifest", tmp_path / "bad.jsonl", "--out", tmp_path / "b.jsonl",
              check=False)
    assert run.returncode == 1 and not (tmp_path / "b.jsonl").exists()
    assert run.stderr.strip().endswith(f"speechgpt build-cross-modal: error: {tmp_path / 'bad.jsonl'}:2: "
                                       f"field 'text': empty transcript (expected some text)")
    run = cli("speechgpt", "build-cross-modal", "--manifest", tmp_path / "bad.jsonl", "--out", tmp_path / "b.jsonl",
              "--skip-bad")
    assert re.fullmatch(r"wrote \S+/b.jsonl: 1 examples from 2 pairs read \(ASR [01], TTS [01]\); skipped 1 "
                        r"\(empty transcript: 1\)", run.stdout.strip())
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 1


def test_build_com_end_to_end(cli, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", com_records(50) + [{"text_i": "q", "text_r": "a"}])
    run = cli("speechgpt", "build-com", "--manifest", tmp_path / "in.jsonl", "--out", tmp_path / "com.jsonl",
              "--mix", "s2s=1,s2t=1", "--num-units", K, "--no-progress")
    lines = [json.loads(x) for x in (tmp_path / "com.jsonl").read_text().splitlines()]
    shares = Counter(format_of(x["plain_text"]) for x in lines)
    assert len(lines) == 50 and set(shares) == {"s2s", "s2t"}
    assert run.stdout.strip() == (f"wrote {tmp_path / 'com.jsonl'}: 50 examples from 51 records read (s2s "
                                  f"{shares['s2s']}, s2t {shares['s2t']}, t2s 0, t2t 0, t2t_restated 0); skipped 1 "
                                  f"(no selected format fits its fields: 1)")
    run = cli("speechgpt", "build-com", "--manifest", tmp_path / "in.jsonl", "--out", tmp_path / "x.jsonl",
              "--mix", "s2s=1,q=2", check=False)
    assert run.returncode == 1 and "'q=2': expected FORMAT=WEIGHT" in run.stderr


def test_build_com_reads_units_from_aligned_files(tmp_path):
    records = com_records(6)
    write_jsonl(tmp_path / "with_units.jsonl", records)
    texts = [{"text_i": r["text_i"], "text_r": r["text_r"]} for r in records]
    (tmp_path / "texts.jsonl").write_text(
        "".join(json.dumps(t) + "\n" + ("\n" if i == 2 else "") for i, t in enumerate(texts)))  # line 4 is empty
    def line(units):  # com_records gives unit strings, k-means label lines or lists
        return units if isinstance(units, str) else " ".join(map(str, units))

    lines_i, lines_r = [line(r["units_i"]) for r in records], [line(r["units_r"]) for r in records]
    lines_i.insert(3, ""), lines_r.insert(3, "")  # the units files keep the manifest's line numbers
    (tmp_path / "q.km").write_text("\n".join(lines_i) + "\n")
    (tmp_path / "a.km").write_text("\n".join(lines_r) + "\n")
    build_com(tmp_path / "with_units.jsonl", tmp_path / "expected.jsonl", mix="s2s=1", num_units=K)
    build_com(tmp_path / "texts.jsonl", tmp_path / "aligned.jsonl", mix="s2s=1", num_units=K,
              units_i=tmp_path / "q.km", units_r=tmp_path / "a.km")
    assert (tmp_path / "aligned.jsonl").read_text() == (tmp_path / "expected.jsonl").read_text()

    (tmp_path / "short.km").write_text("\n".join(lines_i[:4]) + "\n")
    with pytest.raises(BuildError, match=r"short.km: has 4 lines, \S+texts.jsonl has more"):
        build_com(tmp_path / "texts.jsonl", tmp_path / "x.jsonl", mix="s2s=1", num_units=K,
                  units_i=tmp_path / "short.km", units_r=tmp_path / "a.km")
    (tmp_path / "long.km").write_text("\n".join(lines_i + ["1 2"]) + "\n")
    with pytest.raises(BuildError, match=r"long.km: has more lines than \S+texts.jsonl \(7\)"):
        build_com(tmp_path / "texts.jsonl", tmp_path / "x.jsonl", mix="s2s=1", num_units=K,
                  units_i=tmp_path / "long.km", units_r=tmp_path / "a.km")
    assert not (tmp_path / "x.jsonl").exists()


# ---- text instructions ---------------------------------------------------------------------------------------

def test_text_instructions_are_stage_two_exchanges_without_speech(tmp_path):
    records = [{"instruction": "where does anna live", "output": "anna lives in rome"},
               {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
               {"instruction": "Name a colour.", "input": "", "output": "red"}]  # Alpaca writes "" for no input
    stats = build_text_instructions(write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl",
                                    show_progress=False, prefix="SYS ")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["plain_text"] for x in lines] == [
        "[Human]: where does anna live<eoh> [SpeechGPT]: anna lives in rome<eoa>",
        "[Human]: Translate to French. This is input: good morning<eoh> [SpeechGPT]: bonjour<eoa>",
        "[Human]: Name a colour.<eoh> [SpeechGPT]: red<eoa>"]
    assert {x["prefix"] for x in lines} == {"SYS "} and stats.written == {"text": 3}
    assert parse_response(split_turn(lines[0]["plain_text"])[1]) == {"text": "anna lives in rome"}


def test_bad_text_instructions_are_named_or_counted(cli, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": " "},
                                        {"instruction": "q3"}])
    run = cli("speechgpt", "build-text-instructions", "--manifest", tmp_path / "in.jsonl", "--out",
              tmp_path / "out.jsonl", check=False)
    assert run.returncode == 1 and f"{tmp_path / 'in.jsonl'}:2: field 'output': empty output" in run.stderr
    assert not (tmp_path / "out.jsonl").exists()
    run = cli("speechgpt", "build-text-instructions", "--manifest", tmp_path / "in.jsonl", "--out",
              tmp_path / "out.jsonl", "--skip-bad", "--no-progress")
    assert run.stdout.strip() == (f"wrote {tmp_path / 'out.jsonl'}: 1 examples from 3 records read (text 1); "
                                  f"skipped 2 (empty output: 1, missing field: 1)")
