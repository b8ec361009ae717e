"""The command-line surface and the registered names are frozen here: a rename is a deliberate change."""
from pathlib import Path

import pytest

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.cli.main import VERBS, build_parser


def test_verbs():
    assert sorted(VERBS) == ["build-com", "build-cross-modal", "build-text-instructions", "chat", "convert-hf", "demo",
                             "export-hf", "fit-exemplar-vocoder", "import-peft", "learn-kmeans", "make-corpus",
                             "prepare-sft", "prepare-units", "round-trip", "score", "speech2unit", "t2u-export",
                             "t2u-import", "unit2speech"]


def test_registered_fairseq_names():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.dataclass.constants import DDP_BACKEND_CHOICES
    from fairseq.models import MODEL_REGISTRY
    from fairseq.optim import OPTIMIZER_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    assert TASK_REGISTRY["unit_lm"].__name__ == "UnitLMTask"
    assert TASK_REGISTRY["cross_modal_sft"].__name__ == "CrossModalSFTTask"
    assert TASK_REGISTRY["com_sft"].__name__ == "CoMSFTTask"
    assert MODEL_REGISTRY["speechgpt_llama"].__name__ == "SpeechGPTLlamaModel"
    assert CRITERION_REGISTRY["speechgpt_cross_entropy"].__name__ == "SpeechGPTCrossEntropyCriterion"
    assert "speechgpt_adamw" in OPTIMIZER_REGISTRY and "fsdp2" in DDP_BACKEND_CHOICES._member_map_


@pytest.mark.parametrize("verb,options", [
    ("build-com", {"--manifest", "--units-i", "--units-r", "--mix", "--out", "--seed", "--dedup", "--no-dedup", "--prefix", "--num-units",
                   "--skip-bad", "--no-progress"}),
    ("build-cross-modal", {"--units", "--text", "--manifest", "--asr-prob", "--asr-templates", "--tts-templates",
                           "--out", "--seed", "--dedup", "--no-dedup", "--prefix", "--num-units", "--skip-bad",
                           "--no-progress"}),
    ("build-text-instructions", {"--manifest", "--out", "--prefix", "--skip-bad", "--no-progress"}),
    ("convert-hf", {"--num-units", "--overwrite"}),
    ("export-hf", {"--max-shard-size", "--overwrite"}),
    ("import-peft", {"--adapter", "--merge", "--overwrite"}),
    ("learn-kmeans", {"--hubert", "--layer", "--max-chunk", "--max-batch-samples", "--device", "--bf16", "--skip-bad",
                      "--overwrite", "--no-progress", "--out", "--n-clusters", "--percent", "--seed", "--init",
                      "--max-iter", "--batch-size", "--tol", "--max-no-improvement", "--n-init",
                      "--reassignment-ratio", "--mfcc-average"}),
    ("prepare-units", {"--out", "--overwrite", "--vocab", "--num-units", "--open", "--dedup", "--no-dedup",
                       "--no-progress"}),
    ("prepare-sft", {"--out", "--overwrite", "--vocab", "--num-units", "--skip-bad", "--no-progress"}),
    ("score", {"--out", "--summary", "--keep-case", "--keep-punct"}),
    ("round-trip", {"--out", "--summary", "--keep-case", "--keep-punct", "--model", "--instruction", "--of",
                    "--batch-size", "--max-new-tokens", "--device", "--no-progress"}),
    ("chat", {"--model", "--message", "--kmeans", "--hubert", "--layer", "--vocoder", "--vocoder-config", "--speaker",
              "--out", "--text-only", "--prompt", "--system", "--system-file", "--system-from", "--greedy",
              "--temperature", "--top-k", "--top-p", "--seed", "--max-new-tokens", "--min-new-tokens", "--device",
              "--bf16", "--json", "--multi-turn"}),
    ("demo", {"--out", "--hubert", "--layer", "--mfcc-average", "--quick", "--config-dir", "--workers"}),
    ("make-corpus", {"--out", "--sentences", "--renditions", "--vocab-size", "--seed", "--workers", "--overwrite",
                     "--no-progress"}),
    ("fit-exemplar-vocoder", {"--kmeans", "--hubert", "--layer", "--max-files", "--out", "--no-progress"}),
    ("speech2unit", {"--hubert", "--layer", "--max-chunk", "--max-batch-samples", "--device", "--bf16", "--skip-bad",
                     "--overwrite", "--no-progress", "--kmeans", "--out", "--split", "--each", "--dedup", "--no-dedup",
                     "--durations", "--shard", "--nshard"}),
    ("t2u-export", {"--text", "--units", "--out", "--dedup", "--no-dedup", "--keep-case", "--num-units", "--skip-bad",
                    "--no-progress"}),
    ("t2u-import", {"--out", "--format", "--source", "--dedup"}),
    ("unit2speech", {"--units", "--vocoder", "--vocoder-config", "--out", "--ids", "--speaker", "--dur-prediction",
                     "--no-dur-prediction", "--device", "--skip-bad", "--no-progress"}),
])
def test_verb_options(verb, options):
    sub = build_parser()._subparsers._group_actions[0].choices[verb]
    assert {s for a in sub._actions for s in a.option_strings if s.startswith("--")} - {"--help"} == options
    assert sub.description  # every verb is documented in its --help


