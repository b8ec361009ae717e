from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaDecoder, SpeechGPTLlamaModel

__all__ = ["SpeechGPTLlamaConfig", "SpeechGPTLlamaDecoder", "SpeechGPTLlamaModel"]
