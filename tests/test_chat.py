"""speechgpt chat and SpokenChat: prompts for text and spoken questions, parsing of the answer, vocoding, the
interactive loop and bad input, on a chain-of-modality model trained here for a few seconds."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechgpt_fairseq.chat import SpokenChat
from speechgpt_fairseq.data.prompts import com_prompt

REPO = Path(__file__).resolve().parents[1]
QUESTION = "how many red bags are in the room"
ASKED = (QUESTION, "what is two plus two", "is zero more than nine", "how many blue pens are in the room")


@pytest.fixture(scope="module")
def com_model(cli, tmp_path_factory) -> Path:
    """The tiny stage-3 config trained from scratch for 150 updates on the shipped chain-of-modality data:
    enough to answer in the right format (text, then units)."""
    cwd = tmp_path_factory.mktemp("com")
    cli("fairseq-hydra-train", "--config-dir", REPO / "examples" / "stage3", "--config-name", "tiny",
        "optimization.max_update=150", "dataset.validate_interval_updates=150",
        "checkpoint.save_interval_updates=150", cwd=cwd)
    return cwd / "checkpoints" / "stage3-tiny" / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def spoken_question(com_model) -> str:
    """A question from the training data that the briefly trained model answers in text and then in units (which
    of them it does depends on its initial weights)."""
    from speechgpt_fairseq.inference import SpeechGPTGenerator

    generator = SpeechGPTGenerator.from_checkpoint(com_model)
    for question in ASKED:
        if "[ua] <sosp><" in generator.generate([com_prompt("t2s", text_i=question)], max_new_tokens=512)[0]:
            return question
    pytest.fail(f"{com_model} answers none of {ASKED} with speech units")


@pytest.fixture(scope="module")
def converted_k100(make_hf_llama, sentencepiece_model, tmp_path_factory) -> Path:
    """A random tiny LLaMA converted with K=100 units: loads in a second, answers nonsense."""
    from speechgpt_fairseq.models.hf import convert_hf

    root = tmp_path_factory.mktemp("k100")
    return convert_hf(make_hf_llama(root / "hf", sentencepiece_model, kv_heads=2), root / "fs",
                      num_units=100) / "checkpoint.pt"


def chat(cli, model, *args, **kwargs):
    return cli("speechgpt", "chat", "--model", model, "--greedy", *args, **kwargs)


def records(run) -> list[dict]:
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


class CannedModel:
    """Stands in for SpeechGPTGenerator: answers every prompt with a fixed response and remembers the prompts."""

    def __init__(self, response: str):
        self.response, self.prompts = response, []

    def generate(self, prompts, **kwargs):
        self.prompts += prompts
        return [self.response] * len(prompts)


def test_spoken_turn_is_transcribed_answered_and_vocoded(tmp_path):
    model = CannedModel("two plus two; [ta] it is four; [ua] <sosp><5><5><9><eosp><eoa>")
    spoken = []
    chat_ = SpokenChat(model, speech_to_units=lambda path: [3, 3, 4, 4, 4, 3],
                       units_to_speech=lambda units: spoken.append(units) or np.ones(7, dtype=np.float32))
    (tmp_path / "q.wav").write_bytes(b"")  # only its name and existence matter to the canned units
    turn = chat_.respond(tmp_path / "q.wav")
    assert model.prompts == [com_prompt("s2s", speech_i=[3, 4, 3])]  # repeats merged, as in training
    assert (turn.transcript, turn.text, turn.units) == ("two plus two", "it is four", [5, 5, 9])
    assert spoken == [[5, 5, 9]] and turn.audio.shape == (7,)
    chat_.respond(str(tmp_path / "q.wav"), speak=False)
    assert model.prompts[-1] == com_prompt("s2t", speech_i=[3, 4, 3])
    chat_.respond("  what is   two plus two ")
    assert model.prompts[-1] == com_prompt("t2s", text_i="what is two plus two")


def test_questions_that_cannot_be_asked():
    chat_ = SpokenChat(CannedModel("[ta] x<eoa>"))
    with pytest.raises(ValueError, match="spoken question needs speech2unit"):
        chat_.respond(Path(__file__))  # an existing file given as a Path is audio
    with pytest.raises(FileNotFoundError, match="missing.wav: no such audio file"):
        chat_.respond("missing.wav")
    with pytest.raises(ValueError, match="empty question"):
        chat_.respond("   ")


def test_text_question_in_text_and_speech(cli, com_model, tiny_vocoder, spoken_question, tmp_path):
    from speechgpt_fairseq.inference import SpeechGPTGenerator
    from speechgpt_fairseq.speech.vocoder import UnitVocoder

    checkpoint, config = tiny_vocoder
    run = chat(cli, com_model, "--message", spoken_question, "--vocoder", checkpoint, "--vocoder-config", config,
               "--speaker", 1, "--out", tmp_path / "answers", "--json")
    (record,) = records(run)
    assert record["prompt"] == com_prompt("t2s", text_i=spoken_question)
    expected = SpeechGPTGenerator.from_checkpoint(com_model).generate([record["prompt"]], max_new_tokens=512)[0]
    assert record["response"] == expected  # the CLI decodes as the Python API does
    assert record["text"] and record["units"], record["response"]
    assert record["wav"] == str(tmp_path / "answers" / "answer-1.wav")
    wav, rate = sf.read(record["wav"], dtype="float32")
    vocoded = UnitVocoder.from_files(checkpoint, config)(record["units"], speaker=1)
    assert rate == 16000 and wav.shape == vocoded.shape
    assert np.abs(wav - np.clip(vocoded, -1, 1)).max() <= 1 / 32768 + 1e-6  # 16-bit PCM of the same waveform


def test_readable_output_and_answers_never_overwritten(cli, com_model, tiny_vocoder, spoken_question, tmp_path):
    checkpoint, config = tiny_vocoder
    args = ("--vocoder", checkpoint, "--vocoder-config", config, "--speaker", 0, "--out", tmp_path)
    first = chat(cli, com_model, "--message", spoken_question, *args)
    kept = (tmp_path / "answer-1.wav").read_bytes()
    twice = ("--message", spoken_question) * 2
    second = chat(cli, com_model, *twice, *args)  # each message is spoken
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer-1.wav", "answer-2.wav", "answer-3.wav"]
    assert (tmp_path / "answer-1.wav").read_bytes() == kept == (tmp_path / "answer-3.wav").read_bytes()
    assert "answer: " in first.stdout and f"speech: {tmp_path / 'answer-1.wav'} (" in first.stdout
    assert f"speech: {tmp_path / 'answer-3.wav'} (" in second.stdout


def test_text_only_and_units_without_vocoder(cli, com_model, spoken_question, tmp_path):
    (record,) = records(chat(cli, com_model, "--message", spoken_question, "--text-only", "--json", "--out", tmp_path))
    assert record["prompt"] == com_prompt("t2t", text_i=spoken_question) and record["text"] and record["wav"] is None
    run = chat(cli, com_model, "--message", spoken_question, "--out", tmp_path)
    assert "(no vocoder: units only)" in run.stdout and not list(tmp_path.iterdir())


def test_interactive_reads_questions_until_quit(cli, com_model, tmp_path):
    lines = f"{QUESTION}\n\n   \nmissing.wav\nis zero more than nine\nquit\nnever asked\n"
    run = chat(cli, com_model, "--json", "--out", tmp_path, input=lines)
    assert [r["question"] for r in records(run)] == [QUESTION, "is zero more than nine"]
    assert "error: missing.wav: no such audio file" in run.stderr  # a bad question does not end the chat


def test_bad_setups_are_refused(cli, com_model, tiny_vocoder, tmp_path):
    checkpoint, config = tiny_vocoder

    def error(*args) -> str:
        run = chat(cli, com_model, "--out", tmp_path, *args, check=False)
        assert run.returncode == 1, run.stdout
        return run.stderr

    assert "choose one (0..3)" in error("--vocoder", checkpoint, "--vocoder-config", config, "--message", QUESTION)
    assert "needs both its checkpoint and its config.json" in error("--vocoder", checkpoint, "--message", QUESTION)
    assert "needs the k-means model" in error("--hubert", checkpoint, "--message", QUESTION)
    wav = tmp_path / "question.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    assert "a spoken question needs speech2unit" in error("--message", wav)
    assert "nope.pt: no such checkpoint" in error("--model", tmp_path / "nope.pt", "--message", QUESTION)
    assert not list(tmp_path.glob("answer-*.wav"))


def test_spoken_question(cli, com_model, tmp_path, espeak_ng):
    """A wav question goes through speech2unit (MFCC + a k-means fitted here), repeats merged, into the s2s prompt."""
    import subprocess as sp

    from speechgpt_fairseq.speech.audio import read_audio
    from speechgpt_fairseq.speech.kmeans import fit_kmeans, save_kmeans
    from speechgpt_fairseq.speech.mfcc import mfcc_features
    from speechgpt_fairseq.speech.speech2unit import SpeechToUnits
    from speechgpt_fairseq.speech.units import dedup_units

    wavs = []
    for i, text in enumerate(["how many red bags are in the room", "is zero more than nine", "what is two plus two"]):
        wavs.append(tmp_path / f"q{i}.wav")
        sp.run(["espeak-ng", "-w", str(wavs[-1]), text], check=True)
    features = np.concatenate([mfcc_features(read_audio(w)) for w in wavs])
    save_kmeans(fit_kmeans(features, 100, n_init=1, max_iter=10), tmp_path / "km.bin")
    (record,) = records(chat(cli, com_model, "--message", wavs[0], "--kmeans", tmp_path / "km.bin", "--json",
                             "--out", tmp_path))
    units = dedup_units(SpeechToUnits(tmp_path / "km.bin")(wavs[0]))
    assert record["prompt"] == com_prompt("s2s", speech_i=units) and record["question"] == str(wavs[0])
    run = chat(cli, com_model, "--message", wavs[0], "--kmeans", tmp_path / "km.bin", "--hubert", wavs[1],
               check=False)
    assert run.returncode == 1 and "q1.wav" in run.stderr  # not a HuBERT checkpoint: named in the error


def test_speechgpt_prompt_with_the_system_prompt_of_a_speechinstruct_file(cli, com_model, tmp_path):
    """--prompt speechgpt: SpeechGPT's chat template after the first non-empty `prefix` of a SpeechInstruct file."""
    system = "You are a test assistant.\n- Answer  briefly.\n"
    lines = [{"prefix": "", "plain_text": "[Human]: hi<eoh> [SpeechGPT]: ok<eoa>"},
             {"prefix": system, "plain_text": "[Human]: hi<eoh> [SpeechGPT]: ok<eoa>"}]
    (tmp_path / "si.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (record,) = records(chat(cli, com_model, "--prompt", "speechgpt", "--system-from", tmp_path / "si.jsonl",
                             "--message", QUESTION, "--max-new-tokens", 16, "--json", "--out", tmp_path))
    assert record["prompt"] == system + f"[Human]: {QUESTION} <eoh>. [SpeechGPT]: "
    (tmp_path / "none.jsonl").write_text(json.dumps(lines[0]) + "\n")
    run = chat(cli, com_model, "--prompt", "speechgpt", "--system-from", tmp_path / "none.jsonl", "--message", "x",
               check=False)
    assert run.returncode == 1 and "none.jsonl: no record with a non-empty 'prefix'" in run.stderr


