"""Stages 2/3 with fairseq's tools: training with per-modality metrics, mixing, packing, and evaluation with
fairseq-generate + speechgpt score."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[2]
QUICK = ["common.log_interval=1", "common.seed=3", "dataset.max_tokens=2048"]


@pytest.fixture(scope="module")
def sft_data():
    """The shipped stage-2 data: ASR/TTS instructions built from the bundled corpus."""
    return REPO / "examples" / "stage2" / "data-bin"


def train(cli, cwd, data, *overrides, check=True):
    return cli("fairseq-hydra-train", "--config-dir", REPO / "examples" / "stage2", "--config-name", "tiny",
               f"task.data={data}", *QUICK, *overrides, cwd=cwd, check=check)


def valid_line(log: str) -> str:
    return [line for line in log.splitlines() if "valid on 'valid' subset" in line][-1]


@pytest.fixture(scope="module")
def trained(cli, sft_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    run = train(cli, cwd, sft_data, "optimization.max_update=30", "dataset.validate_interval_updates=30")
    return cwd / "checkpoints" / "stage2-tiny" / "checkpoint_last.pt", run.stdout + run.stderr


def test_training_logs_text_and_unit_metrics(trained):
    _, log = trained
    line = valid_line(log)
    for metric in ("text_loss", "text_acc", "text_ppl", "unit_loss", "unit_acc", "unit_ppl", "nll_loss"):
        assert re.search(rf"\b{metric} [0-9.]+", line), metric


@pytest.fixture(scope="module")
def system_prefixed_data(sft_data, tmp_path_factory):
    """A small stage-2 data directory (the shipped vocabulary) whose examples all have a system prefix, so that
    each loss policy counts a different number of tokens."""
    from speechgpt_fairseq.data.instructions import prepare_instructions
    from speechgpt_fairseq.data.prompts import cross_modal
    from speechgpt_fairseq.data.vocabulary import Vocabulary

    root = tmp_path_factory.mktemp("prefixed")
    for split, n in (("train", 24), ("valid", 12)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                units = "".join(f"<{(i * 7 + k) % 100}>" for k in range(3 + i % 5))
                f.write(json.dumps({"prefix": "You are a helpful assistant.\n",
                                    "plain_text": cross_modal("Transcribe it.", f"<sosp>{units}<eosp>",
                                                              f"the red cup {i}")}) + "\n")
    out = root / "data-bin"
    prepare_instructions({s: root / f"{s}.jsonl" for s in ("train", "valid")}, out, Vocabulary.load(sft_data),
                         show_progress=False)
    return out


def test_loss_policy_sets_what_is_counted(cli, system_prefixed_data, tmp_path):
    """Validation counts, under each task.loss_policy, exactly the targets in the segments it names (the valid
    split is one batch, so wpb is their number): the response; the prompt and the response; every token."""
    from fairseq.data import MMapIndexedDataset

    from speechgpt_fairseq.data.instructions import PROMPT, RESPONSE, SYSTEM

    segments = MMapIndexedDataset(str(system_prefixed_data / "valid.seg"))
    expected = {policy: sum(int(sum(seg[1:] == s for s in counted).sum()) for seg in segments)
                for policy, counted in (("response", [RESPONSE]), ("prefix", [PROMPT, RESPONSE]),
                                        ("all", [SYSTEM, PROMPT, RESPONSE]))}
    assert expected["response"] < expected["prefix"] < expected["all"]
    for policy in expected:
        (tmp_path / policy).mkdir()
        run = train(cli, tmp_path / policy, system_prefixed_data, f"task.loss_policy={policy}",
                    "optimization.max_update=1", "dataset.validate_interval_updates=1", "checkpoint.no_save=true")
        line = valid_line(run.stdout + run.stderr)
        assert re.search(r"\| bsz 12\b", line), line
        assert float(re.search(r"\| wpb ([0-9.]+)", line).group(1)) == expected[policy], policy


MIX = "train:1.0,valid:2.0"


def test_mix_and_pack_train(cli, sft_data, tmp_path):
    """task.mix and task.pack as fairseq-hydra-train loads them: every train example once and twice as many valid
    examples as there are, packed into rows no longer than tokens_per_sample; training runs on those rows."""
    from omegaconf import OmegaConf

    from speechgpt_fairseq.tasks.instruction import CrossModalSFTConfig, CrossModalSFTTask

    def task(mix="", pack=False):
        return CrossModalSFTTask.setup_task(OmegaConf.structured(CrossModalSFTConfig(
            data=str(sft_data), tokens_per_sample=512, mix=mix, pack=pack, seed=3)))

    plain = task()
    for split in ("train", "valid"):
        plain.load_dataset(split)
    train_set, valid_set = plain.datasets["train"], plain.datasets["valid"]
    mixed = task(MIX, pack=True)
    mixed.load_dataset("train")
    rows = mixed.datasets["train"]
    examples = rows.examples  # what the rows pack: train, then the valid examples drawn twice over
    assert len(examples) == len(train_set) + 2 * len(valid_set)
    assert sorted(int(i) for row in rows.rows for i in row) == list(range(len(examples)))
    assert rows.sizes.max() <= 512 and rows.sizes.sum() == examples.sizes.sum()
    for i in range(len(train_set)):
        assert torch.equal(examples[i]["reference"], train_set[i]["reference"])
    for i in range(len(train_set), len(examples)):
        drawn = examples[i]
        assert torch.equal(drawn["reference"], valid_set[drawn["id"]]["reference"])

    run = train(cli, tmp_path, sft_data, f"task.mix='{MIX}'", "task.pack=true",
                "optimization.max_update=3", "dataset.validate_interval_updates=3", "checkpoint.no_save=true")
    log = run.stdout + run.stderr
    assert f"train: {len(rows)} samples, {int(rows.sizes.sum())} tokens" in log  # the rows checked above
    assert valid_line(log)


@pytest.fixture(scope="module")
def chain_data(sft_data, tmp_path_factory):
    """Chain-of-modality sources in the shipped vocabulary, questions spoken: `spoken` (s2s: a transcript, a text
    answer and a spoken answer) and `written` (s2t: the answer in text, the only <sosp> in the question)."""
    from speechgpt_fairseq.data.instructions import prepare_instructions
    from speechgpt_fairseq.data.prompts import chain_of_modality
    from speechgpt_fairseq.data.vocabulary import Vocabulary

    root = tmp_path_factory.mktemp("chain")
    for name, fmt in (("spoken", "s2s"), ("written", "s2t")):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(6):
                units = [(i * 7 + k) % 100 for k in range(3 + i)]
                f.write(json.dumps({"prefix": "", "plain_text": chain_of_modality(
                    fmt, f"where is cup {i}", f"cup {i} is red", units, units[::-1])}) + "\n")
    out = root / "data-bin"
    prepare_instructions({name: root / f"{name}.jsonl" for name in ("spoken", "written")}, out,
                         Vocabulary.load(sft_data), show_progress=False)
    return out


def chain_task(data, mix):
    from omegaconf import OmegaConf

    from speechgpt_fairseq.tasks.instruction import CoMSFTConfig, CoMSFTTask

    task = CoMSFTTask.setup_task(OmegaConf.structured(CoMSFTConfig(data=str(data), mix=mix, seed=3)))
    task.load_dataset("train")
    return task


def test_a_source_with_speech_loss_learns_only_its_spoken_answers(chain_data):
    """NAME:WEIGHT:speech: the loss covers the response's spoken answer (its last <sosp> to the end), not the
    transcript or the text answer; the other sources keep task.loss_policy."""
    task = chain_task(chain_data, "spoken:1:speech,written:1")
    vocab, pad = task.vocab, task.dictionary.pad()
    examples = task.datasets["train"]
    for i in range(len(examples)):
        example = examples[i]
        learned = vocab.decode([int(t) for t in example["target"] if t != pad]).strip()
        response = vocab.decode(example["reference"][example["prompt_length"]:].tolist()).strip()
        if i < 6:  # spoken: from the answer's <sosp>, which follows the text answer
            assert response.startswith(f"where is cup {i}; [ta] cup {i} is red; [ua]")
            assert learned.startswith("<sosp>") and learned.endswith("<eoa>.")
            assert response.endswith(learned) and "cup" not in learned
        else:  # written: the whole response, as loss_policy=response
            assert learned == response == f"where is cup {i - 6}; [ta] cup {i - 6} is red<eoa>."
    whole = chain_task(chain_data, "spoken:1:response").datasets["train"][0]
    assert "cup 0 is red" in vocab.decode([int(t) for t in whole["target"] if t != pad])


def test_a_source_with_answer_loss_learns_from_its_text_answer(chain_data):
    """NAME:WEIGHT:answer: the loss starts at the response's [ta] (the text answer and a spoken answer after it),
    not at the transcript before it."""
    task = chain_task(chain_data, "spoken:1:answer,written:1:answer")
    vocab, pad = task.vocab, task.dictionary.pad()
    examples = task.datasets["train"]
    for i in range(len(examples)):
        example, cup = examples[i], i % 6
        learned = vocab.decode([int(t) for t in example["target"] if t != pad]).strip()
        response = vocab.decode(example["reference"][example["prompt_length"]:].tolist()).strip()
        assert response.startswith(f"where is cup {cup}; ") and response.endswith(learned)
        if i < 6:  # spoken
            assert learned.startswith(f"[ta] cup {cup} is red; [ua] <sosp>") and learned.endswith("<eosp><eoa>.")
        else:  # written
            assert learned == f"[ta] cup {cup} is red<eoa>."


@pytest.mark.parametrize("mix, message", [
    ("written:1:speech", r"chain\d*/data-bin: written: example 0 has no spoken answer"),
    ("spoken:1:voice", r"'spoken:1:voice': loss 'voice' is none of response, prefix, all, speech, answer"),
    ("spoken:1:speech:x", r"'spoken:1:speech:x' is not NAME:WEIGHT or NAME:WEIGHT:LOSS"),
    ("spoken:0", r"weight of 'spoken' must be positive \(to train without 'spoken', leave it out of the mix\)"),
])
def test_bad_mix_entries_are_named(chain_data, mix, message):
    from speechgpt_fairseq.errors import InputError

    with pytest.raises(InputError, match=message):
        chain_task(chain_data, mix).datasets["train"][0]


def generate(cli, data, ckpt, cwd, batch_size):
    return cli("fairseq-generate", data, "--user-dir", REPO / "user_dir", "--task", "cross_modal_sft",
               "--path", ckpt, "--gen-subset", "test", "--beam", "1", "--max-len-a", "1", "--max-len-b", "60",
               "--batch-size", batch_size, "--scoring", "wer", "--wer-lowercase", "--wer-remove-punct",
               cwd=cwd).stdout


@pytest.fixture(scope="module")
def generated(cli, sft_data, trained, tmp_path_factory) -> str:
    """fairseq-generate's output on the 50 test examples, in batches of 8."""
    return generate(cli, sft_data, trained[0], tmp_path_factory.mktemp("gen"), 8)


