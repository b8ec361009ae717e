from speechgpt_fairseq.tasks.unit_lm import UnitLMTask

__all__ = ["UnitLMTask"]
