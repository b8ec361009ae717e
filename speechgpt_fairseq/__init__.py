"""speechgpt-fairseq: SpeechGPT (a LLaMA that reads and writes discrete speech units) as a fairseq plugin.

Importing the package applies the fairseq fixes, adds the `fsdp2` ddp_backend (fsdp.py), and registers the
`speechgpt_llama` model, the `unit_lm` task, the `speechgpt_cross_entropy` criterion and the `speechgpt_adamw`
optimizer. fairseq's --user-dir loader does not import criterions itself, so all are imported here.
"""
from speechgpt_fairseq import fairseq_fixes, fsdp

fairseq_fixes.apply()
fsdp.install()

from speechgpt_fairseq import criterions, models, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
