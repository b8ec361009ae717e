"""Instruction examples as fairseq samples: loss on chosen segments, length-bucketed or packed into rows."""
from __future__ import annotations

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils

from speechgpt_fairseq.data.instructions import PROMPT, RESPONSE, SYSTEM
from speechgpt_fairseq.data.lm_dataset import SizedDataset
from speechgpt_fairseq.errors import InputError

# which segments carry loss under each policy (data/instructions.py defines the segments)
LOSS_SEGMENTS = {
    "response": (RESPONSE,),  # only what follows [SpeechGPT]: (the paper)
    "prefix": (PROMPT, RESPONSE),  # everything but the system prefix (SpeechGPT's released code)
    "all": (SYSTEM, PROMPT, RESPONSE),
}
# policies that start the loss at a marker in the response, a mix entry's third field picks them:
# speech: the spoken answer only, from the response's last <sosp> to the end (a source whose text part must not be
#   learned as an answer, e.g. sentences said back in the chain's s2s form);
# answer: the text answer and what follows, from the response's last [ta] (a source whose transcript must not be
#   learned, e.g. a question's transcript given with another question's speech)
SPEECH, ANSWER = "speech", "answer"
LOSS_MARKERS = {SPEECH: ("<sosp>", "spoken answer"), ANSWER: (" [ta]", "text answer")}  # (marker, what it starts)
LOSS_POLICIES = (*LOSS_SEGMENTS, *LOSS_MARKERS)


class InstructionDataset(SizedDataset):
    """Example i (a record `x` as prepare-sft wrote it: bos when the tokenizer adds one, text, </s>): source
    `x[:-1]`, target `x[1:]` with non-loss positions set to pad, and its prompt length (bos, system and human
    turn), which generation uses to split prompt from reference."""

    def __init__(self, tokens, segments, loss_policy: str, pad: int, shuffle: bool = True,
                 loss_start: list[int] | None = None, name: str = "examples"):
        if len(tokens) != len(segments) or not np.array_equal(tokens.sizes, segments.sizes):
            raise InputError("tokens and segment labels do not match: re-run `speechgpt prepare-sft`")
        if loss_policy in LOSS_MARKERS and not loss_start:
            raise ValueError(f"loss policy {loss_policy!r} needs the ids of {LOSS_MARKERS[loss_policy][0]!r} "
                             f"(loss_start)")
        self.tokens, self.segments, self.pad, self.shuffle = tokens, segments, pad, shuffle
        self.loss_policy = loss_policy
        self.loss_start = torch.tensor(loss_start) if loss_policy in LOSS_MARKERS else None
        self.name = name  # for errors: the data directory and split
        self.loss_segments = torch.tensor(LOSS_SEGMENTS["response" if loss_policy in LOSS_MARKERS else loss_policy])
        self.sizes = np.asarray(tokens.sizes, dtype=np.int64) - 1

    def __getitem__(self, index):
        x, seg = self.tokens[index].long(), self.segments[index].long()
        target = torch.where(torch.isin(seg[1:], self.loss_segments), x[1:], torch.full_like(x[1:], self.pad))
        if self.loss_start is not None:  # target j predicts x[j + 1]: keep the last marker and what follows
            starts = marker_starts(x, seg == RESPONSE, self.loss_start)
            if not len(starts):
                marker, what = LOSS_MARKERS[self.loss_policy]
                raise InputError(f"{self.name}: example {index} has no {what} (no {marker.strip()} after "
                                 f"[SpeechGPT]:), but its source's loss is {self.loss_policy!r}")
            target[:int(starts[-1]) - 1] = self.pad
        return {"id": index, "source": x[:-1], "target": target, "reference": x,
                "prompt_length": int((seg != RESPONSE).sum())}

    def __len__(self):
        return len(self.tokens)

    def ordered_indices(self):
        """Random order, then stably sorted by length: batches hold examples of similar length."""
        order = np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
        return order[np.argsort(self.sizes[order], kind="mergesort")]

    def collater(self, samples):
        return collate_instructions(samples, self.pad)