def test_system_file_is_taken_as_it_is(tmp_path):
    import argparse

    from speechgpt_fairseq.cli.chat import system_prompt

    (tmp_path / "system.txt").write_text("Be brief.\n\n")
    args = argparse.Namespace(system=None, system_file=str(tmp_path / "system.txt"), system_from=None)
    assert system_prompt(args) == "Be brief.\n\n"
    with pytest.raises(FileNotFoundError, match="nope.txt: no such system prompt file"):
        system_prompt(argparse.Namespace(system=None, system_file=str(tmp_path / "nope.txt"), system_from=None))


def test_multi_turn_chat_keeps_the_conversation_in_one_cache(com_model):
    """--multi-turn: the second question is read after the first question and its answer, in the same cache, and
    answered as that whole conversation would be from scratch; the system prefix comes once."""
    from speechgpt_fairseq.inference import SpeechGPTGenerator
    from speechgpt_fairseq.models.generation import Decoding

    generator = SpeechGPTGenerator.from_checkpoint(com_model)
    chat_ = SpokenChat(generator, decoding=Decoding(), max_new_tokens=40, system_prefix="Be brief. ",
                       multi_turn=True)
    conversation, answers = chat_.conversation, []
    reply = conversation.reply
    conversation.reply = lambda *a, **k: answers.append(reply(*a, **k)) or answers[-1]
    first = chat_.respond(QUESTION, speak=False)
    cache = conversation.cache
    second = chat_.respond("is zero more than nine", speak=False)
    assert first.prompt.startswith("Be brief. ") and not second.prompt.startswith("Be brief.")
    assert conversation.cache is cache
    whole = (generator.vocab.encode_prompt(first.prompt) + generator.response_ids(answers[0])
             + generator.vocab.encode(second.prompt, continuation=True))
    expected = generator.generate_ids([whole], max_new_tokens=40, decoding=Decoding())[0]
    assert generator.response_ids(answers[1]) == expected
    assert second.response == generator.text(expected) and second.response


