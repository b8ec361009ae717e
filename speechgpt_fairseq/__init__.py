"""speechgpt-fairseq: SpeechGPT (a LLaMA that reads and writes discrete speech units) as a fairseq plugin.

Importing the package loads nothing heavy (the `speechgpt` verbs that need no model start at once). `register()`
makes it a fairseq plugin: it applies the fairseq fixes (fairseq_fixes.py), adds the `fsdp2` ddp_backend
(fsdp.py), and registers the `speechgpt_llama` model, the `unit_lm`, `cross_modal_sft` and `com_sft` tasks, the
`speechgpt_cross_entropy` criterion and the `speechgpt_adamw` optimizer. The --user-dir shim calls it, and so does
importing any of our modules that run fairseq code (models, tasks, criterions, the Python generation API), and
loading a HuBERT or vocoder checkpoint; calling it again does nothing.
"""
__version__ = "0.1.0"
_registered = False


def register() -> None:
    """Apply the fairseq fixes, add the fsdp2 backend and register every component (once)."""
    global _registered
    if _registered:  # also when a module this imports calls it again
        return
    _registered = True
    from speechgpt_fairseq import fairseq_fixes, fsdp

    fairseq_fixes.apply()
    fsdp.install()
    # fairseq's --user-dir loader does not import criterions itself: all three are imported here
    from speechgpt_fairseq import criterions, models, tasks  # noqa: F401  (registration by import)
