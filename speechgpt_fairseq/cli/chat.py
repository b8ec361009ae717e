"""chat: talk to a chain-of-modality model, in text or speech, interactively or one question at a time."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.chat import PROMPT_STYLES, ChatTurn, SpokenChat
from speechgpt_fairseq.data.instructions import read_system_prefix
from speechgpt_fairseq.models.generation import SPEECHGPT_SAMPLING, Decoding
from speechgpt_fairseq.speech.units import format_unit_string
from speechgpt_fairseq.speech.vocoder import write_wav

QUIT = {"quit", "exit", ":q"}
_ANSWER_WAV = re.compile(r"answer-(\d+)\.wav")


def next_answer_number(out: Path) -> int:
    """1 + the highest N of the answer-N.wav files already in `out`: earlier answers are never overwritten."""
    found = [int(m.group(1)) for p in out.glob("answer-*.wav") if (m := _ANSWER_WAV.fullmatch(p.name))]
    return max(found, default=0) + 1


class Chat:
    """Talk to a chain-of-modality (com_sft) model. A question is text, or the path of an audio file (any format
    soundfile reads, any sample rate) turned into units with --kmeans and --hubert (or MFCC features without
    --hubert), as the model's training data was. The model transcribes a spoken question, answers in text and
    then in speech; the spoken answer is vocoded to OUT/answer-N.wav with --vocoder (N continues after the
    answers already in OUT), or printed as units without one. --text-only asks for a text answer. With
    --message the questions are answered one by one and the command ends; without it, questions are read from
    standard input, one per line, until an empty input, 'quit' or end of file. --json prints one JSON object
    per turn instead of the readable lines.

    --prompt speechgpt prompts as SpeechGPT's own chat did (for the released SpeechGPT-7B-com): a system prompt
    (--system-file, or --system-from a SpeechInstruct JSON-lines file whose `prefix` holds it), then the request as
    typed, where an audio file after "this is input:" (ASR) or a request that is only an audio file becomes units;
    a TTS request puts its text there ("Read this aloud, this is input: Today is a sunny day."). It answers with
    up to 2048 new tokens and at least 10 unless --max-new-tokens / --min-new-tokens say otherwise."""

    help = "talk to a trained model: text or a wav in, the answer in text and speech out"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="checkpoint of ours (stage 3, LoRA merged or not)")
        p.add_argument("--message", action="append", default=None,
                       help="a question (text, or an audio file path); repeat for several; none: interactive")
        p.add_argument("--kmeans", default=None, help="k-means model of the units (joblib, e.g. km1000.bin)")
        p.add_argument("--hubert", default=None, help="fairseq HuBERT checkpoint (default: MFCC features)")
        p.add_argument("--layer", type=int, default=11, help="HuBERT layer the k-means was fitted on (default 11)")
        p.add_argument("--vocoder", default=None,
                       help="unit HiFi-GAN checkpoint (see unit2speech), or an exemplar vocoder .npz")
        p.add_argument("--vocoder-config", default=None, help="the vocoder's config.json")
        p.add_argument("--speaker", type=int, default=None, help="speaker id of a multi-speaker vocoder")
        p.add_argument("--out", default="chat", help="directory for the spoken answers (default ./chat)")
        p.add_argument("--text-only", action="store_true", help="answer in text only (s2t / t2t; --prompt com)")
        p.add_argument("--prompt", choices=PROMPT_STYLES, default="com",
                       help="com: our chain-of-modality prompts (default); speechgpt: SpeechGPT's chat prompt")
        system = p.add_mutually_exclusive_group()
        system.add_argument("--system", default=None, help="text put before every prompt (a system instruction)")
        system.add_argument("--system-file", default=None, help="a file whose text, as it is, goes before every prompt")
        system.add_argument("--system-from", default=None,
                            help="a SpeechInstruct JSON-lines file: its first non-empty `prefix` is the system prompt")
        p.add_argument("--multi-turn", action="store_true",
                       help="a conversation: each question goes after the earlier questions and answers (default: "
                            "each question alone, as SpeechGPT's demo)")
        p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
        p.add_argument("--temperature", type=float, default=SPEECHGPT_SAMPLING.temperature)
        p.add_argument("--top-k", type=int, default=SPEECHGPT_SAMPLING.top_k)
        p.add_argument("--top-p", type=float, default=SPEECHGPT_SAMPLING.top_p)
        p.add_argument("--seed", type=int, default=None, help="seed of the sampling, for repeatable answers")
        p.add_argument("--max-new-tokens", type=positive_int, default=None,
                       help="longest answer in tokens (default 512; 2048 with --prompt speechgpt)")
        p.add_argument("--min-new-tokens", type=int, default=None,
                       help="no end of answer before this many tokens (default 0; 10 with --prompt speechgpt)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
        p.add_argument("--bf16", action="store_true", help="the model's weights in bfloat16 (half the memory)")
        p.add_argument("--json", action="store_true", help="one JSON object per turn on standard output")

    @staticmethod
    def run(args) -> None:
        if args.message is None:
            # a conversation owns the terminal: progress notes (kernel choice, feature extractor, loading) would
            # land between a question and its answer; warnings and errors still show
            logging.getLogger().setLevel(logging.WARNING)
        decoding = Decoding() if args.greedy else Decoding(sample=True, temperature=args.temperature,
                                                           top_k=args.top_k, top_p=args.top_p)
        chat = SpokenChat.from_files(
            args.model, kmeans=args.kmeans, hubert=args.hubert, layer=args.layer, vocoder=args.vocoder,
            vocoder_config=args.vocoder_config, speaker=args.speaker, device=args.device, bf16=args.bf16,
            system_prefix=system_prompt(args), decoding=decoding, max_new_tokens=args.max_new_tokens, seed=args.seed,
            prompt_style=args.prompt, min_new_tokens=args.min_new_tokens, multi_turn=args.multi_turn)
        out = Path(args.out)
        if args.message is not None:
            for question in args.message:
                show(answer(chat, question, out, args), args.json)
            return
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            question = line.strip()
            if not line or question in QUIT or (interactive and not question):
                break
            if not question:
                continue
            try:
                show(answer(chat, question, out, args), args.json)
            except (ValueError, FileNotFoundError) as e:  # a bad question ends the turn, not the conversation
                print(f"error: {e}", file=sys.stderr)


def system_prompt(args) -> str:
    """--system, the text of --system-file (as it is, final newline included), or --system-from's prefix."""
    if args.system_file is not None:
        path = Path(args.system_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such system prompt file (--system-file)")
        return path.read_text(encoding="utf-8")
    if args.system_from is not None:
        if not Path(args.system_from).is_file():
            raise FileNotFoundError(f"{args.system_from}: no such SpeechInstruct file (--system-from)")
        return read_system_prefix(args.system_from)
    return args.system or ""


def answer(chat: SpokenChat, question: str, out: Path, args) -> dict:
    """Answer `question`; the spoken answer (if any) is written to OUT/answer-N.wav. Returns the turn as a dict."""
    turn: ChatTurn = chat.respond(question, speak=not args.text_only)
    record = {"question": turn.question, "prompt": turn.prompt, "response": turn.response,
              "transcript": turn.transcript, "text": turn.text, "units": turn.units, "wav": None}
    if turn.audio is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"answer-{next_answer_number(out)}.wav"
        write_wav(path, turn.audio, chat.sample_rate)
        record.update(wav=str(path), seconds=round(len(turn.audio) / chat.sample_rate, 3))
    return record


def show(record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    if record["transcript"] is not None:
        print(f"heard:  {record['transcript']}")
    print(f"answer: {record['text'] if record['text'] is not None else record['response']}")
    if record["wav"]:
        print(f"speech: {record['wav']} ({record['seconds']:.2f} s)")
    elif record["units"]:
        print(f"speech: {format_unit_string(record['units'])} (no vocoder: units only)")
    print(flush=True)
