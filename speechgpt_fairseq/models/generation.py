"""fairseq's SequenceGenerator with two additions SpeechGPT needs.

- The forced prompt runs through the decoder in one forward pass. fairseq feeds a prompt (`prefix_tokens`) one
  token per step; before generating, this generator hands the prompt to every decoder that accepts it
  (`set_pending_prompt`), which encodes the positions the batch's prompts share at the first step. The steps
  that follow, while every row is still inside its prompt, do not call the model at all, and forced tokens
  score 0: a hypothesis' score is the log-probability of its response.
- Generation can stop at a text such as SpeechGPT's `<eoa>`, which is several tokens in SpeechGPT's
  vocabulary: once a hypothesis' generated tokens end with it, the only continuation allowed is `</s>`. It also
  stops after any other id the checkpoint ends generation with (Llama 3 Instruct's `<|eot_id|>`, from
  generation_config.json), as transformers' `generate` does: that token is kept, then `</s>` is forced.
- The length limit (`--max-len-a`, `--max-len-b`) applies to each prompt with its own length, so a prompt
  gets the same output alone or in a batch with longer ones; `min_new_tokens` keeps every eos out of the first
  tokens of each response, as transformers' `min_new_tokens` does.

fairseq's generator starts each hypothesis from a token it does not generate (`bos_token`): here the first token
of each prompt, bos when the tokenizer adds one, else the prompt's first text token (`prompt_batch`).
"""
from __future__ import annotations

import math

import torch
from fairseq.data import data_utils
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator


