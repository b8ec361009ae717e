"""Scoring generated responses: word error rate for text, unit error rate for speech, per part for
chain-of-modality answers. Reads fairseq-generate's output (T- and D- lines of the instruction tasks)."""
from __future__ import annotations

import os
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field

import editdistance

from speechgpt_fairseq.data.prompts import parse_response
from speechgpt_fairseq.errors import InputError
from speechgpt_fairseq.speech.units import dedup_units
from speechgpt_fairseq.text_files import not_utf8, open_text

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


class GenerateOutputError(InputError):
    """A file that is not fairseq-generate output of an instruction task."""


def read_generate_output(path: str | os.PathLike) -> dict[int, dict[str, str]]:
    """{sample id: {"prompt", "reference", "hypothesis"}} from fairseq-generate's S-/T-/D- lines (first D per id).

    Output that is cut short (a reference without its hypothesis) or that holds two runs (a sample's reference
    twice) is refused: either would score a different set of examples than the split."""
    records: dict[int, dict[str, str]] = defaultdict(dict)
    reference_line: dict[int, int] = {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected the output of fairseq-generate)")
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if bad := not_utf8(line):
                raise GenerateOutputError(f"{path}:{lineno}: {bad}")
            kind, _, rest = line.rstrip("\n").partition("-")
            if kind not in ("S", "T", "D") or "\t" not in rest:
                continue
            key, *fields = rest.split("\t")
            if not key.isdigit():
                continue
            name = {"S": "prompt", "T": "reference", "D": "hypothesis"}[kind]
            if kind == "T":
                if int(key) in reference_line:
                    raise GenerateOutputError(f"{path}:{lineno}: sample {key} again (its reference is also on line "
                                              f"{reference_line[int(key)]}): two generate outputs in one file? Score "
                                              f"each on its own")
                reference_line[int(key)] = lineno
            if kind == "D":
                if len(fields) < 2:
                    raise GenerateOutputError(f"{path}:{lineno}: a D- line needs a score and a text")
                fields = fields[1:]
            records[int(key)].setdefault(name, fields[0] if fields else "")
    unanswered = sorted(k for k, r in records.items() if "reference" in r and "hypothesis" not in r)
    if unanswered:
        more = f" and {len(unanswered) - 1} more" if len(unanswered) > 1 else ""
        raise GenerateOutputError(f"{path}:{reference_line[unanswered[0]]}: sample {unanswered[0]}{more} has a "
                                  f"reference (T-) but no hypothesis (D-): the output is cut short (was "
                                  f"fairseq-generate stopped, or is it still running?)")
    scored = {k: r for k, r in records.items() if "reference" in r and "hypothesis" in r}
    if not scored:
        raise GenerateOutputError(f"{path}: no T-/D- line pairs; expected the output of fairseq-generate on a "
                                  f"cross_modal_sft or com_sft split")
    return dict(sorted(scored.items()))


def words(text: str, lowercase: bool = True, remove_punct: bool = True) -> list[str]:
    if lowercase:
        text = text.lower()
    if remove_punct:
        text = _PUNCT.sub(" ", text)
    return text.split()


@dataclass
class ErrorRate:
    """Edit operations over reference length, accumulated over examples."""

    errors: int = 0
    length: int = 0
    count: int = 0

    def add(self, ref: list, hyp: list) -> float:
        e = editdistance.eval(ref, hyp)
        self.errors, self.length, self.count = self.errors + e, self.length + len(ref), self.count + 1
        return e / max(len(ref), 1)

    @property
    def rate(self) -> float:
        return self.errors / max(self.length, 1)


@dataclass
class Scores:
    rates: dict[str, ErrorRate] = field(default_factory=lambda: defaultdict(ErrorRate))
    exact: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> dict:
        out = {name: {"n": r.count, "rate": round(100 * r.rate, 2)} for name, r in self.rates.items()}
        out.update({f"{name}_exact": {"n": len(v), "share": round(100 * sum(v) / len(v), 2)}
                    for name, v in self.exact.items() if v})
        return out


def score_records(records: dict[int, dict[str, str]], lowercase: bool = True, remove_punct: bool = True,
                  ) -> tuple[list[dict], Scores]:
    """Per-example parts and error rates, and the totals.

    Text parts get WER (words, lowercased and without punctuation by default), unit parts UER (units with
    repeats merged). Chain-of-modality references are scored per part: the transcribed question (text_i),
    the text answer (text_r) and the spoken answer (units_r); the first two also as exact match.
    """
    scores, rows = Scores(), []
    for key, r in records.items():
        ref, hyp = parse_response(r["reference"]), parse_response(r["hypothesis"])
        row = {"id": key, "reference": ref, "hypothesis": hyp}
        for part, metric in (("text", "wer"), ("text_i", "wer"), ("text_r", "wer"), ("units", "uer"),
                             ("units_r", "uer")):
            if part not in ref:
                continue
            if metric == "wer":
                a, b = words(ref[part], lowercase, remove_punct), words(hyp.get(part, ""), lowercase, remove_punct)
            else:
                a, b = dedup_units(ref[part]), dedup_units(hyp.get(part, []))
            row[f"{part}_{metric}"] = round(scores.rates[f"{part}_{metric}"].add(a, b), 4)
            if part in ("text_i", "text_r"):  # the transcribed question and the text answer: right or not
                scores.exact[part].append(a == b)
        rows.append(row)
    return rows, scores


def round_trip(records: dict[int, dict[str, str]], transcribe, lowercase: bool = True, remove_punct: bool = True,
               of: str = "hypothesis") -> tuple[list[dict], Scores]:
    """How intelligible chain-of-modality spoken answers are: each generated spoken answer (units_r) is transcribed
    by `transcribe(list of unit lists) -> texts` (a model's ASR) and compared with the text answer the same
    response gave (`roundtrip` WER; the reference answer where the response has no text answer) and with the
    reference answer (`roundtrip_reference` WER). A response without a spoken answer counts as an empty
    transcript. With `of="reference"` the references' spoken answers are transcribed instead (both WERs then
    against the reference answer): how well the ASR reads the right answer said as the model was taught to say
    it, the round trip's ceiling."""
    if of not in ("hypothesis", "reference"):
        raise ValueError(f"of: 'hypothesis' or 'reference', not {of!r}")
    parsed = {key: (parse_response(r["reference"]), parse_response(r[of])) for key, r in records.items()}
    spoken = [key for key, (_, hyp) in parsed.items() if hyp.get("units_r")]
    heard = dict(zip(spoken, transcribe([parsed[key][1]["units_r"] for key in spoken])))
    scores, rows = Scores(), []
    for key, (ref, hyp) in parsed.items():
        if "text_r" not in ref:
            raise GenerateOutputError(f"example {key}: the reference has no text answer ([ta]); round trips are "
                                      f"measured on chain-of-modality generations")
        text = heard.get(key, "")
        meant = hyp.get("text_r") or ref["text_r"]  # what the speech should say
        row = {"id": key, "transcript": text, "text_r": hyp.get("text_r", ""), "reference": ref["text_r"],
               "units_r": len(hyp.get("units_r", []))}
        said = words(text, lowercase, remove_punct)
        row["roundtrip_wer"] = round(scores.rates["roundtrip_wer"].add(words(meant, lowercase, remove_punct), said), 4)
        row["roundtrip_reference_wer"] = round(scores.rates["roundtrip_reference_wer"].add(
            words(ref["text_r"], lowercase, remove_punct), said), 4)
        rows.append(row)
    return rows, scores
