"""Hydra presets: model sizes under `model/`, used as `defaults: [{model: llama_7b}]`.

Configs reach them with `hydra.searchpath: [pkg://speechgpt_fairseq.presets]`. Hydra imports this package
while composing such a config, which registers `${speechgpt_config_dir:}`: the absolute --config-dir, so that
the example configs name their data and the --user-dir shim relative to themselves and run from any directory,
and registers speechgpt-fairseq with fairseq: a config is checked against fairseq's schema before fairseq reads
its user_dir, so values of ours (`ddp_backend: fsdp2`, our model, task and criterion names) must exist by then.
"""
from omegaconf import OmegaConf

import speechgpt_fairseq
from speechgpt_fairseq.errors import InputError

speechgpt_fairseq.register()


def config_dir() -> str:
    """The directory given with --config-dir."""
    from hydra.core.hydra_config import HydraConfig

    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            return source.path
    raise InputError("${speechgpt_config_dir:} is only defined when the config comes from --config-dir")


if not OmegaConf.has_resolver("speechgpt_config_dir"):
    OmegaConf.register_new_resolver("speechgpt_config_dir", config_dir)
