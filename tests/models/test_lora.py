"""LoRA: the wrapped layer, LoRA models and their adapter-only checkpoints, PEFT adapters in (merged or kept as
LoRA) against PEFT's own merge, export merging, and training only the adapters with fairseq's trainer."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.checkpoints import ModelConfigError, fairseq_checkpoint
from speechgpt_fairseq.models.hf import HFCheckpointError, convert_hf, export_hf, import_peft
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel
from speechgpt_fairseq.models.lora import LORA_TARGETS, LoRAError, LoRALinear, is_lora_key

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "examples" / "stage1"


def load(checkpoint: Path, **overrides):
    (model,), _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides=overrides)
    return model.eval(), task


def batch(ids_range: int, lengths=(12, 7, 3)):
    """Random ids below `ids_range`, right-padded, and the mask of real tokens."""
    g = torch.Generator().manual_seed(1)
    tokens, mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long), torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        tokens[i, :n], mask[i, :n] = torch.randint(3, ids_range, (n,), generator=g), 1
    return tokens, mask


def randomize_lora_b(model: torch.nn.Module, std: float = 0.1) -> None:
    """Non-zero B matrices, so that an adapter changes the model and a test that ignores it fails."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * std


def make_peft_adapter(hf_dir: Path, out: Path, targets, rslora: bool = False, r: int = 4, alpha: float = 8.0):
    """A PEFT LoRA adapter saved the way PEFT publishes one, and PEFT's own merged model of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
    peft_model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.1, target_modules=list(targets),
                                               use_rslora=rslora))
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(out)
    return out, peft_model.merge_and_unload().eval()


def assert_logits_equal(model, reference, vocab: int, dtype: torch.dtype = torch.float32) -> None:
    """Equal logits (within 1e-5) on a right-padded batch of tokens below `vocab`; either model is ours or HF's.
    An unmerged LoRA model sums W x + B A x where a merged one computes (W + B A) x: in fp32 the two roundings
    differ by about 1e-5 on these models' logits (as far as fp32 itself is from fp64), so that comparison runs
    in fp64."""
    tokens, mask = batch(vocab)

    def logits(m):
        m = copy.deepcopy(m).to(dtype)
        with torch.no_grad():
            out = m(tokens)[0] if isinstance(m, SpeechGPTLlamaModel) else m(input_ids=tokens, attention_mask=mask).logits
        return out[..., :vocab][mask.bool()]

    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)


# ---- the layer ---------------------------------------------------------------------------------------
def test_lora_linear_starts_equal_merges_and_drops_out_only_its_own_path():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=False)
    x = torch.randn(5, 16)
    expected = base(x).detach()
    lora = LoRALinear(base, rank=4, alpha=8.0, dropout=0.5)
    assert lora.weight is base.weight and lora.lora_A.shape == (4, 16) and lora.lora_B.shape == (24, 4)
    assert lora.lora_A.abs().sum() > 0 and lora.scaling == 2.0
    assert torch.equal(lora.train()(x), expected)  # B = 0: equal to the base, dropout or not
    randomize_lora_b(lora)
    lora.eval()
    assert (lora(x) - expected).abs().max() > 1e-2
    torch.testing.assert_close(lora.merge()(x), lora(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), expected + x @ lora.lora_A.T @ lora.lora_B.T * 2.0, atol=1e-6, rtol=0)
    assert not torch.allclose(lora.train()(x), lora.eval()(x))  # dropout acts on the LoRA input in training


# ---- LoRA models and their checkpoints ----------------------------------------------------------------
@pytest.fixture(scope="module")
def base_fs(make_hf_llama, sentencepiece_model, tmp_path_factory) -> Path:
    """A converted tiny LLaMA (GQA, untied) with its HF directory beside it."""
    root = tmp_path_factory.mktemp("lora_base")
    convert_hf(make_hf_llama(root / "hf", sentencepiece_model, kv_heads=2), root / "fs", num_units=20)
    return root / "fs"


def lora_model(base_fs: Path, with_base: bool = True, **overrides):
    overrides = {"lora_rank": 4, "lora_alpha": 8.0, "lora_target_modules": "q_proj,k_proj,down_proj",
                 **({"lora_base": str(base_fs / "checkpoint.pt")} if with_base else {}), **overrides}
    return load(base_fs / "checkpoint.pt", **overrides)


def test_lora_model_starts_equal_to_its_base_and_trains_only_the_adapters(base_fs):
    plain, task = load(base_fs / "checkpoint.pt")
    for with_base in (True, False):  # base from lora_base, or from a plain checkpoint loaded into a LoRA model
        lora, _ = lora_model(base_fs, with_base)
        tokens, _ = batch(len(task.vocab))
        with torch.no_grad():
            assert torch.equal(lora(tokens)[0], plain(tokens)[0])
        trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
        assert trainable == {f"decoder.layers.{i}.{m}.lora_{ab}" for i in range(2) for ab in "AB"
                             for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}
        assert all(lora.get_parameter(n).abs().sum() > 0 for n in trainable if n.endswith("lora_A"))
    assert set(lora_model(base_fs)[0].state_dict()) == trainable | {"decoder.vocab_digest"}
    assert len(lora_model(base_fs, with_base=False)[0].state_dict()) > len(trainable) + 1  # full without a base


def test_adapter_only_checkpoint_round_trip(base_fs, tmp_path):
    trained, task = lora_model(base_fs)
    randomize_lora_b(trained)
    cfg = SpeechGPTLlamaConfig(**{k: v for k, v in trained.decoder.cfg.items() if k != "_name"})
    vocab = Vocabulary.load(base_fs)
    adapter = trained.state_dict()
    torch.save(fairseq_checkpoint(adapter, cfg, vocab, str(base_fs)), tmp_path / "adapter.pt")
    assert (tmp_path / "adapter.pt").stat().st_size < (base_fs / "checkpoint.pt").stat().st_size / 10
    tokens, _ = batch(len(task.vocab))
    with torch.no_grad():
        expected = trained(tokens)[0]
        assert (expected - load(base_fs / "checkpoint.pt")[0](tokens)[0]).abs().max() > 1e-2
        assert torch.equal(load(tmp_path / "adapter.pt")[0](tokens)[0], expected)

        # a full state dict (base + adapters) loads too, into a LoRA model with or without a base
        full = torch.nn.Module.state_dict(trained)
        for with_base in (True, False):
            model, _ = lora_model(base_fs, with_base)
            model.load_state_dict(full, strict=True)
            assert torch.equal(model(tokens)[0], expected)

        # export-hf merges a full LoRA checkpoint as well as an adapter-only one
        torch.save(fairseq_checkpoint(full, SpeechGPTLlamaConfig(**{**vars(cfg), "lora_base": ""}), vocab,
                                      str(base_fs)), tmp_path / "full.pt")
        from transformers import LlamaForCausalLM

        for name in ("adapter.pt", "full.pt"):
            hf = LlamaForCausalLM.from_pretrained(export_hf(tmp_path / name, tmp_path / f"hf-{name}")).eval()
            assert_logits_equal(trained, hf, len(task.vocab), torch.float64)  # see assert_logits_equal

    # what does not fit is refused with the reason
    with pytest.raises(ModelConfigError, match="lora_base is not set"):
        lora_model(base_fs, with_base=False)[0].load_state_dict(adapter)
    other_vocab = {**adapter, "decoder.vocab_digest": adapter["decoder.vocab_digest"].flip(0)}
    with pytest.raises(ModelConfigError, match="vocabulary"):
        lora_model(base_fs)[0].load_state_dict(other_vocab)
    with pytest.raises(ModelConfigError, match="set lora_rank to the checkpoint's"):
        lora_model(base_fs, lora_rank=8)[0].load_state_dict(adapter)


def test_bad_lora_settings_are_refused_when_the_model_is_built(base_fs, tmp_path):
    dictionary = Vocabulary.load(base_fs).to_dictionary()
    tiny = dict(decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=160, decoder_attention_heads=4,
                decoder_kv_heads=2, max_target_positions=256)

    def build(**lora):
        return SpeechGPTLlamaModel.from_config(SpeechGPTLlamaConfig(**{**tiny, **lora}), dictionary)

    with pytest.raises(ModelConfigError, match="lora_rank .-1. must be 0"):
        build(lora_rank=-1)
    with pytest.raises(ModelConfigError, match=r"lora_target_modules: .*\['wq'\].*expected .*q_proj"):
        build(lora_rank=4, lora_target_modules="q_proj,wq")
    with pytest.raises(ModelConfigError, match="lora_base is set .* but lora_rank is 0"):
        build(lora_base=str(base_fs / "checkpoint.pt"))
    with pytest.raises(LoRAError, match=f"lora_base {tmp_path / 'nowhere.pt'}: no such checkpoint file"):
        build(lora_rank=4, lora_base=str(tmp_path / "nowhere.pt"))
    torch.save(fairseq_checkpoint(lora_model(base_fs, with_base=False)[0].state_dict(),
                                  SpeechGPTLlamaConfig(**tiny, lora_rank=4), Vocabulary.load(base_fs), str(base_fs)),
               tmp_path / "lora.pt")
    with pytest.raises(LoRAError, match="holds LoRA weights; a base must be a plain checkpoint"):
        build(lora_rank=4, lora_base=str(tmp_path / "lora.pt"))
    with pytest.raises(ModelConfigError, match=r"lora_base .*: the checkpoint does not fit"):
        build(lora_rank=4, lora_base=str(base_fs / "checkpoint.pt"), decoder_ffn_embed_dim=96)
    assert build(lora_rank=4, lora_base=str(base_fs / "checkpoint.pt")).adapter_only


# ---- PEFT adapters in --------------------------------------------------------------------------------
ADAPTERS = [("all-linear", LORA_TARGETS, False), ("qv-rslora", ("q_proj", "v_proj"), True)]


@pytest.fixture(scope="session", params=ADAPTERS, ids=[a[0] for a in ADAPTERS])
def peft_adapter(request, hf_llama, tmp_path_factory):
    _, targets, rslora = request.param
    return make_peft_adapter(hf_llama, tmp_path_factory.mktemp("peft") / "adapter", targets, rslora=rslora)


def test_imported_adapter_equals_peft_merged_kept_and_exported(hf_llama, converted, peft_adapter, tmp_path):
    from transformers import LlamaForCausalLM

    adapter, peft_merged = peft_adapter
    base_vocab = peft_merged.config.vocab_size
    merged = import_peft(converted, tmp_path / "merged", adapter, merge=True)
    kept = import_peft(converted / "checkpoint.pt", tmp_path / "lora", adapter)
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint.pt", "model.yaml", "vocab.json"]

    assert_logits_equal(load(merged / "checkpoint.pt")[0], peft_merged, base_vocab)
    lora, _ = load(kept / "checkpoint.pt")
    assert lora.adapter_only and lora.decoder.cfg.lora_base == str((converted / "checkpoint.pt").resolve())
    assert_logits_equal(lora, peft_merged, base_vocab, torch.float64)
    assert_logits_equal(LlamaForCausalLM.from_pretrained(export_hf(kept / "checkpoint.pt", tmp_path / "hf")).eval(),
                           peft_merged, base_vocab)
    # the adapter matters: the base alone is far from PEFT's merged model
    with pytest.raises(AssertionError):
        assert_logits_equal(load(converted / "checkpoint.pt")[0], peft_merged, base_vocab)
    weights = torch.load(kept / "checkpoint.pt", weights_only=True)["model"]
    assert all(is_lora_key(k) or k == "decoder.vocab_digest" for k in weights)


def test_import_peft_command(base_fs, cli, tmp_path):
    adapter, _ = make_peft_adapter(base_fs.parent / "hf", tmp_path / "adapter", ("q_proj", "o_proj"))
    cli("speechgpt", "import-peft", base_fs, tmp_path / "out", "--adapter", adapter)
    cfg = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["cfg"]["model"]
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_target_modules"]) == (
        4, 8.0, 0.1, "q_proj,o_proj")
    assert "lora_rank: 4" in (tmp_path / "out" / "model.yaml").read_text()
    run = cli("speechgpt", "import-peft", base_fs, tmp_path / "out", "--adapter", adapter, check=False)
    assert run.returncode == 1 and "exists and is not empty" in run.stderr

    # adapter_model.bin (older PEFT releases) reads the same as adapter_model.safetensors
    from safetensors.torch import load_file

    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    shutil.copy(adapter / "adapter_config.json", as_bin)
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), as_bin / "adapter_model.bin")
    cli("speechgpt", "import-peft", base_fs / "checkpoint.pt", tmp_path / "merged-bin", "--adapter", as_bin, "--merge")
    a = torch.load(import_peft(base_fs, tmp_path / "merged", adapter, merge=True) / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "merged-bin" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["cfg"]["model"]["lora_rank"] == 0


def test_bad_adapters_are_refused_naming_the_file(base_fs, tmp_path):
    good, _ = make_peft_adapter(base_fs.parent / "hf", tmp_path / "good", ("q_proj", "v_proj"))
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(good, d)
        (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return d

    def refused(adapter, match, base=base_fs):
        with pytest.raises((HFCheckpointError, LoRAError), match=match):
            import_peft(base, tmp_path / "out", adapter)
        assert not (tmp_path / "out").exists()

    conf = "adapter_config.json: unsupported adapter: "
    refused(variant("fan", fan_in_fan_out=True), f"{tmp_path / 'fan'}/{conf}fan_in_fan_out true")
    refused(variant("bias", bias="lora_only"), f"{conf}bias 'lora_only'")
    refused(variant("save", modules_to_save=["lm_head"]), r"modules_to_save \['lm_head'\]")
    refused(variant("prefix", peft_type="PREFIX_TUNING"), "peft_type 'PREFIX_TUNING'")
    refused(variant("dora", use_dora=True), "use_dora")
    refused(variant("targets", target_modules=["q_proj"]),
            r"target_modules \['q_proj'\] selects \['q_proj'\] but adapter_model.safetensors holds adapters for "
            r"\['q_proj', 'v_proj'\]")
    assert import_peft(base_fs, tmp_path / "regex-out", variant("regex", target_modules=r".*\.(q_proj|v_proj)"))

    refused(tmp_path / "missing", "no such directory .expected a PEFT LoRA adapter")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no adapter_config.json")
    noweights = variant("noweights")
    (noweights / "adapter_model.safetensors").unlink()
    refused(noweights, "no adapter_model.safetensors or adapter_model.bin")

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / "adapter_model.safetensors"))
    extra = variant("extra")
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
              str(extra / "adapter_model.safetensors"))
    refused(extra, f"{extra / 'adapter_model.safetensors'}: unexpected weight 'base_model.model.lm_head.lora_A.weight'")
    uneven = variant("uneven")
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k},
              str(uneven / "adapter_model.safetensors"))
    refused(uneven, r"adapters differ between layers .*layer 1: \['q_proj'\]")
    bigger = variant("bigger", r=8)
    refused(bigger, r"lora_A is \(4, 64\), expected \(8, 64\)")
    lora_ckpt = import_peft(base_fs, tmp_path / "lora", good)
    refused(good, "a LoRA checkpoint .lora_rank 4.; the base must hold plain weights", base=lora_ckpt)


# ---- training the adapters with fairseq's trainer ---------------------------------------------------------
QUICK = ["task.tokens_per_sample=64", "dataset.batch_size=4", "common.log_interval=1", "common.seed=3",
         "dataset.disable_validation=true"]


def train(cli, cwd: Path, *overrides):
    cwd.mkdir(exist_ok=True)
    return cli("fairseq-hydra-train", "--config-dir", STAGE1, "--config-name", "tiny", *QUICK, *overrides, cwd=cwd)


def test_stage1_with_lora_trains_only_the_adapters_and_resumes(cli, tmp_path):
    train(cli, tmp_path / "full", "optimization.max_update=2")
    base = tmp_path / "full" / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt"
    lora = ["model.lora_rank=4", f"model.lora_base={base}", "lr_scheduler.total_num_update=8",
            "checkpoint.save_interval_updates=4"]
    train(cli, tmp_path / "straight", *lora, "optimization.max_update=8")
    train(cli, tmp_path / "resumed", *lora, "optimization.max_update=4")
    run = train(cli, tmp_path / "resumed", *lora, "optimization.max_update=8")
    assert "Loaded checkpoint" in run.stdout + run.stderr

    ckpts = [tmp_path / d / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt" for d in ("straight", "resumed")]
    straight, resumed = (torch.load(c, weights_only=True) for c in ckpts)
    adapters = {f"decoder.layers.{i}.self_attn.{m}.lora_{ab}" for i in range(2) for m in ("q_proj", "v_proj")
                for ab in "AB"}
    assert set(resumed["model"]) == adapters | {"decoder.vocab_digest"}  # adapter-only
    assert resumed["optimizer_history"][-1]["num_updates"] == 8
    # fairseq's optimizer was given the adapters and nothing else
    assert len(resumed["last_optimizer_state"]["param_groups"][0]["params"]) == len(adapters)
    for name in adapters:
        assert torch.equal(straight["model"][name], resumed["model"][name]), name
    assert all(resumed["model"][n].abs().sum() > 0 for n in adapters)  # B moved away from zero

    # the model the checkpoint loads is the untouched base plus the trained adapters
    (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(ckpts[1])], arg_overrides={"data": str(STAGE1 / "data-bin")})
    full = torch.nn.Module.state_dict(model)
    for name, tensor in torch.load(base, weights_only=True)["model"].items():
        assert torch.equal(full[name], tensor), name
    assert torch.equal(full["decoder.layers.1.self_attn.v_proj.lora_B"],
                       resumed["model"]["decoder.layers.1.self_attn.v_proj.lora_B"])
