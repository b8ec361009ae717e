"""convert-hf, export-hf and import-peft: Hugging Face LLaMA directories in and out, PEFT LoRA adapters in."""
from __future__ import annotations

import argparse

from speechgpt_fairseq.cli.main import positive_int
from speechgpt_fairseq.models.hf import convert_hf, export_hf, import_peft


class ConvertHF:
    """Convert a Hugging Face LlamaForCausalLM directory (config.json; safetensors or .bin, sharded or not;
    tokenizer.model or tokenizer.json) into a fairseq checkpoint (OUT/checkpoint.pt), its vocabulary
    (OUT/vocab.json) and its model config (OUT/model.yaml). The embeddings and output layer grow by K units
    and the six SpeechGPT tokens unless the tokenizer already carries them (SpeechGPT-7B-ma/-cm)."""

    help = "Hugging Face LLaMA directory -> fairseq checkpoint + vocab.json"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("hf_dir", help="Hugging Face model directory")
        p.add_argument("out", help="output directory (must not exist or be empty, unless --overwrite)")
        p.add_argument("--num-units", type=positive_int, default=None,
                       help="K, the number of speech units to add (default 1000; taken from the tokenizer when it "
                            "already has them)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")

    @staticmethod
    def run(args) -> None:
        out = convert_hf(args.hf_dir, args.out, num_units=args.num_units, overwrite=args.overwrite)
        print(f"wrote {out}/checkpoint.pt, {out}/vocab.json, {out}/model.yaml")


class ExportHF:
    """Write a fairseq checkpoint of ours as a Hugging Face directory: config.json, safetensors weights and
    tokenizer files with the added tokens, loadable by LlamaForCausalLM and AutoTokenizer. A LoRA checkpoint
    is written merged (its base read from lora_base when the checkpoint holds only the adapters)."""

    help = "fairseq checkpoint -> Hugging Face LLaMA directory"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="a speechgpt_llama checkpoint (.pt) from training or convert-hf")
        p.add_argument("out", help="output directory (must not exist or be empty, unless --overwrite)")
        p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file (default 5)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")

    @staticmethod
    def run(args) -> None:
        out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite,
                        max_shard_bytes=int(args.max_shard_size * 2**30))
        print(f"wrote {out}")


class ImportPEFT:
    """Apply a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors or .bin, as fnlp/SpeechGPT-7B-com
    is published) to BASE, a fairseq checkpoint of ours (e.g. convert-hf of SpeechGPT-7B-cm). OUT gets
    checkpoint.pt, vocab.json and model.yaml as convert-hf writes them: with --merge the merged model; otherwise a
    LoRA model (lora_* set, lora_base = BASE) whose checkpoint holds only the adapter, ready to train further."""

    help = "PEFT LoRA adapter + fairseq checkpoint -> fairseq checkpoint (LoRA or merged)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("base", help="the base fairseq checkpoint (.pt, or a directory holding checkpoint.pt)")
        p.add_argument("out", help="output directory (must not exist or be empty, unless --overwrite)")
        p.add_argument("--adapter", required=True, help="PEFT adapter directory")
        p.add_argument("--merge", action="store_true", help="write the merged full weights instead of a LoRA model")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")

    @staticmethod
    def run(args) -> None:
        out = import_peft(args.base, args.out, args.adapter, merge=args.merge, overwrite=args.overwrite)
        print(f"wrote {out}/checkpoint.pt, {out}/vocab.json, {out}/model.yaml")