def marker_starts(x: torch.Tensor, where: torch.Tensor, marker: torch.Tensor) -> torch.Tensor:
    """The positions at which the token sequence `marker` starts in `x`, wholly inside `where`."""
    n = len(marker)
    if len(x) < n:
        return torch.zeros(0, dtype=torch.long)
    windows, inside = x.unfold(0, n, 1), where.unfold(0, n, 1)
    return ((windows == marker).all(1) & inside.all(1)).nonzero().flatten()


def collate_instructions(samples: list[dict], pad: int) -> dict:
    """Right-padded batch; `example_ids` is present when samples are packed rows."""
    if not samples:
        return {}
    src = data_utils.collate_tokens([s["source"] for s in samples], pad, left_pad=False)
    batch = {
        "id": torch.LongTensor([s["id"] for s in samples]),
        "nsentences": sum(s.get("n_examples", 1) for s in samples),
        "net_input": {"src_tokens": src, "src_lengths": torch.LongTensor([len(s["source"]) for s in samples])},
        "target": data_utils.collate_tokens([s["target"] for s in samples], pad, left_pad=False),
    }
    batch["ntokens"] = int(batch["target"].ne(pad).sum())
    if "example_ids" in samples[0]:
        batch["net_input"]["example_ids"] = data_utils.collate_tokens([s["example_ids"] for s in samples], -1,
                                                                      left_pad=False)
    else:
        batch["prompt_lengths"] = torch.LongTensor([s["prompt_length"] for s in samples])
        batch["references"] = [s["reference"] for s in samples]
    return batch


class PackedInstructionDataset(SizedDataset):
    """Examples packed into rows of at most `row_tokens` tokens (best-fit decreasing); attention and positions
    stay inside each example (the model's `example_ids`). Each epoch is packed anew, from (seed, epoch) alone,
    after the examples (a resampled mix) have moved to that epoch."""

    def __init__(self, examples: FairseqDataset, row_tokens: int, pad: int, seed: int = 1, epoch: int = 1):
        self.examples, self.row_tokens, self.pad, self.seed = examples, row_tokens, pad, seed
        self.epoch = None
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int):
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.examples.set_epoch(epoch)
        sizes = self.examples.sizes
        too_long = int((sizes > self.row_tokens).sum())
        if too_long:
            raise InputError(f"{too_long} examples are longer than a packed row of {self.row_tokens} tokens: raise "
                             f"task.tokens_per_sample or drop them when building the data")
        self.rows = best_fit_decreasing(sizes, self.row_tokens, seed=[self.seed, epoch])
        self.sizes = np.array([int(sizes[r].sum()) for r in self.rows], dtype=np.int64)

    def __getitem__(self, index):
        parts = [self.examples[i] for i in self.rows[index]]
        return {"id": index, "n_examples": len(parts),
                "source": torch.cat([p["source"] for p in parts]), "target": torch.cat([p["target"] for p in parts]),
                "example_ids": torch.cat([torch.full((len(p["source"]),), k) for k, p in enumerate(parts)])}

    def __len__(self):
        return len(self.rows)

    def ordered_indices(self):
        return np.random.permutation(len(self))

    def collater(self, samples):
        return collate_instructions(samples, self.pad)


def best_fit_decreasing(sizes: np.ndarray, capacity: int, seed: int | list[int]) -> list[np.ndarray]:
    """Group example indices into rows of total size <= capacity: longest first, each into the row whose free
    room fits it most tightly (ties in random order, seeded). O(n log capacity)."""
    import bisect

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="mergesort")]
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free room -> rows with exactly that room
    rooms: list[int] = []  # sorted keys of by_room
    for i in order:
        size = int(sizes[i])
        k = bisect.bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[k]
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(int(i))
        left = room - size
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(r)
    return [np.array(r, dtype=np.int64) for r in rows]
