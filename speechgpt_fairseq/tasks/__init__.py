import speechgpt_fairseq

speechgpt_fairseq.register()  # the fixes first; then every component, this one included

from speechgpt_fairseq.tasks.instruction import CoMSFTTask, CrossModalSFTTask
from speechgpt_fairseq.tasks.unit_lm import UnitLMTask

__all__ = ["CoMSFTTask", "CrossModalSFTTask", "UnitLMTask"]