def test_a_vocoder_of_another_k_is_refused(converted_k100, make_tiny_vocoder, tmp_path):
    """A vocoder of more units than the model writes speaks other units' sounds: refused, as one of fewer."""
    from speechgpt_fairseq.speech.exemplar_vocoder import ExemplarVocoder

    checkpoint, config = make_tiny_vocoder(tmp_path / "k200", num_units=200)
    with pytest.raises(ValueError, match=r"config.json: the vocoder speaks 200 units, but \S+ writes 100: units "
                                         r"of another k-means"):
        SpokenChat.from_files(converted_k100, vocoder=checkpoint, vocoder_config=config, speaker=0)
    ExemplarVocoder(np.zeros((200, 400)), np.ones(200), 160).save(tmp_path / "k200.npz")
    with pytest.raises(ValueError, match=r"k200.npz: the vocoder speaks 200 units, but \S+ writes 100"):
        SpokenChat.from_files(converted_k100, vocoder=tmp_path / "k200.npz")


def test_interactive_chat_prints_no_info_lines(cli, converted_k100, tmp_path):
    """Log lines (kernel choice, loading) would land between a question and its answer in the terminal."""
    run = chat(cli, converted_k100, "--max-new-tokens", 4, "--out", tmp_path, input="hello\nquit\n")
    assert run.stdout.count("answer:") == 1
    assert " | INFO | " not in run.stderr, run.stderr