def right_padded_lengths(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Length of each right-padded row: up to its last non-pad token."""
    real = x.ne(pad)
    return torch.where(real.any(1), x.size(1) - real.flip(1).int().argmax(1), torch.zeros_like(real[:, 0], dtype=torch.long))


def prefilled_length(prompts: torch.Tensor, pad: int) -> int:
    """Prompt positions a batch shares before any row's first pad: what the decoder encodes in one pass."""
    return int(prompts.ne(pad).cumprod(1).sum(1).min()) if prompts.numel() else 0


def prompt_batch(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts (each the ids a model reads, bos first when the tokenizer adds one) as fairseq's generator takes
    them: (src_tokens (B, P) right-padded, first token of each (B,) to start from, the rest (B, P-1) to force)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: with a tokenizer that adds no bos, a prompt needs at least one token")
    src = data_utils.collate_tokens(prompts, pad, left_pad=False)
    return src, src[:, 0], src[:, 1:]


class PromptEnsemble(EnsembleModel):
    """fairseq's ensemble wrapper, ending each hypothesis on its own terms: `</s>` is forced once its generated
    text ends with `stop_text` or it generated another of the vocabulary's eos ids, or once it reaches its length
    limit, computed from its own prompt length rather than from the batch's longest (so that a prompt gets the
    same output in any batch); no eos comes before `min_new_tokens` response tokens."""

    def __init__(self, models, dictionary, stop_text: str | None, min_new_tokens: int = 0):
        super().__init__(models)
        self.stop_text, self.eos, self.pad = stop_text, dictionary.eos(), dictionary.pad()
        self.min_new_tokens = min_new_tokens
        self.vocab_size = len(dictionary)
        vocab = getattr(dictionary, "vocab", None)  # our dictionaries know each token's text and eos ids
        self.texts = vocab.token_texts if vocab is not None else list(dictionary.symbols)
        self.eos_ids = torch.tensor(vocab.eos_ids if vocab is not None else [self.eos])
        self.stop_ids = self.eos_ids[self.eos_ids != self.eos]
        # per row, set by the generator before each search and reordered with the beams
        self.prompts: torch.Tensor | None = None  # (rows, P) right-padded, the forced tokens
        self.prefilled = 0  # prompt positions every decoder encodes at step 0 (0: decoders run every step)
        self.prompt_lengths: torch.Tensor | None = None
        self.max_steps: torch.Tensor | None = None

    def forward_decoder(self, tokens, encoder_outs, incremental_states, temperature: float = 1.0):
        step = tokens.size(1) - 1
        forced = self._forced_tokens(step)
        if forced is not None:
            # every row is inside its prompt: the next token is given, so the model is not asked (the decoder
            # encoded the prompt in one pass at step 0); forced tokens score 0, hypotheses score their response
            lprobs = torch.full((tokens.size(0), self.vocab_size), -math.inf, device=tokens.device)
            lprobs.scatter_(1, forced.unsqueeze(1), 0.0)
            return lprobs, None
        lprobs, attn = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        generated = step - self.prompt_lengths  # tokens after the start token and the prompt, per row
        at_limit = self.max_steps <= step
        too_short = (generated >= 0) & (generated < self.min_new_tokens) & ~at_limit  # rows past their prompt
        if too_short.any():
            rows = too_short.nonzero()
            lprobs[rows, self.eos_ids.to(lprobs.device)] = -math.inf  # (rows, 1) x (E,): every eos of those rows
        if at_limit.any():  # as fairseq does at its own limit: only </s> remains, with the model's score
            eos = lprobs[at_limit, self.eos]
            lprobs[at_limit] = -math.inf
            lprobs[at_limit, self.eos] = eos
        ended = (generated > 0) & torch.isin(tokens[:, -1], self.stop_ids.to(tokens.device)) & ~too_short
        if self.stop_text:
            for row, n in enumerate(generated.tolist()):
                if n > 0 and not too_short[row] and self._ends_with_stop(tokens[row, -n:].tolist()):
                    ended[row] = True  # the answer ended with the stop text
        if ended.any():  # </s> is certain
            lprobs[ended] = -math.inf
            lprobs[ended, self.eos] = 0.0
        return lprobs, attn

    def _forced_tokens(self, step: int) -> torch.Tensor | None:
        """The prompt tokens forced at `step` when the model need not run: every row is inside the part of its
        prompt the decoders encoded in their first call (positions 0 .. `prefilled`); else None."""
        if not 0 < step < self.prefilled:
            return None
        return self.prompts[:, step]

    def _ends_with_stop(self, ids: list[int]) -> bool:
        text = ""
        for i in reversed(ids):  # the shortest suffix of generated tokens that could hold the stop text
            text = self.texts[i] + text
            if len(text) >= len(self.stop_text):
                break
        return text.endswith(self.stop_text)

    def reorder_incremental_state(self, incremental_states, new_order):
        super().reorder_incremental_state(incremental_states, new_order)
        for name in ("prompts", "prompt_lengths", "max_steps"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, new_order))


class PromptPrefillGenerator(SequenceGenerator):
    """fairseq's SequenceGenerator with the additions above; `bos_token` may be one id per prompt (B,)."""

    def __init__(self, models, tgt_dict, stop_text: str | None = None, min_new_tokens: int = 0, **kwargs):
        super().__init__(PromptEnsemble(models, tgt_dict, stop_text, min_new_tokens), tgt_dict, **kwargs)

    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        if torch.is_tensor(bos_token):
            bos_token = bos_token.repeat_interleave(self.beam_size)
        decoders = [m.decoder for m in self.model.models if hasattr(m.decoder, "set_pending_prompt")]
        for decoder in decoders:
            decoder.set_pending_prompt(prefix_tokens)
        src = sample["net_input"]["src_tokens"]
        lengths = (right_padded_lengths(prefix_tokens, self.pad) if prefix_tokens is not None
                   else torch.zeros(src.size(0), dtype=torch.long, device=src.device))
        # fairseq's limit a * src_len + b, with this row's source length (start token + prompt), not the batch's
        own_src_len = right_padded_lengths(src, self.pad)
        max_steps = (self.max_len_a * own_src_len + self.max_len_b).long().clamp(max=self.max_len - 1)
        if (lengths >= max_steps).any():
            row = int((lengths >= max_steps).nonzero()[0])
            raise ValueError(f"a prompt of {int(lengths[row]) + 1} tokens does not fit the length limit of "
                             f"{int(max_steps[row])} (max_len_a * prompt length + max_len_b, at most the model's "
                             f"{self.max_len}): raise --max-len-b")
        self.model.prompts = None if prefix_tokens is None else prefix_tokens.repeat_interleave(self.beam_size, 0)
        # the decoders' prefill (llama.py) covers the prompt positions all rows share up to their first pad
        self.model.prefilled = (prefilled_length(prefix_tokens, self.pad)
                                if prefix_tokens is not None and len(decoders) == len(self.model.models) else 0)
        self.model.prompt_lengths = lengths.repeat_interleave(self.beam_size)
        self.model.max_steps = max_steps.repeat_interleave(self.beam_size)
        try:
            return super()._generate(sample, prefix_tokens=prefix_tokens, constraints=constraints,
                                     bos_token=bos_token)
        finally:
            for decoder in decoders:
                decoder.set_pending_prompt(None)