def test_help_lists_every_verb(cli):
    out = cli("speechgpt", "--help").stdout
    for verb in VERBS:
        assert verb in out


def test_errors_go_to_stderr_with_status_1(cli, tmp_path):
    run = cli("speechgpt", "convert-hf", tmp_path / "missing", tmp_path / "out", check=False)
    assert run.returncode == 1
    assert run.stderr.strip().endswith(f"speechgpt convert-hf: error: {tmp_path / 'missing'}: no such directory "
                                       f"(expected a Hugging Face LlamaForCausalLM directory)")
    run = cli("speechgpt", "prepare-units", "train", "--out", tmp_path / "o", check=False)
    assert run.returncode == 1 and "'train': expected SPLIT=FILE" in run.stderr


def test_user_dir_shim_registers_everything(cli, tmp_path):
    from pathlib import Path

    user_dir = Path(__file__).resolve().parents[2] / "user_dir"
    code = ("import argparse; from fairseq import utils; "
            f"utils.import_user_module(argparse.Namespace(user_dir={str(user_dir)!r})); "
            "from fairseq.tasks import TASK_REGISTRY; print('unit_lm' in TASK_REGISTRY)")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip().endswith("True"), out.stderr


# every writer: an --out that cannot be written is a one-line error before anything is read (the inputs named here
# do not exist, so a verb that read first would report them instead)
DIR_WRITERS = {
    "prepare-units": ["prepare-units", "train=missing.km", "--vocab", "missing-vocab", "--out", "OUT"],
    "prepare-sft": ["prepare-sft", "train=missing.jsonl", "--vocab", "missing-vocab", "--out", "OUT"],
    "convert-hf": ["convert-hf", "missing-hf", "OUT"],
    "export-hf": ["export-hf", "missing.pt", "OUT"],
    "import-peft": ["import-peft", "missing-base", "OUT", "--adapter", "missing-adapter"],
    "t2u-export": ["t2u-export", "--text", "train=missing.wrd", "--out", "OUT"],
    "speech2unit": ["speech2unit", "missing.tsv", "--kmeans", "missing.bin", "--out", "OUT"],
    "unit2speech": ["unit2speech", "missing.units", "--vocoder", "missing.pt", "--vocoder-config", "missing.json",
                    "--out", "OUT"],
}
FILE_WRITERS = {
    "build-cross-modal": ["build-cross-modal", "--units", "missing.km", "--text", "missing.wrd", "--out", "OUT"],
    "build-com": ["build-com", "--manifest", "missing.jsonl", "--out", "OUT"],
    "build-text-instructions": ["build-text-instructions", "--manifest", "missing.jsonl", "--out", "OUT"],
    "learn-kmeans": ["learn-kmeans", "missing.tsv", "--n-clusters", "2", "--out", "OUT"],
    "fit-exemplar-vocoder": ["fit-exemplar-vocoder", "missing.tsv", "--kmeans", "missing.bin", "--out", "OUT"],
    "t2u-import": ["t2u-import", "missing-generate.txt", "--out", "OUT"],
    "score": ["score", "missing-generate.txt", "--out", "OUT"],
}
UNWRITABLE = Path("/proc/speechgpt-test-nowhere")  # creating anything there fails, for root too (chmod does not)


