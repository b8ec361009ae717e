"""speechgpt-fairseq: SpeechGPT (a LLaMA that reads and writes discrete speech units) as a fairseq plugin.

Importing the package applies the fairseq fixes and registers the `speechgpt_llama` model, the `unit_lm`
task and the `speechgpt_cross_entropy` criterion. fairseq's --user-dir loader does not import criterions
itself, so all three are imported here.
"""
from speechgpt_fairseq import fairseq_fixes

fairseq_fixes.apply()

from speechgpt_fairseq import criterions, models, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