def test_generate_batched_equals_one_by_one_and_scores(cli, sft_data, trained, generated, tmp_path):
    ckpt, _ = trained
    batched = generated
    single = generate(cli, sft_data, ckpt, tmp_path, 1)

    def hyps(out):  # ids and texts
        return sorted((line.split("\t")[0], line.split("\t")[-1]) for line in out.splitlines()
                      if line.startswith(("H-", "T-", "S-")))

    def scores(out):  # id -> the hypothesis' score, then its positional scores (P- lines)
        rows = [line.split("\t") for line in out.splitlines() if line.startswith(("H-", "P-"))]
        return {f[0][2:]: [float(f[1])] for f in rows if f[0][0] == "H"} | \
            {f[0][2:] + "P": [float(x) for x in f[1].split()] for f in rows if f[0][0] == "P"}

    assert hyps(batched) == hyps(single) and len([h for h, _ in hyps(batched) if h.startswith("H-")]) == 50
    one_by_one, in_batches = scores(single), scores(batched)
    assert one_by_one.keys() == in_batches.keys() and len(one_by_one) == 100
    for key, values in one_by_one.items():  # equal up to float rounding between batch shapes
        assert in_batches[key] == pytest.approx(values, abs=2e-4), key
    assert re.search(r"WER: [0-9.]+", batched)  # fairseq's own scorer reads the D-/T- lines
    prompts = [line.split("\t")[1] for line in batched.splitlines() if line.startswith("S-")]
    assert all(p.endswith("[SpeechGPT]:") for p in prompts)  # the prompt, cut at the assistant turn
    (tmp_path / "gen.txt").write_text(batched)
    summary = json.loads(cli("speechgpt", "score", tmp_path / "gen.txt", "--out", tmp_path / "parsed.jsonl").stdout)
    assert summary["examples"] == 50
    assert summary["text_wer"]["n"] + summary["units_uer"]["n"] == 50
    rows = [json.loads(line) for line in (tmp_path / "parsed.jsonl").read_text().splitlines()]
    assert all(("text_wer" in r) != ("units_uer" in r) for r in rows)


