"""fairseq's SequenceGenerator, with the forced prompt run through the decoder in one forward pass.

fairseq feeds a prompt (`prefix_tokens`) one token per step. Before generating, this generator hands the
prompt to every decoder that accepts it (`set_pending_prompt`); the decoder then encodes all positions the
batch's prompts share at the first step and serves the following prompt steps from that pass.
"""
from __future__ import annotations

from fairseq.sequence_generator import SequenceGenerator


class PromptPrefillGenerator(SequenceGenerator):
    def _generate(self, sample, prefix_tokens=None, constraints=None, bos_token=None):
        decoders = [m.decoder for m in self.model.models if hasattr(m.decoder, "set_pending_prompt")]
        for decoder in decoders:
            decoder.set_pending_prompt(prefix_tokens)
        try:
            return super()._generate(sample, prefix_tokens=prefix_tokens, constraints=constraints,
                                     bos_token=bos_token)
        finally:
            for decoder in decoders:
                decoder.set_pending_prompt(None)
