from speechgpt_fairseq.tasks.instruction import CoMSFTTask, CrossModalSFTTask
from speechgpt_fairseq.tasks.unit_lm import UnitLMTask

__all__ = ["CoMSFTTask", "CrossModalSFTTask", "UnitLMTask"]
