"""convert-hf and export-hf: Hugging Face LLaMA directories in and out."""
from __future__ import annotations

import argparse

from speechgpt_fairseq.models.hf import convert_hf, export_hf


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
        p.add_argument("--num-units", type=int, default=None,
                       help="K, the number of speech units to add (default 1000; taken from the tokenizer when it "
                            "already has them)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")

    @staticmethod
    def run(args) -> None:
        out = convert_hf(args.hf_dir, args.out, num_units=args.num_units, overwrite=args.overwrite)
        print(f"wrote {out}/checkpoint.pt, {out}/vocab.json, {out}/model.yaml")


class ExportHF:
    """Write a fairseq checkpoint of ours as a Hugging Face directory: config.json, safetensors weights and
    tokenizer files with the added tokens, loadable by LlamaForCausalLM and AutoTokenizer."""

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
