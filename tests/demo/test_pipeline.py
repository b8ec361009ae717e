"""The demo's runner: every command printed, a log per step, resuming without redoing finished steps, and a
changed step rerun together with the steps after it."""
import sys
from pathlib import Path

import pytest
import yaml

from speechgpt_fairseq.demo.pipeline import DemoError, DemoPipeline, Sizes, Step, find_config_dir


class Scripted(DemoPipeline):
    """The runner with steps of our choosing: each appends its name to a file (python -c)."""

    def __init__(self, out: Path, names: list[str]):
        super().__init__(out, config_dir=out)
        self.names = names

    def steps(self):  # a step fails while a file `fail-NAME` exists
        code = "import os, sys; open(sys.argv[1] + '/ran.txt', 'a').write(sys.argv[2] + '\\n'); " \
               "print('did', sys.argv[2]); sys.exit(os.path.exists(sys.argv[1] + '/fail-' + sys.argv[2]))"
        return [Step(name, [sys.executable, "-c", code, str(self.out), name]) for name in self.names]


def ran(out: Path) -> list[str]:
    return (out / "ran.txt").read_text().split()


def test_runs_prints_and_logs_every_step(tmp_path):
    printed = []
    Scripted(tmp_path, ["a", "b", "c"]).run(log=printed.append)
    assert ran(tmp_path) == ["a", "b", "c"]
    assert [line.split()[0] for line in printed] == ["+"] * 3 and printed[1].endswith(f"{tmp_path} b")
    assert (tmp_path / "logs" / "02-b.log").read_text() == "did b\n"


def test_resumes_and_reruns_what_changed(tmp_path):
    Scripted(tmp_path, ["a", "b", "c"]).run(log=lambda _: None)
    printed = []
    Scripted(tmp_path, ["a", "b", "c"]).run(log=printed.append)
    assert ran(tmp_path) == ["a", "b", "c"] and all(p.startswith("= ") for p in printed)
    Scripted(tmp_path, ["a", "B", "c"]).run(log=lambda _: None)  # b's command changed: b and c run again
    assert ran(tmp_path) == ["a", "b", "c", "B", "c"]


def test_a_failing_step_names_its_command_and_log_and_stops(tmp_path):
    with pytest.raises(DemoError, match=r"step b failed \(1\): .*\n--- the end of .*02-b.log ---\ndid b"):
        (tmp_path / "fail-b").touch()
        Scripted(tmp_path, ["a", "b", "c"]).run(log=lambda _: None)
    assert ran(tmp_path) == ["a", "b"] and not (tmp_path / "logs" / "02-b.done").exists()
    (tmp_path / "fail-b").unlink()
    Scripted(tmp_path, ["a", "b", "c"]).run(log=lambda _: None)  # fixed: goes on from b
    assert ran(tmp_path) == ["a", "b", "b", "c"]


def test_the_demo_steps_are_the_documented_commands(tmp_path):
    steps = DemoPipeline(tmp_path, Sizes(), config_dir=tmp_path).steps()
    programs = {step.argv[0] + (" " + step.argv[1] if step.argv[0] == "speechgpt" else "") for step in steps}
    assert programs == {"speechgpt make-corpus", "speechgpt learn-kmeans", "speechgpt speech2unit",
                        "speechgpt prepare-units", "speechgpt build-cross-modal", "speechgpt build-text-instructions",
                        "speechgpt prepare-sft", "speechgpt build-com", "fairseq-hydra-train", "fairseq-generate",
                        "speechgpt score", "speechgpt round-trip", "speechgpt fit-exemplar-vocoder", "speechgpt chat"}
    assert len({step.name for step in steps}) == len(steps)
    hubert = DemoPipeline(tmp_path, Sizes(), hubert="/m/hubert.pt", config_dir=tmp_path).steps()
    assert all("--hubert" in s.argv for s in hubert if s.argv[1:2] in (["learn-kmeans"], ["speech2unit"]))
    # averaged MFCC frames are asked of learn-kmeans only (the k-means file records them for the later steps):
    # over 9 frames unless told otherwise, and never for HuBERT's units
    def averaging(steps):
        return [(s.argv[1], s.argv[s.argv.index("--mfcc-average") + 1]) for s in steps if "--mfcc-average" in s.argv]
    assert averaging(steps) == [("learn-kmeans", "9")]
    assert averaging(DemoPipeline(tmp_path, Sizes(), config_dir=tmp_path, mfcc_average=7).steps()) == [
        ("learn-kmeans", "7")]
    assert averaging(DemoPipeline(tmp_path, Sizes(), config_dir=tmp_path, mfcc_average=1).steps()) == []
    assert averaging(hubert) == []
    with pytest.raises(DemoError, match="applies to MFCC units"):
        DemoPipeline(tmp_path, Sizes(), hubert="/m/hubert.pt", config_dir=tmp_path, mfcc_average=5)
    # stage 3's known: the knowledge typed and restated, without speech; every source the stage-3 config mixes is
    # in its data
    known = next(s for s in steps if s.name == "stage3-known")
    assert known.argv[known.argv.index("--mix") + 1] == "t2t_restated=1"
    assert known.argv[known.argv.index("--manifest") + 1] == str(tmp_path / "corpus" / "knowledge_com.jsonl")
    assert not {"--units-i", "--units-r"} & set(known.argv)
    data = next(s for s in steps if s.name == "stage3-data")
    mix = yaml.safe_load((find_config_dir() / "stage3.yaml").read_text())["task"]["mix"]
    assert {item.split(":")[0] for item in mix.split(",")} <= {arg.split("=")[0] for arg in data.argv if "=" in arg}
