"""Padding in instruction tuning: the fraction of computed tokens that are real, ours against SpeechGPT's collator.

A synthetic epoch shaped like SpeechInstruct's cross-modal data: ASR and TTS pairs of one utterance, its unit part
(`<sosp>` 50-600 units `<eosp>`) and its transcript (5-60 tokens, about one per ten units), wrapped in a prompt
template of 15-30 tokens, plus the answer end. Every batch of the epoch is formed and collated by the real code,
and the fraction is real tokens / (rows x padded length), summed over the epoch:

- ours, bucketed (the default training path): `InstructionDataset.ordered_indices()` (random order stably sorted
  by length) under fairseq's epoch seed, then fairseq's `data_utils.batch_by_size` with max_tokens, exactly as
  `FairseqTask.get_batch_iterator` does, each batch collated by `InstructionDataset.collater`;
- ours, packed (`task.pack=true`): `PackedInstructionDataset` rows of --tokens-per-sample (best-fit decreasing),
  batched the same way, each batch padded to its longest row;
- SpeechGPT's collator: shuffled batches of --speechgpt-batch examples, `DataCollatorForSeq2Seq` with
  pad_to_multiple_of=8 (SpeechGPT's cm_sft.py), each batch padded to its longest example.

Read `ratio ours/SpeechGPT: Z` as our fraction over theirs: above 1 we compute fewer padding tokens per real token
(Z = 1.3 means SpeechGPT spends 30% more compute per real token on padding, at equal cost per token). The issue's
goal is a real-token fraction of at least 0.97 for ours.

    python benchmarks/sft_padding.py [--examples 20000] [--max-tokens 4096] [--tokens-per-sample 1024] [--seed 1]
"""
from __future__ import annotations

import argparse
import platform

import numpy as np
import speechgpt_fairseq

speechgpt_fairseq.register()
import torch
import transformers
from fairseq.data import data_utils
from speechgpt_fairseq.data.instruction_dataset import InstructionDataset, PackedInstructionDataset
from speechgpt_fairseq.data.instructions import PROMPT, RESPONSE
from tokenizers import Tokenizer, models

BOS, PAD = 1, 0  # LLaMA's ids; pad is unk, as in our vocabulary


class Records:
    """A stand-in for an MMapIndexedDataset: one flat token array, rows cut out by offset, with sizes."""

    def __init__(self, flat: np.ndarray, sizes: np.ndarray):
        self.flat, self.sizes = flat, sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])

    def __getitem__(self, i):
        return torch.from_numpy(self.flat[self.offsets[i]:self.offsets[i + 1]])

    def __len__(self):
        return len(self.sizes)


def cross_modal_examples(n: int, rng: np.random.Generator) -> tuple[Records, Records]:
    """Token ids and segment labels of n ASR/TTS examples: the template and the input are prompt, the rest response."""
    units = rng.integers(50, 601, n)
    text = np.clip(np.rint(units * rng.uniform(0.07, 0.13, n)), 5, 60).astype(np.int64)  # same utterance
    template = rng.integers(15, 31, n)
    speech = units + 2  # <sosp> ... <eosp>
    asr = rng.random(n) < 0.5  # ASR: speech in, text out; TTS: text in, speech out
    prompt = 1 + template + np.where(asr, speech, text)  # <s>, as prepare-sft's records and SpeechGPT's start
    response = np.where(asr, text, speech) + 1  # + <eoa> / </s>
    sizes = prompt + response
    segments = np.repeat(np.array([PROMPT, RESPONSE] * n, dtype=np.int64), np.stack([prompt, response], 1).ravel())
    tokens = rng.integers(3, 1003, int(sizes.sum()))  # the values do not matter here, only the lengths
    return Records(tokens, sizes), Records(segments, sizes)


def fairseq_batches(dataset, max_tokens: int, max_positions: int, seed: int, epoch: int = 1) -> list[np.ndarray]:
    """The batches `FairseqTask.get_batch_iterator` forms (required_batch_size_multiple=1, as our configs set)."""
    with data_utils.numpy_seed(seed + epoch):
        indices = dataset.ordered_indices()
    indices, ignored = dataset.filter_indices_by_size(indices, max_positions)
    if ignored:
        raise SystemExit(f"{len(ignored)} examples are longer than --tokens-per-sample {max_positions}: raise it")
    return data_utils.batch_by_size(indices, dataset.num_tokens, num_tokens_vec=dataset.num_tokens_vec(indices),
                                    max_tokens=max_tokens, required_batch_size_multiple=1)


