"""The shipped configs compose as fairseq-hydra-train sees them, and the size presets are the real models."""
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "speechgpt_fairseq" / "presets" / "model"


def compose(cli, config: str, *overrides: str) -> dict:
    out = cli("fairseq-hydra-train", "--config-dir", REPO / "examples" / "stage1", "--config-name", config,
              "--cfg", "job", "--resolve", *overrides, cwd=REPO.parent).stdout
    return yaml.safe_load(out)


def test_tiny_config_resolves_paths_relative_to_itself(cli):
    cfg = compose(cli, "tiny")
    assert Path(cfg["task"]["data"]).resolve() == REPO / "examples" / "stage1" / "data-bin"
    assert Path(cfg["common"]["user_dir"]).resolve() == REPO / "user_dir"
    assert cfg["model"] == {**yaml.safe_load((PRESETS / "tiny.yaml").read_text()), **cfg["model"]}
    assert cfg["dataset"]["required_batch_size_multiple"] == 1  # never drop a batch


@pytest.mark.parametrize("config,preset", [("llama_7b", "llama_7b"), ("llama_13b", "llama_13b")])
def test_paper_scale_configs(cli, config, preset):
    cfg = compose(cli, config, "task.data=/data", "lr_scheduler.total_num_update=1000")
    for key, value in yaml.safe_load((PRESETS / f"{preset}.yaml").read_text()).items():
        if key != "checkpoint_activations":  # the one field the paper configs change
            assert cfg["model"][key] == value, key
    assert cfg["common"]["bf16"] and cfg["model"]["checkpoint_activations"]
    # sharded across the GPUs (speechgpt_fairseq/fsdp.py), the output-layer loss in chunks
    assert cfg["distributed_training"]["ddp_backend"] == "fsdp2" and cfg["criterion"]["loss_chunk_tokens"] > 0
    assert cfg["task"]["tokens_per_sample"] == 1024
    sequences = (cfg["dataset"]["batch_size"] * cfg["optimization"]["update_freq"][0]
                 * cfg["distributed_training"]["distributed_world_size"])
    assert sequences == 768  # SpeechGPT's stage-1 batch: 768 blocks of 1024 tokens


@pytest.mark.parametrize("preset", ["llama_7b", "llama_13b", "llama2_7b", "tiny"])
def test_presets_have_the_parameter_count_of_hf_llama(preset):
    """Built on the meta device: our model and HF LlamaForCausalLM of the same shape, LLaMA's 32000 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import speechgpt_fairseq

    speechgpt_fairseq.register()
    from speechgpt_fairseq.data.vocabulary import Vocabulary
    from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

    p = {k: v for k, v in yaml.safe_load((PRESETS / f"{preset}.yaml").read_text()).items() if k != "_name"}
    vocab = Vocabulary._extend(["<unk>", "<s>", "</s>"] + [f"p{i}" for i in range(31997)], 1000, bos=1, eos=2,
                               pad=0, unk=0, kind=None, model=None)

    hf_cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=p["decoder_embed_dim"],
                         intermediate_size=p["decoder_ffn_embed_dim"], num_hidden_layers=p["decoder_layers"],
                         num_attention_heads=p["decoder_attention_heads"],
                         num_key_value_heads=p["decoder_kv_heads"], tie_word_embeddings=False)
    with torch.device("meta"):
        ours = SpeechGPTLlamaModel.from_config(SpeechGPTLlamaConfig(**p), vocab.to_dictionary())
        hf = LlamaForCausalLM(hf_cfg)
    count = sum(t.numel() for t in ours.parameters())
    assert count == sum(t.numel() for t in hf.parameters())
    if preset == "llama_7b":
        assert count == 6_738_415_616 + 2 * 1006 * 4096  # LLaMA-7B plus the 1006 added rows in and out


@pytest.mark.parametrize("stage,config", [("stage1", "tiny"), ("stage1", "llama_7b"), ("stage1", "llama_13b"),
                                          ("stage2", "tiny"), ("stage2", "llama_7b"), ("stage3", "llama_7b"),
                                          ("demo", "stage1"), ("demo", "stage2"), ("demo", "stage3")])
def test_every_field_is_overridable(cli, stage, config):
    """Hydra overrides only keys the config has (our dataclasses register after composition), so the shipped
    configs list every field of their task, model and criterion."""
    from dataclasses import fields

    import speechgpt_fairseq

    speechgpt_fairseq.register()
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    required = {"llama_7b": ["model.lora_base=/b", "optimization.max_update=1", "lr_scheduler.warmup_updates=1"],
                "llama_13b": []}.get(config, []) if stage != "stage1" else ["lr_scheduler.total_num_update=1"]
    out = cli("fairseq-hydra-train", "--config-dir", REPO / "examples" / stage, "--config-name", config,
              "--cfg", "job", "task.data=/d", *required, cwd=REPO.parent).stdout
    cfg = yaml.safe_load(out)
    for section, registry in (("task", TASK_DATACLASS_REGISTRY), ("model", MODEL_DATACLASS_REGISTRY),
                              ("criterion", CRITERION_DATACLASS_REGISTRY)):
        names = {f.name for f in fields(registry[cfg[section]["_name"]])
                 if f.name != "_name" and not str(f.default).startswith("${")}  # interpolated: derived
        assert names <= set(cfg[section]), (section, sorted(names - set(cfg[section])))
