"""The fairseq Dictionary of a Vocabulary: what fairseq's tasks, models and generator index tokens with."""
from __future__ import annotations

from fairseq.data import Dictionary

from speechgpt_fairseq.data.vocabulary import Vocabulary


class SpeechGPTDictionary(Dictionary):
    """A fairseq Dictionary with the vocabulary's ids, specials where the base tokenizer put them."""

    def __init__(self, vocab: Vocabulary):
        t = vocab.tokens
        super().__init__(bos=t[vocab.bos], pad=t[vocab.pad], eos=t[vocab.eos], unk=t[vocab.unk],
                         add_special_symbols=False)
        for token in t:
            self.add_symbol(token)
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = vocab.bos, vocab.pad, vocab.eos, vocab.unk
        self.nspecial = max(vocab.bos, vocab.eos, vocab.unk) + 1 if vocab.base_size else 0
        self.vocab = vocab