OUT_CASES = [*((verb, where) for verb in DIR_WRITERS for where in ("under a file", "unwritable", "a file")),
             *((verb, where) for verb in FILE_WRITERS for where in ("under a file", "unwritable", "a directory"))]


@pytest.mark.parametrize("verb,where", OUT_CASES)
def test_an_out_that_cannot_be_written_is_refused_before_any_work(verb, where, tmp_path, monkeypatch, speechgpt_main):
    monkeypatch.chdir(tmp_path)
    argv = {**DIR_WRITERS, **FILE_WRITERS}[verb]
    if verb == "fit-exemplar-vocoder":
        argv = [a if a != "OUT" else "OUT.npz" for a in argv]
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dir").mkdir()
    name = "OUT.npz" if verb == "fit-exemplar-vocoder" else "OUT"
    if where == "under a file":
        out = tmp_path / "file" / name
        message = f"{out}: cannot be created, {tmp_path / 'file'} is a file"
    elif where == "unwritable":
        out, message = UNWRITABLE / name, f"{UNWRITABLE / name}: cannot be written, /proc: No such file or directory"
    elif where == "a file":
        out, message = tmp_path / "file", f"{tmp_path / 'file'}: exists and is not a directory"
    else:
        out, message = tmp_path / "dir" / name, f"{tmp_path / 'dir' / name}: is a directory (expected a file name)"
        out.mkdir()
    argv = [str(out) if a == name else a for a in argv]
    assert speechgpt_main(argv) == (1, f"speechgpt {verb}: error: {message}")
    assert (tmp_path / "file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ([name] if where == "a directory" else [])


@pytest.mark.parametrize("verb,option,value", [
    ("prepare-units", "--num-units", "0"), ("prepare-sft", "--num-units", "-5"),
    ("build-cross-modal", "--num-units", "0"), ("convert-hf", "--num-units", "0"), ("learn-kmeans", "--n-clusters", "0"),
    ("chat", "--max-new-tokens", "-1"),
    ("make-corpus", "--sentences", "0"), ("build-cross-modal", "--asr-prob", "1.5"),
])
def test_counts_and_probabilities_out_of_range_are_refused_by_the_parser(verb, option, value, capsys, tmp_path,
                                                                        monkeypatch):
    """Not K=0 taken as the default K, nor a clustering library's message: the option and its value."""
    from speechgpt_fairseq.cli.main import main

    monkeypatch.chdir(tmp_path)  # the relative paths below, were a command to run

    args = {"prepare-units": ["train=a.km", "--out", "o"], "build-cross-modal": ["--out", "o.jsonl"],
            "prepare-sft": ["train=a.jsonl", "--out", "o", "--vocab", "v"], "convert-hf": ["hf", "out"],
            "learn-kmeans": ["a.wav", "--out", "k"], "chat": ["--model", "m.pt"], "make-corpus": ["--out", "o"]}[verb]
    values = [value] * 3 if option == "--sentences" else [value]
    with pytest.raises(SystemExit) as e:
        main([verb, *args, option, *values])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"speechgpt {verb}: error: argument {option}: {value!r} is not "
        + ("a probability (a number from 0 to 1)" if option == "--asr-prob" else "a positive whole number"))


@pytest.mark.parametrize("bug", [KeyError, ValueError, IndexError])
def test_a_bug_still_shows_its_traceback(bug, monkeypatch, tmp_path):
    """Bad input is one line; an error that is no verdict on the input (a ValueError from a bug too: only
    InputError and a missing file are verdicts) propagates, traceback and all, so that it is seen and reported."""
    import speechgpt_fairseq.cli.instructions as verb
    from speechgpt_fairseq.cli.main import main

    def broken(path):
        raise bug("a bug")

    monkeypatch.setattr(verb, "read_generate_output", broken)
    with pytest.raises(bug, match="a bug"):
        main(["score", str(tmp_path / "gen.txt")])
