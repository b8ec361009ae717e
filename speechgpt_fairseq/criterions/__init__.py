import speechgpt_fairseq

speechgpt_fairseq.register()  # the fixes first; then every component, this one included

from speechgpt_fairseq.criterions.cross_entropy import SpeechGPTCrossEntropyCriterion

__all__ = ["SpeechGPTCrossEntropyCriterion"]