def test_python_api_generates_what_fairseq_generate_does(trained, generated):
    from speechgpt_fairseq.inference import SpeechGPTGenerator
    from speechgpt_fairseq.models.generation import SPEECHGPT_SAMPLING

    ckpt, _ = trained
    out = generated
    prompts = {int(line.split("\t")[0][2:]): line.split("\t")[1] for line in out.splitlines() if line.startswith("S-")}
    expected = {int(line.split("\t")[0][2:]): line.split("\t")[2] for line in out.splitlines() if line.startswith("D-")}
    model = SpeechGPTGenerator.from_checkpoint(ckpt)
    ids = sorted(prompts)[:5]
    # fairseq-generate's limit --max-len-a 1 --max-len-b 60 allows 61 tokens after the prompt, then </s>
    responses = model.generate([prompts[i] for i in ids], max_new_tokens=61)
    for i, response in zip(ids, responses):
        assert response.removesuffix("<eoa>").strip() == expected[i]
    # a seeded sample: the same again, and the same when the prompt is batched after another one
    a = model.generate([prompts[ids[0]]], max_new_tokens=20, decoding=SPEECHGPT_SAMPLING, seed=5)
    b = model.generate([prompts[ids[1]], prompts[ids[0]]], max_new_tokens=20, decoding=SPEECHGPT_SAMPLING, seed=5)
    assert a == model.generate([prompts[ids[0]]], max_new_tokens=20, decoding=SPEECHGPT_SAMPLING, seed=5)
    assert b[1] == a[0]


