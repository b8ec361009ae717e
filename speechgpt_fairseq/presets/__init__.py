"""Hydra presets: model sizes under `model/`, used as `defaults: [{model: llama_7b}]`.

Configs reach them with `hydra.searchpath: [pkg://speechgpt_fairseq.presets]`. Hydra imports this package
while composing such a config, which registers `${speechgpt_config_dir:}`: the absolute --config-dir, so that
the example configs name their data and the --user-dir shim relative to themselves and run from any directory.
"""
from omegaconf import OmegaConf


def config_dir() -> str:
    """The directory given with --config-dir."""
    from hydra.core.hydra_config import HydraConfig

    for source in HydraConfig.get().runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            return source.path
    raise ValueError("${speechgpt_config_dir:} is only defined when the config comes from --config-dir")


if not OmegaConf.has_resolver("speechgpt_config_dir"):
    OmegaConf.register_new_resolver("speechgpt_config_dir", config_dir)
