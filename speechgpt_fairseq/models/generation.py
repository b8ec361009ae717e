"""Generation over the decoder's own calls: a batch of prompts is prefilled into a `KVCache` in one pass, then
each step appends one token per row. Greedy search, sampling and beam search; fairseq-generate (`FairseqGenerator`),
the Python API (inference.py) and chat all run through `generate` or `Conversation`, that is through `_pick` and
`_beam_search`.

- Scores: a hypothesis' positional scores are the model's log-probabilities (temperature 1, nothing filtered) of
  the tokens it generated; the prompt is given, not generated, and a `</s>` the search adds to close a response
  scores 0. A hypothesis' `score` is their sum, divided by its length ** `len_penalty` when `normalize` is set
  (fairseq's length normalisation, which also ranks beam search's n-best).
- Endings (`Endings`): a response ends at any eos id of the vocabulary (`</s>`, and e.g. Llama 3's `<|eot_id|>`,
  which is kept) or once its generated text ends with a stop text such as SpeechGPT's `<eoa>` (several tokens),
  or at its own length limit; `</s>` closes it. No eos id and no stop text before `min_new_tokens` tokens.
- Sampling applies temperature, then top-k, then top-p, as transformers does; each prompt draws from its own
  torch.Generator, so that with a seed per prompt its samples do not depend on the batch.
- Beam search follows fairseq's: the 2 x beam best continuations of a prompt's beams, those that end among the first
  beam of them are finished hypotheses, the first beam that do not end are the next beams; a prompt is done with
  beam finished hypotheses or at its length limit, where its best continuations finish.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.errors import InputError


@dataclass
class Decoding:
    """How tokens are picked: greedy (the default), beam search (`beam` > 1), or sampling (`sample`, one sample per
    beam) with temperature, top-k (0: all) and top-p (1: all)."""

    beam: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    len_penalty: float = 1.0
    normalize: bool = True

    def check(self) -> None:
        if self.beam < 1:
            raise InputError(f"beam {self.beam}: must be at least 1")
        if not self.sample and (self.temperature != 1.0 or self.top_k or self.top_p < 1.0):
            raise InputError(f"temperature {self.temperature}, top-k {self.top_k}, top-p {self.top_p}: they shape "
                             f"sampling; set sample (--sampling) or leave them at 1, 0, 1")
        if self.temperature <= 0:
            raise InputError(f"temperature {self.temperature}: must be positive (greedy search is sample=False)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"top-k {self.top_k}, top-p {self.top_p}: expected top-k >= 0 and 0 < top-p <= 1")


SPEECHGPT_SAMPLING = Decoding(sample=True, temperature=0.7, top_k=50, top_p=0.8)  # SpeechGPT's demo settings


@dataclass
class Hypothesis:
    """A generated response: its tokens, closed by `</s>`, the log-probability of each, and its score."""

    tokens: list[int]
    positional_scores: Tensor
    score: float


class Endings:
    """Where responses end: at an eos id, or once the generated text ends with `stop_text`; `eos` closes them."""

    def __init__(self, eos: int, pad: int, eos_ids: list[int], token_texts: list[str], stop_text: str | None = None):
        self.eos, self.pad, self.eos_ids = eos, pad, torch.tensor(sorted({eos, *eos_ids}))
        self.token_texts, self.stop_text = token_texts, stop_text or None
        self.is_end = torch.zeros(len(token_texts), dtype=torch.bool)
        self.is_end[self.eos_ids] = True
        # tokens that can complete the stop text: the text check runs only after one of them
        self.may_stop = torch.tensor([bool(self.stop_text) and bool(t) and (t.endswith(self.stop_text)
                                                                            or self.stop_text.endswith(t))
                                      for t in token_texts])

    @classmethod
    def of(cls, dictionary, stop_text: str | None = None) -> Endings:
        """From a fairseq Dictionary; ours (a Vocabulary's) know every eos id and each token's text."""
        vocab: Vocabulary | None = getattr(dictionary, "vocab", None)
        if vocab is not None:
            return cls(vocab.eos, vocab.pad, vocab.eos_ids, vocab.token_texts, stop_text)
        return cls(dictionary.eos(), dictionary.pad(), [dictionary.eos()], list(dictionary.symbols), stop_text)

    def to(self, device: torch.device) -> Endings:
        for name in ("eos_ids", "is_end", "may_stop"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def completes_stop(self, generated: list[int]) -> bool:
        """Whether the text of these generated tokens ends with the stop text."""
        text = ""
        for i in reversed(generated):  # the shortest suffix that could hold the stop text
            text = self.token_texts[i] + text
            if len(text) >= len(self.stop_text):
                break
        return text.endswith(self.stop_text)


def sampling_candidates(logits: Tensor, decoding: Decoding) -> tuple[Tensor, Tensor]:
    """The tokens sampling may pick from logits (B, V), as transformers' warpers leave them: divided by the
    temperature, the `top_k` highest, then the fewest whose probability exceeds `top_p` (at least one).
    Returns (logits (B, n), token ids (B, n)), best first, those left out at -inf."""
    scores = logits / decoding.temperature if decoding.temperature != 1.0 else logits
    n = decoding.top_k if 0 < decoding.top_k < scores.size(-1) else scores.size(-1)
    values, ids = scores.topk(n, dim=-1) if n < scores.size(-1) else scores.sort(dim=-1, descending=True)
    if decoding.top_p < 1.0:
        # transformers' rule, in its order: from the least likely up, drop while the mass so far is <= 1 - top_p
        ascending = values.flip(-1)
        dropped = ascending.softmax(-1).cumsum(-1) <= 1 - decoding.top_p
        dropped[:, -1] = False
        values = values.masked_fill(dropped.flip(-1), -math.inf)
    return values, ids


@torch.no_grad()
def generate(model, prompts: list[Tensor], endings: Endings, decoding: Decoding = Decoding(),
             max_new_tokens: int | list[int] = 512, min_new_tokens: int | list[int] = 0,
             seeds: list[int] | None = None) -> list[list[Hypothesis]]:
    """Continue each prompt (ids, bos first where the model reads one) with the decoder `model`; per prompt, up to
    `beam` hypotheses, best first. Length limits may differ per prompt; `seeds` (one per prompt) seed sampling."""
    decoding.check()
    limits, mins = _per_prompt(max_new_tokens, prompts), _per_prompt(min_new_tokens, prompts)
    if seeds is not None and len(seeds) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(seeds)} seeds: expected one per prompt")
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        if limit < 1 or len(prompt) + limit > model.max_positions():
            raise InputError(f"prompt {i}: {len(prompt)} tokens + {limit} new tokens: expected at least 1 new token "
                             f"and at most {model.max_positions()} tokens in all (the model's max positions)")
    device = model.embed_tokens.weight.device
    endings.to(device)
    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + max(limits))
    logits = model.prefill([p.to(device) for p in prompts], cache)
    if decoding.beam > 1 and not decoding.sample:
        return _beam_search(model, cache, logits, endings, decoding, limits, mins)
    generators = None
    if decoding.sample:
        seeds = seeds if seeds is not None else (int(torch.randint(2**62, ())) + torch.arange(len(prompts))).tolist()
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    return _pick(model, cache, logits, endings, decoding, limits, mins, generators)


def _per_prompt(value: int | list[int], prompts: list) -> list[int]:
    values = [value] * len(prompts) if isinstance(value, int) else list(value)
    if len(values) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(values)} length limits: expected one per prompt")
    return values


class Conversation:
    """A conversation in one cache: each turn's prompt goes after the earlier turns and answers, and only its own
    tokens are computed. Greedy search or sampling (beam 1); with `seed`, the same conversation samples the same."""

    def __init__(self, model, endings: Endings, decoding: Decoding = Decoding(), seed: int | None = None):
        decoding.check()
        if decoding.beam != 1:
            raise InputError(f"beam {decoding.beam}: a conversation keeps one answer per turn (beam 1)")
        device = model.embed_tokens.weight.device
        self.model, self.endings, self.decoding = model, endings.to(device), decoding
        self.generator = torch.Generator(device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
        self.cache = None
        self.unread: list[int] = []  # the last answer's final token, which the model has not read yet

    @property
    def length(self) -> int:
        """Tokens in the conversation so far."""
        return (self.cache.length if self.cache is not None else 0) + len(self.unread)

    @torch.no_grad()
    def reply(self, prompt: list[int], max_new_tokens: int, min_new_tokens: int = 0) -> Hypothesis:
        """Append `prompt` (this turn's ids) and answer it; the answer, without its closing `</s>`, stays in the
        conversation."""
        tokens = self.unread + list(prompt)
        end = self.length + len(prompt) + max_new_tokens
        if not tokens or max_new_tokens < 1:
            raise InputError(f"a turn of {len(tokens)} tokens, {max_new_tokens} new: expected at least one of each")
        if end > self.model.max_positions():
            raise InputError(f"the conversation would reach {end} tokens, past the model's "
                             f"{self.model.max_positions()} positions: start a new one")
        ids = torch.tensor([tokens], device=self.model.embed_tokens.weight.device)
        if self.cache is None:
            self.cache = self.model.new_cache(1, end)
            logits = self.model.prefill([ids[0]], self.cache)
        else:
            self.cache.grow(end)
            logits = self.model.step(ids, self.cache)
        read = self.cache.length
        generators = [self.generator] if self.decoding.sample else None
        ((answer,),) = _pick(self.model, self.cache, logits, self.endings, self.decoding, [max_new_tokens],
                             [min_new_tokens], generators)
        last = answer.tokens[self.cache.length - read]  # the final generated token: the search did not read it
        self.unread = [] if last == self.endings.eos else [last]
        return answer


def _bar(x: Tensor, endings: Endings, too_short: Tensor | None) -> None:
    """Set to -inf, in place, what may not come next: pad (fairseq never emits it), and every eos id in the rows
    (too_short) shorter than their min_new_tokens."""
    x[:, endings.pad] = -math.inf
    if too_short is not None:
        x[too_short.nonzero(), endings.eos_ids] = -math.inf


def _close(tokens: list[int], scores: Tensor, endings: Endings, normalize: bool, len_penalty: float) -> Hypothesis:
    """A finished response: `</s>` appended (score 0) unless it is its last token; the score from its log-probs."""
    if tokens[-1] != endings.eos:
        tokens = tokens + [endings.eos]
        scores = torch.cat([scores, scores.new_zeros(1)])
    total = float(scores.sum())
    return Hypothesis(tokens, scores, total / len(tokens) ** len_penalty if normalize else total)


def _pick(model, cache, logits: Tensor, endings: Endings, decoding: Decoding, limits: list[int], mins: list[int],
          generators: list[torch.Generator] | None) -> list[list[Hypothesis]]:
    """Greedy search, or `beam` independent samples per prompt: one token per row and step until every row ends."""
    B, K, device = len(limits), decoding.beam, logits.device
    if K > 1:
        cache.reorder(torch.arange(B, device=device).repeat_interleave(K))
        logits = logits.repeat_interleave(K, 0)
    row_prompt = torch.arange(B).repeat_interleave(K)  # (rows,) on the CPU: the prompt of each live row
    row_limit, row_min = torch.tensor(limits).repeat_interleave(K), torch.tensor(mins).repeat_interleave(K)
    tokens = torch.empty(B * K, max(limits), dtype=torch.long, device=device)
    scores = torch.empty(B * K, max(limits), device=device)
    out: list[list[Hypothesis]] = [[] for _ in range(B)]
    for t in range(max(limits)):
        x = logits.float()
        lprobs = x.log_softmax(-1)
        too_short = (row_min > t).to(device) if t < max(mins) else None
        _bar(x, endings, too_short)
        if generators is None:
            picked = x.argmax(-1)
        else:
            values, ids = sampling_candidates(x, decoding)
            choice = torch.empty(len(row_prompt), dtype=torch.long, device=device)
            for p in row_prompt.unique_consecutive().tolist():
                rows = (row_prompt == p).nonzero().squeeze(1).to(device)
                choice[rows] = torch.multinomial(values[rows].softmax(-1), 1, generator=generators[p]).squeeze(1)
            picked = ids.gather(1, choice.unsqueeze(1)).squeeze(1)
        tokens[:, t] = picked
        scores[:, t] = lprobs.gather(1, picked.unsqueeze(1)).squeeze(1)
        ended = endings.is_end[picked]
        if endings.stop_text and endings.may_stop[picked].any():
            for row in endings.may_stop[picked].nonzero().squeeze(1).tolist():
                ended[row] = endings.completes_stop(tokens[row, :t + 1].tolist())
        if too_short is not None:
            ended &= ~too_short
        ended |= (row_limit == t + 1).to(device)
        if ended.any():
            for row in ended.nonzero().squeeze(1).tolist():
                out[int(row_prompt[row])].append(_close(tokens[row, :t + 1].tolist(), scores[row, :t + 1].cpu(),
                                                        endings, decoding.normalize, decoding.len_penalty))
            live = (~ended).nonzero().squeeze(1)
            if not len(live):
                break
            cache.reorder(live)
            tokens, scores, picked = tokens[live], scores[live], picked[live]
            live = live.cpu()
            row_prompt, row_limit, row_min = row_prompt[live], row_limit[live], row_min[live]
        logits = model.step(picked.unsqueeze(1), cache)
    return [sorted(h, key=lambda h: -h.score) for h in out]


def _beam_search(model, cache, logits: Tensor, endings: Endings, decoding: Decoding, limits: list[int],
                 mins: list[int]) -> list[list[Hypothesis]]:
    """fairseq's beam search (see the module's docstring) over the prompts' prefilled rows."""
    K, V, device = decoding.beam, logits.size(-1), logits.device
    finished: list[list[Hypothesis]] = [[] for _ in limits]
    live = list(range(len(limits)))  # prompts still searching
    beams = 1  # rows per live prompt: one after the prefill, then K
    cum = torch.zeros(len(live), device=device)  # (rows,) each beam's summed log-probs
    history = torch.empty(len(live), 0, dtype=torch.long, device=device)  # (rows, t) each beam's tokens
    history_scores = torch.empty(len(live), 0, device=device)
    for t in range(max(limits)):
        lprobs = logits.float().log_softmax(-1)
        short = [mins[prompt] > t for prompt in live]
        too_short = torch.tensor(short, device=device).repeat_interleave(beams) if any(short) else None
        _bar(lprobs, endings, too_short)
        totals = (cum.unsqueeze(1) + lprobs).view(len(live), beams * V)
        top, flat = totals.topk(min(2 * K, beams * V - 1), dim=1)  # (P, C), best first
        src = flat // V + torch.arange(len(live), device=device).unsqueeze(1) * beams  # (P, C) the rows they extend
        token = flat % V
        ends = endings.is_end[token]
        if endings.stop_text and endings.may_stop[token].any():
            for p, c in endings.may_stop[token].nonzero().tolist():
                ends[p, c] = endings.completes_stop(history[src[p, c]].tolist() + [int(token[p, c])])
        if any(short):
            ends &= ~torch.tensor(short, device=device).unsqueeze(1)
        finite = top.isfinite()
        keep = []
        for p, prompt in enumerate(live):
            # finished: those among the first K that end (at the limit, all of the first K), in order, up to K
            at_limit = limits[prompt] == t + 1
            closing = (finite[p, :K] & (ends[p, :K] | at_limit)).nonzero().squeeze(1).tolist()
            for c in closing[:K - len(finished[prompt])]:
                row = int(src[p, c])
                finished[prompt].append(_close(
                    history[row].tolist() + [int(token[p, c])],
                    torch.cat([history_scores[row], lprobs[row, token[p, c]].view(1)]).cpu(),
                    endings, decoding.normalize, decoding.len_penalty))
            if len(finished[prompt]) < K and not at_limit and finite[p].any():
                keep.append(p)
        if not keep:
            break
        kept = torch.tensor(keep, device=device)
        top, src, token, ends = top[kept], src[kept], token[kept], ends[kept]
        # the next beams: the first K candidates that do not end (fairseq's rule)
        order = ends.long() * top.size(1) + torch.arange(top.size(1), device=device)
        chosen = order.topk(K, dim=1, largest=False).indices  # (P', K)
        rows, picked = src.gather(1, chosen).view(-1), token.gather(1, chosen).view(-1)
        cum = top.gather(1, chosen).view(-1).masked_fill(ends.gather(1, chosen).view(-1), -math.inf)
        history = torch.cat([history[rows], picked.unsqueeze(1)], 1)
        history_scores = torch.cat([history_scores[rows], lprobs[rows, picked].unsqueeze(1)], 1)
        live, beams = [live[p] for p in keep], K
        cache.reorder(rows)
        logits = model.step(picked.unsqueeze(1), cache)
    return [sorted(h, key=lambda h: -h.score) for h in finished]


class FairseqGenerator:
    """What our tasks' `build_generator` gives fairseq-generate: its options (beam, sampling, temperature, top-k/p,
    lenpen, unnormalized, max/min length) read into `Decoding` and per-prompt length limits, and `generate` run on
    the prompts the task's `inference_step` makes; hypotheses come back as fairseq's dicts."""

    def __init__(self, model, dictionary, args, stop_text: str | None = None, min_new_tokens: int = 0):
        refused = {"--diverse-beam-groups": getattr(args, "diverse_beam_groups", -1) > 0,
                   "--diversity-rate": getattr(args, "diversity_rate", -1) > -1,
                   "--match-source-len": getattr(args, "match_source_len", False),
                   "--constraints": getattr(args, "constraints", None),
                   "--no-repeat-ngram-size": getattr(args, "no_repeat_ngram_size", 0) > 0,
                   "--unkpen": getattr(args, "unkpen", 0) != 0,
                   "--prefix-size": getattr(args, "prefix_size", 0) > 0,
                   "--print-alignment": getattr(args, "print_alignment", None),
                   "--score-reference": getattr(args, "score_reference", False)}
        if any(refused.values()):
            raise InputError(f"{', '.join(k for k, v in refused.items() if v)}: not supported by our tasks' generator")
        self.model = model
        top_p = getattr(args, "sampling_topp", -1.0)
        self.decoding = Decoding(beam=getattr(args, "beam", 5), sample=getattr(args, "sampling", False),
                                 temperature=getattr(args, "temperature", 1.0),
                                 top_k=max(getattr(args, "sampling_topk", -1), 0), top_p=top_p if top_p > 0 else 1.0,
                                 len_penalty=getattr(args, "lenpen", 1.0),
                                 normalize=not getattr(args, "unnormalized", False))
        self.decoding.check()
        self.max_len_a, self.max_len_b = getattr(args, "max_len_a", 0), getattr(args, "max_len_b", 200)
        self.min_len, self.min_new_tokens = getattr(args, "min_len", 1), min_new_tokens
        self.endings = Endings.of(dictionary, stop_text)
        self.eos = dictionary.eos()
        self.symbols_to_strip_from_output = {self.eos}
        self.seed = int(torch.randint(2**62, ()))  # set by fairseq's --seed: sample i samples from seed + its id

    def generate_prompts(self, prompts: list[Tensor], ids: list[int]) -> list[list[dict]]:
        """Hypotheses for prompts (each from its start token) of the samples `ids`, as fairseq-generate reads them.
        fairseq's limits keep their meaning, per prompt: at most max_len_a * prompt length + max_len_b tokens after
        the start token (within the model's positions), no eos among the first min_len of them."""
        limits, mins = [], []
        for prompt in prompts:
            n, positions = len(prompt), self.model.max_positions()
            most = min(int(self.max_len_a * n + self.max_len_b), positions - 1)
            if most <= n - 1:
                raise InputError(f"a prompt of {n} tokens does not fit the length limit of {most} (max_len_a * prompt "
                                 f"length + max_len_b, at most the model's {positions - 1}): raise --max-len-b")
            limits.append(most - (n - 1))
            mins.append(max(self.min_new_tokens, self.min_len - (n - 1)))
        hypos = generate(self.model.decoder, prompts, self.endings, self.decoding, limits, mins,
                         [self.seed + i for i in ids])
        return [[{"tokens": torch.tensor(h.tokens), "score": torch.tensor(h.score),
                  "positional_scores": h.positional_scores, "alignment": None, "attention": None} for h in beams]
                for beams in hypos]