def fraction_ours(dataset, batches: list[np.ndarray]) -> tuple[float, int, int]:
    real = computed = 0
    for batch in batches:
        src = dataset.collater([dataset[int(i)] for i in batch])["net_input"]
        real += int(src["src_lengths"].sum())
        computed += src["src_tokens"].numel()
    return real / computed, real, computed


def fraction_speechgpt(tokens: Records, segments: Records, batch_size: int, seed: int) -> tuple[float, int, int]:
    """Shuffled batches (HF Trainer's default sampler) padded by SpeechGPT's collator."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": PAD, "<s>": BOS}, unk_token="<unk>")),
        pad_token="<unk>", padding_side="right")
    collator = transformers.DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, label_pad_token_id=-100,
                                                   return_tensors="pt", padding=True)
    order = np.random.default_rng(seed).permutation(len(tokens))
    real = computed = 0
    for start in range(0, len(order), batch_size):
        features = []
        for i in order[start:start + batch_size]:
            x, seg = tokens[i].tolist(), segments[i]
            features.append({"input_ids": x, "attention_mask": [1] * len(x),
                             "labels": torch.where(seg == RESPONSE, tokens[i], -100).tolist()})
        ids = collator(features)["input_ids"]
        real += sum(len(f["input_ids"]) for f in features)
        computed += ids.numel()
    return real / computed, real, computed


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=20000, help="examples in the synthetic epoch")
    p.add_argument("--max-tokens", type=int, default=4096, help="our batch size in padded tokens (dataset.max_tokens)")
    p.add_argument("--tokens-per-sample", type=int, default=1024,
                   help="our packed row length, and the longest example accepted (task.tokens_per_sample)")
    p.add_argument("--speechgpt-batch", type=int, default=6, help="SpeechGPT's examples per batch (per device)")
    p.add_argument("--seed", type=int, default=1, help="seed of the lengths, fairseq's epoch order and the shuffles")
    args = p.parse_args()

    print(f"machine: {machine()}, torch {torch.__version__}, transformers {transformers.__version__}")
    tokens, segments = cross_modal_examples(args.examples, np.random.default_rng(args.seed))
    sizes = tokens.sizes
    print(f"data: {len(sizes)} cross-modal examples, {int(sizes.sum()):,} tokens, length min {sizes.min()} / "
          f"median {int(np.median(sizes))} / mean {sizes.mean():.0f} / max {sizes.max()}")
    print(f"setting: ours max_tokens {args.max_tokens}, required_batch_size_multiple 1, packed rows of "
          f"{args.tokens_per_sample}; SpeechGPT batches of {args.speechgpt_batch}, pad_to_multiple_of 8; "
          f"seed {args.seed}")

    examples = InstructionDataset(tokens, segments, "response", pad=PAD)
    batches = fairseq_batches(examples, args.max_tokens, args.tokens_per_sample, args.seed)
    ours, real, computed = fraction_ours(examples, batches)
    print(f"ours (bucketed): {len(batches)} batches, {len(sizes) / len(batches):.1f} examples/batch, "
          f"{computed / len(batches):.0f} padded tokens/batch, {real:,} real of {computed:,} computed tokens")
    print(f"real-token fraction: {ours:.4f}")

    packed = PackedInstructionDataset(examples, args.tokens_per_sample, PAD, seed=args.seed)
    packed_batches = fairseq_batches(packed, args.max_tokens, args.tokens_per_sample, args.seed)
    ours_packed, real, computed = fraction_ours(packed, packed_batches)
    print(f"ours (packed): {len(packed)} rows ({len(sizes) / len(packed):.2f} examples/row) in "
          f"{len(packed_batches)} batches, {real:,} real of {computed:,} computed tokens")
    print(f"packed real-token fraction: {ours_packed:.4f}")

    theirs, real, computed = fraction_speechgpt(tokens, segments, args.speechgpt_batch, args.seed)
    print(f"SpeechGPT's collator: {-(-len(sizes) // args.speechgpt_batch)} batches, "
          f"{real:,} real of {computed:,} computed tokens")
    print(f"SpeechGPT real-token fraction: {theirs:.4f}")
    print(f"ratio ours/SpeechGPT: {ours / theirs:.3f}  (packed/SpeechGPT: {ours_packed / theirs:.3f})")


if __name__ == "__main__":
    main()
