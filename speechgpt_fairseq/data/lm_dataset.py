"""Next-token datasets over binarized records: packed blocks for training, one record per sample for generation."""
from __future__ import annotations

import numpy as np
import torch
from fairseq.data import AppendTokenDataset, FairseqDataset, TokenBlockDataset, data_utils


def collate_next_token(samples: list[dict], pad: int) -> dict:
    """Right-pad (source, target) pairs into fairseq's LM batch layout."""
    if not samples:
        return {}
    src = data_utils.collate_tokens([s["source"] for s in samples], pad, left_pad=False)
    tgt = data_utils.collate_tokens([s["target"] for s in samples], pad, left_pad=False)
    return {
        "id": torch.LongTensor([s["id"] for s in samples]),
        "nsentences": len(samples),
        "ntokens": int(tgt.ne(pad).sum()),
        "net_input": {"src_tokens": src, "src_lengths": torch.LongTensor([len(s["source"]) for s in samples])},
        "target": tgt,
    }


class SizedDataset(FairseqDataset):
    """fairseq's size queries answered from `self.sizes` (tokens per sample); batches drawn anew every epoch."""

    sizes: np.ndarray
    # Reused, fairseq keeps the first epoch's batches for the whole run and only shuffles their order, while a run
    # resumed in epoch e builds them from epoch e's order: the two would train on different batches. Rebuilt, the
    # batches of epoch e come from (seed, epoch) alone, in an uninterrupted run as in a resumed one.
    can_reuse_epoch_itr_across_epochs = False

    def num_tokens(self, index):
        return int(self.sizes[index])

    def num_tokens_vec(self, indices):
        return self.sizes[indices]

    def size(self, index):
        return int(self.sizes[index])


class _NextTokenDataset(SizedDataset):
    def __init__(self, pad: int, shuffle: bool):
        self.pad, self.shuffle = pad, shuffle

    def collater(self, samples):
        return collate_next_token(samples, self.pad)

    def ordered_indices(self):
        if self.shuffle:
            return np.random.permutation(len(self))
        return np.arange(len(self))


class PackedBlocksDataset(_NextTokenDataset):
    """Records (bos first when the tokenizer adds one) closed with `</s>`, concatenated and cut into blocks of
    `block_size` tokens.

    Every token is a target exactly once; a block's first input is the token before it (eos at the start).
    """

    def __init__(self, records, block_size: int, eos: int, pad: int, shuffle: bool = True):
        super().__init__(pad, shuffle)
        docs = AppendTokenDataset(records, eos)
        self.blocks = TokenBlockDataset(docs, docs.sizes, block_size, pad=pad, eos=eos, break_mode="none",
                                        include_targets=True)
        self.sizes = self.blocks.sizes

    def __getitem__(self, index):
        source, target, _ = self.blocks[index]
        return {"id": index, "source": source, "target": target}

    def __len__(self):
        return len(self.blocks)


class RecordDataset(_NextTokenDataset):
    """One record per sample: source `x`, target `x[1:] </s>`. Used for generation, where `x` is the prompt."""

    def __init__(self, records, eos: int, pad: int, shuffle: bool = False):
        super().__init__(pad, shuffle)
        self.records, self.eos = records, eos
        self.sizes = np.asarray(records.sizes, dtype=np.int64)

    def __getitem__(self, index):
        x = self.records[index].long()
        return {"id": index, "source": x, "target": torch.cat([x[1:], x.new([self.eos])])}

    def __len__(self):
        return len(self.records)
