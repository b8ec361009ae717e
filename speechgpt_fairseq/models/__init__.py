import speechgpt_fairseq

speechgpt_fairseq.register()  # the fixes first; then every component, this one included

from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaDecoder, SpeechGPTLlamaModel

__all__ = ["SpeechGPTLlamaConfig", "SpeechGPTLlamaDecoder", "SpeechGPTLlamaModel"]
