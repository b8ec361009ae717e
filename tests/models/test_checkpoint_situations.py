"""Checkpoints in the tokenizer situations real ones come in (tests/models/conftest.py), converted: special tokens
that fit fairseq, prompts encoded as the checkpoint's own tokenizer encodes them, logits and greedy generations
(Python API and fairseq-generate) equal to transformers', </s> learnt, and rope-scaled models trained and exported
with transformers' logits."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from fairseq import checkpoint_utils
from fairseq.data import MMapIndexedDataset

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.data.instruction_dataset import InstructionDataset
from speechgpt_fairseq.data.instructions import prepare_instructions
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.inference import SpeechGPTGenerator
from speechgpt_fairseq.models.hf import convert_hf, export_hf

MAX_NEW = 12
USER_DIR = Path(__file__).resolve().parents[2] / "user_dir"


def hf_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def hf_greedy(model, ids: list[int], max_new_tokens: int, pad: int, min_new_tokens: int = 0) -> list[int]:
    """transformers' greedy continuation of `ids` (eos ids from generation_config.json), fairseq's padding id
    suppressed where the model has that row (fairseq never emits it)."""
    suppress = [pad] if pad < model.config.vocab_size else None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             do_sample=False, suppress_tokens=suppress)
    return out[0, len(ids):].tolist()


def without_final_eos(ids: list[int], vocab: Vocabulary) -> list[int]:
    """What fairseq keeps of a hypothesis: everything but its final </s> (another eos id stays, as the stop)."""
    return ids[:-1] if ids and ids[-1] == vocab.eos else ids


def test_special_tokens_fit_fairseq(situation):
    vocab = Vocabulary.load(situation.converted)
    assert vocab.tokens[vocab.pad] == situation.pad_token
    speech = {vocab.unit_id(k) for k in range(vocab.num_units)} | {vocab.index[t] for t in ("<sosp>", "<eosp>")}
    assert vocab.pad not in {vocab.bos, *vocab.eos_ids} | speech
    assert [vocab.tokens[i] for i in vocab.eos_ids] == situation.eos_tokens
    assert (vocab.add_bos, vocab.text_encoding) == (situation.add_bos, situation.text_encoding)


def test_prompts_encode_as_the_checkpoints_tokenizer(situation):
    vocab = Vocabulary.load(situation.converted)
    assert [vocab.encode_prompt(t) for t in situation.prompt_texts] == situation.prompt_ids


def test_logits_equal_transformers(situation):
    (ours,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(situation.converted / "checkpoint.pt")])
    hf = hf_model(situation.hf_dir)
    lengths = [len(p) for p in situation.prompt_ids]
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(situation.prompt_ids):
        tokens[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=mask).logits
        got, _ = ours.eval()(tokens)
    real = mask.bool()
    assert (got[..., :expected.size(-1)][real] - expected[real]).abs().max() < 1e-5


def test_greedy_python_api_equals_transformers(situation):
    """Batched prompts of different lengths; the first one ends at its eos, the others at the length limit."""
    model = SpeechGPTGenerator.from_checkpoint(situation.converted / "checkpoint.pt")
    vocab, hf = model.vocab, hf_model(situation.hf_dir)
    ours = model.generate_ids([vocab.encode_prompt(t) for t in situation.prompt_texts], max_new_tokens=MAX_NEW)
    for i, ids in enumerate(situation.prompt_ids):
        theirs = hf_greedy(hf, ids, MAX_NEW, vocab.pad)
        assert ours[i] == without_final_eos(theirs, vocab), f"prompt {i}"
    first = hf_greedy(hf, situation.prompt_ids[0], MAX_NEW, vocab.pad)
    assert vocab.tokens[first[-1]] == situation.stop_token and len(first) < MAX_NEW
    assert model.generate(situation.prompt_texts, max_new_tokens=MAX_NEW) == [vocab.decode(x) for x in ours]
    # min_new_tokens keeps every eos out of the first tokens, as transformers' does: past the early stop here
    longer = model.generate_ids(situation.prompt_ids[:1], max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW - 2)[0]
    assert len(longer) >= MAX_NEW - 2 > len(first)
    assert longer == without_final_eos(hf_greedy(hf, situation.prompt_ids[0], MAX_NEW, vocab.pad, MAX_NEW - 2), vocab)


def instruction_records(situation) -> list[str]:
    return [json.dumps({"prefix": "", "plain_text": f"[Human]: {t.strip()}<eoh> [SpeechGPT]: ok<eoa>"}) + "\n"
            for t in situation.prompt_texts[1:] + situation.prompt_texts[:1]]


# the situations whose prompts and stops differ from LLaMA's (tests/models/test_hf.py runs fairseq-generate on
# sentencepiece and rope-scaled models too)
@pytest.mark.parametrize("situation", ["speechgpt-sp", "json-pad-eos-nobos", "llama3-json-llama3rope"], indirect=True)
def test_fairseq_generate_equals_transformers(situation, cli, stop_reachable, tmp_path):
    """Instruction prompts through prepare-sft and fairseq-generate, against transformers' generate on the same prompt
    ids. The original has no rows for [Human] and the like, so the model is export-hf's, its eos row set so that the
    first prompt stops early, and converted back (which must give the same vocabulary)."""
    vocab = Vocabulary.load(situation.converted)
    (tmp_path / "test.jsonl").write_text("".join(instruction_records(situation)))
    prepare_instructions({"test": tmp_path / "test.jsonl"}, tmp_path / "data", vocab, show_progress=False)
    records = MMapIndexedDataset(str(tmp_path / "data" / "test"))
    segments = MMapIndexedDataset(str(tmp_path / "data" / "test.seg"))
    prompts = [records[i][:int((segments[i] != 2).sum())].tolist() for i in range(len(records))]
    hf_dir = export_hf(situation.converted / "checkpoint.pt", tmp_path / "hf")
    stop_reachable(hf_dir, prompts[0], vocab.index[situation.stop_token])
    again = convert_hf(hf_dir, tmp_path / "fs")
    same = Vocabulary.load(again).to_dict()
    assert same.pop("tokenizer_model") and same == {k: v for k, v in vocab.to_dict().items() if k != "tokenizer_model"}
    out = cli("fairseq-generate", tmp_path / "data", "--user-dir", USER_DIR, "--task", "cross_modal_sft",
              "--stop-text", "", "--path", again / "checkpoint.pt", "--gen-subset", "test", "--beam", "1",
              "--max-len-a", "1", "--max-len-b", MAX_NEW - 1, "--batch-size", "3", "--cpu", cwd=tmp_path).stdout
    hypotheses = {int(m[1]): [vocab.index[t] for t in m[2].split(" ")] if m[2] else []
                  for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", out, re.M)}
    hf = hf_model(hf_dir)
    assert len(hypotheses) == len(prompts)
    for i, prompt in enumerate(prompts):
        assert prompt[:1] == vocab.bos_ids or not situation.add_bos
        theirs = hf_greedy(hf, prompt, MAX_NEW, vocab.pad)
        assert hypotheses[i] == [t for t in without_final_eos(theirs, vocab) if t != vocab.bos], f"record {i}"
        if i == 0:
            assert vocab.tokens[theirs[-1]] == situation.stop_token and len(theirs) < MAX_NEW


def test_training_targets_hold_eos(situation, tmp_path):
    """Every record ends with </s>, which stays a target: the model learns to stop (pad is never eos)."""
    vocab = Vocabulary.load(situation.converted)
    (tmp_path / "train.jsonl").write_text("".join(instruction_records(situation)))
    prepare_instructions({"train": tmp_path / "train.jsonl"}, tmp_path / "data", vocab, show_progress=False)
    data = InstructionDataset(MMapIndexedDataset(str(tmp_path / "data" / "train")),
                              MMapIndexedDataset(str(tmp_path / "data" / "train.seg")), "response", vocab.pad)
    batch = data.collater([data[i] for i in range(len(data))])
    ends = batch["target"].gather(1, (batch["net_input"]["src_lengths"] - 1).unsqueeze(1)).squeeze(1)
    assert ends.tolist() == [vocab.eos] * len(data) and vocab.eos != vocab.pad
    assert batch["net_input"]["src_tokens"][:, 0].eq(vocab.bos).all() == situation.add_bos



@pytest.mark.parametrize("situation", ["json-pad-eos-nobos", "llama3-json-llama3rope", "llama3-json-linearrope"],
                         indirect=True)
def test_trained_checkpoint_exports_with_transformers_logits(situation, cli, tmp_path):
    """Two updates of fairseq-hydra-train from the converted checkpoint (rope scaling, no bos, pad chosen for a
    tokenizer whose pad is its eos); export-hf of the result has our logits in transformers within 1e-5."""
    vocab = Vocabulary.load(situation.converted)
    (tmp_path / "train.jsonl").write_text("".join(instruction_records(situation)))
    prepare_instructions({"train": tmp_path / "train.jsonl"}, tmp_path / "data", vocab, show_progress=False)
    model = yaml.safe_load((situation.converted / "model.yaml").read_text())
    config = {
        "hydra": {"run": {"dir": "."}, "output_subdir": None},
        "common": {"user_dir": str(USER_DIR), "log_format": "simple", "log_interval": 1, "seed": 1},
        "task": {"_name": "cross_modal_sft", "data": str(tmp_path / "data"), "tokens_per_sample": 256},
        "model": model,
        "criterion": {"_name": "speechgpt_cross_entropy"},
        "dataset": {"max_tokens": 1024, "required_batch_size_multiple": 1, "num_workers": 0,
                    "disable_validation": True},
        "optimization": {"max_update": 2, "lr": [0.01]},
        "optimizer": {"_name": "adam"},
        "lr_scheduler": {"_name": "fixed"},
        "checkpoint": {"save_dir": "checkpoints", "finetune_from_model": str(situation.converted / "checkpoint.pt"),
                       "no_epoch_checkpoints": True},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    cli("fairseq-hydra-train", "--config-dir", tmp_path, "--config-name", "train", cwd=tmp_path)
    trained = tmp_path / "checkpoints" / "checkpoint_last.pt"
    before = torch.load(situation.converted / "checkpoint.pt", weights_only=True)["model"]
    after = torch.load(trained, weights_only=False)["model"]
    assert not torch.equal(before["decoder.layers.0.self_attn.q_proj.weight"],
                           after["decoder.layers.0.self_attn.q_proj.weight"])
    (ours,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(trained)])
    hf = hf_model(export_hf(trained, tmp_path / "hf"))
    records = MMapIndexedDataset(str(tmp_path / "data" / "train"))
    tokens = torch.stack([records[i][:8].long() for i in range(len(records))])  # text, units and SpeechGPT tokens
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got, _ = ours.eval()(tokens)
    assert (got - expected).abs().max() < 1e-5
