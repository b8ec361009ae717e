"""Record how SpeechGPT's own tokenizer (transformers 4.33.1's slow LlamaTokenizer) encodes instruction records.

SpeechGPT trained with transformers 4.33.1. Its released checkpoints (SpeechGPT-7B-ma/-cm/-com) carry a
sentencepiece `tokenizer.model` plus the units and SpeechGPT tokens in `added_tokens.json`, and that version's
slow tokenizer strips the whitespace around added tokens and gives every text chunk its own "▁". This script
makes a small tokenizer directory the way SpeechGPT's training scripts made theirs (the LLaMA tokenizer, then
stage 1 adding `<0>`..`<999>`, `<sosp>`, `<eosp>`, then stage 2 adding `[Human]`, `[SpeechGPT]`, `<eoh>`,
`<eos>`), on the corpus' small sentencepiece model instead of LLaMA's, and records with it:

- `speechgpt_tokenizer/`: the tokenizer directory (tokenizer.model, added_tokens.json, special_tokens_map.json,
  tokenizer_config.json), as SpeechGPT-7B-cm ships them;
- `speechgpt_tokenizer_reference.json`: for every line of `speechinstruct_records.jsonl`, the ids SpeechGPT's
  stage-2/3 training gives it, `tok(prefix + plain_text).input_ids + [eos]`; and for a few SpeechGPT inference
  prompts (a system prefix + `[Human]: {question} <eoh>. [SpeechGPT]: `), `tok(prompt).input_ids`.

tests/data/test_speechgpt_reference.py compares `speechgpt prepare-sft` and our prompts with these ids. Regenerate
(needs no network beyond the package index; torch is not needed):

    python3 -m venv /tmp/venv-tf433
    /tmp/venv-tf433/bin/pip install transformers==4.33.1 sentencepiece protobuf
    /tmp/venv-tf433/bin/python tests/data/reference/make_speechgpt_tokenizer_reference.py
"""
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece
import transformers
from transformers import LlamaTokenizer

HERE = Path(__file__).resolve().parent
SENTENCEPIECE_MODEL = HERE.parents[2] / "examples" / "corpus" / "tokenizer.model"
RECORDS = HERE / "speechinstruct_records.jsonl"
OUT_DIR = HERE / "speechgpt_tokenizer"
OUT_JSON = HERE / "speechgpt_tokenizer_reference.json"
NUM_UNITS = 1000
# SpeechGPT's inference template (src/infer/cli_infer.py), after its speech2unit replaced audio paths by units
INFERENCE_TEMPLATE = "[Human]: {question} <eoh>. [SpeechGPT]: "
QUESTIONS = [
    "Who is the fastest runner?",
    "Recognize this speech, this is input:<sosp><1><2><3><eosp>",
    "Read this sentence aloud, this is input: Today is a sunny day.",
    "<sosp><5><6><7><eosp>",
    "  two  spaces,\na newline and café  ",
]


def build_tokenizer(work: Path) -> LlamaTokenizer:
    """The LLaMA tokenizer extended as SpeechGPT's ma_pretrain.py (stage 1) and cm_sft.py (stage 2) extended it."""
    LlamaTokenizer(vocab_file=str(SENTENCEPIECE_MODEL)).save_pretrained(work / "llama")
    tok = LlamaTokenizer.from_pretrained(work / "llama")
    tok.pad_token_id = 0
    tok.add_tokens([f"<{x}>" for x in range(NUM_UNITS)] + ["<sosp>", "<eosp>"])
    tok.save_pretrained(work / "ma")
    tok = LlamaTokenizer.from_pretrained(work / "ma", padding_side="right", use_fast=False)
    tok.pad_token_id = 0
    for token in ["<sosp>", "<eosp>", "[Human]", "[SpeechGPT]", "<eoh>", "<eos>"]:
        if token not in tok.get_vocab():
            tok.add_tokens([token])
    return tok


def compact_json(reference: dict) -> str:
    """JSON with one line per record or prompt: small diffs when the reference changes."""
    lines = []
    for key, value in reference.items():
        if isinstance(value, list):
            items = ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(Path(tmp))
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        tok.save_pretrained(OUT_DIR)
    tok = LlamaTokenizer.from_pretrained(OUT_DIR, use_fast=False)  # what SpeechGPT's stage 3 and inference load
    records = [json.loads(line) for line in RECORDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    system = records[0]["prefix"]
    reference = {
        "transformers": transformers.__version__,
        "sentencepiece": sentencepiece.__version__,
        "tokenizer_model_sha256": hashlib.sha256(SENTENCEPIECE_MODEL.read_bytes()).hexdigest(),
        "vocab_size": len(tok),
        "records": [{"kind": r["kind"], "ids": tok(r["prefix"] + r["plain_text"]).input_ids + [tok.eos_token_id]}
                    for r in records],
        "inference_prompts": [{"system": system, "question": q,
                               "ids": tok(system + INFERENCE_TEMPLATE.format(question=q)).input_ids}
                              for q in QUESTIONS],
    }
    OUT_JSON.write_text(compact_json(reference), encoding="utf-8")
    print(f"wrote {OUT_DIR} and {OUT_JSON}: {len(reference['records'])} records, "
          f"{len(reference['inference_prompts'])} prompts, vocabulary {len(tok)}")


if __name__ == "__main__":
    main()
