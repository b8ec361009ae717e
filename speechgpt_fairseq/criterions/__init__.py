from speechgpt_fairseq.criterions.cross_entropy import SpeechGPTCrossEntropyCriterion

__all__ = ["SpeechGPTCrossEntropyCriterion"]