def test_stage3_lora_on_the_stage2_checkpoint(cli, trained, tmp_path):
    """The tiny pipeline as the READMEs run it: stage 3 LoRA adapters on the stage-2 checkpoint of the same
    directory; adapter-only checkpoints; export-hf merges them into a model transformers loads."""
    import torch
    from transformers import LlamaForCausalLM

    ckpt, _ = trained
    cwd = ckpt.parents[2]
    run = cli("fairseq-hydra-train", "--config-dir", REPO / "examples" / "stage3", "--config-name", "tiny_lora",
              *QUICK, "optimization.max_update=3", "dataset.validate_interval_updates=3", cwd=cwd)
    assert "text_acc" in valid_line(run.stdout + run.stderr)
    adapters = cwd / "checkpoints" / "stage3-tiny-lora" / "checkpoint_last.pt"
    state = torch.load(adapters, weights_only=True)["model"]
    assert state and all("lora_" in k or k.endswith("vocab_digest") for k in state)
    cli("speechgpt", "export-hf", adapters, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == 1106


def test_resuming_another_models_checkpoint_is_refused_naming_it(cli, sft_data, trained, tmp_path):
    """A LoRA run started in a save_dir that holds a full fine-tuning's checkpoint_last resumes it: the weights load
    (a plain checkpoint fits a LoRA model) but the optimizer state is for other parameters. The error names the
    file and what to do, not torch's "parameter group" message; the checkpoint is left as it was."""
    ckpt, _ = trained
    last = tmp_path / "checkpoints" / "stage2-tiny" / "checkpoint_last.pt"
    last.parent.mkdir(parents=True)
    shutil.copy(ckpt, last)
    before = last.read_bytes()
    run = train(cli, tmp_path, sft_data, "model.lora_rank=4", "optimization.max_update=31", check=False)
    assert run.returncode != 0
    error = [line for line in run.stderr.splitlines() if re.match(r"^[\w.]+Error: ", line)][-1]
    assert error.startswith(f"speechgpt_fairseq.errors.InputError: {last}: its optimizer state is for other "
                            f"trainable parameters than this model's")
    assert "checkpoint.finetune_from_model" in error
    assert last.read_bytes() == before


def test_round_trip_transcribes_spoken_answers_with_the_models_asr(cli, trained, tmp_path):
    """speechgpt round-trip: each generated spoken answer goes through the model's ASR instruction (greedy, as the
    Python API generates it) and is scored against the text answer of the same response; no spoken answer is an
    empty transcript."""
    import editdistance

    from speechgpt_fairseq.data.prompts import instruction_prompt, strip_answer_end
    from speechgpt_fairseq.inference import SpeechGPTGenerator
    from speechgpt_fairseq.speech.units import format_unit_string

    ckpt, _ = trained
    units = [[int(u) for u in line.split()] for line in (REPO / "examples" / "corpus" / "test.km").read_text()
             .splitlines()[:3]]
    answers = ["the red cup is on the table", "seven plus two is nine", "no answer spoken"]
    lines = []
    for i, (u, text) in enumerate(zip(units, answers)):
        spoken = f"; [ua] {format_unit_string(u)}" if i < 2 else ""
        lines += [f"S-{i}\t[Human]: q{i}<eoh>. [SpeechGPT]:", f"T-{i}\tq{i}; [ta] {answers[0]}; [ua] <sosp><1><eosp>",
                  f"H-{i}\t-0.5\tq{i}; [ta] {text}{spoken}", f"D-{i}\t-0.5\tq{i}; [ta] {text}{spoken}"]
    (tmp_path / "gen.txt").write_text("\n".join(lines) + "\n")
    summary = json.loads(cli("speechgpt", "round-trip", tmp_path / "gen.txt", "--model", ckpt, "--instruction",
                             "Write down what is said.", "--out", tmp_path / "rows.jsonl", "--batch-size", "2",
                             "--no-progress").stdout)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    model = SpeechGPTGenerator.from_checkpoint(ckpt)
    heard = [strip_answer_end(model.generate([instruction_prompt("Write down what is said.", format_unit_string(u))],
                                             max_new_tokens=64)[0]) for u in units[:2]] + [""]
    assert [r["transcript"] for r in rows] == heard
    errors = [editdistance.eval(a.split(), re.sub(r"[^\w\s]", " ", h.lower()).split()) for a, h in zip(answers, heard)]
    assert rows[2]["roundtrip_wer"] == 1.0 and rows[2]["units_r"] == 0
    assert summary["roundtrip_wer"] == {"n": 3, "rate": round(100 * sum(errors) / sum(len(a.split()) for a in answers),
                                                              2)}
    assert summary["roundtrip_reference_wer"]["n"] == 3
    # --of reference: the references' spoken answers (<1> in each), against the reference answer
    cli("speechgpt", "round-trip", tmp_path / "gen.txt", "--model", ckpt, "--instruction", "Write down what is said.",
        "--of", "reference", "--out", tmp_path / "ref.jsonl", "--no-progress")
    rows = [json.loads(line) for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    heard = strip_answer_end(model.generate([instruction_prompt("Write down what is said.", "<sosp><1><eosp>")],
                                            max_new_tokens=64)[0])
    assert [(r["transcript"], r["units_r"]) for r in rows] == [(heard, 1)] * 3
    assert len({r["roundtrip_wer"] for r in rows}) == 1


def test_examples_longer_than_the_task_allows_are_refused_when_the_split_loads():
    """Not at the first validation, after a training interval: when fairseq loads the split, before training."""
    from fairseq.tasks import TASK_REGISTRY

    from speechgpt_fairseq.tasks.base import TaskDataError
    from speechgpt_fairseq.tasks.instruction import CrossModalSFTConfig

    data = REPO / "examples" / "stage2" / "data-bin"
    task = TASK_REGISTRY["cross_modal_sft"].setup_task(CrossModalSFTConfig(data=str(data), tokens_per_sample=40))
    with pytest.raises(TaskDataError, match=rf"{data}: split valid: \d+ of \d+ examples are longer than "
                                            rf"task.tokens_per_sample=40 \(the longest has \d+ tokens\): raise"):
        task.load_dataset("valid")
    TASK_REGISTRY["cross_modal_sft"].setup_task(CrossModalSFTConfig(data=str(data), tokens_per_sample=512)
                                                ).load_dataset("valid")
