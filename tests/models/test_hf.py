"""Hugging Face interop on tiny random LlamaForCausalLM models (MHA/GQA, tied/untied, rope theta, both
tokenizer kinds): equal logits, equal greedy generations, exact round trips, clear errors."""
import json
import shutil

import pytest
import torch
from fairseq import checkpoint_utils
from safetensors.torch import load_file

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.atomic_files import OutputExistsError
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.hf import HFCheckpointError, convert_hf, export_hf


def load_ours(converted):
    (model,), _, task = checkpoint_utils.load_model_ensemble_and_task([str(converted / "checkpoint.pt")])
    return model.eval(), task


def right_padded_batch(ids_range: int, lengths=(12, 7, 3)):
    """Random ids below `ids_range`, right-padded (the padding id does not matter: it is masked or ignored)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, ids_range, (n,), generator=g) for n in lengths]
    batch = torch.full((len(rows), max(lengths)), 0)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, :len(r)], mask[i, :len(r)] = r, 1
    return batch, mask


def test_logits_equal_hf_on_a_right_padded_batch(hf_llama, converted):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_llama, attn_implementation="sdpa").eval()
    ours, task = load_ours(converted)
    base = hf.config.vocab_size
    tokens, mask = right_padded_batch(base)
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=mask).logits
        got, _ = ours(tokens)
    real = mask.bool()
    assert got.shape[-1] == len(task.vocab) > base
    torch.testing.assert_close(got[..., :base][real], expected[real], atol=1e-5, rtol=0)


def test_exported_model_equals_ours_on_unit_tokens(converted, tmp_path):
    from transformers import LlamaForCausalLM

    exported = export_hf(converted / "checkpoint.pt", tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(exported).eval()
    ours, task = load_ours(converted)
    tokens, mask = right_padded_batch(len(task.vocab))  # text, units and SpeechGPT tokens
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=mask).logits
        got, _ = ours(tokens)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_fairseq_generate_equals_hf_generate(converted, tmp_path, cli):
    """Greedy decoding of unit prompts through fairseq-generate (prompt prefilled) and HF generate."""
    from transformers import LlamaForCausalLM

    prompts = ["<sosp><1><2><3>", "<sosp><4><5><6><7><8><9><10><11>", "<sosp><12>", "<sosp><13><19><0><5><5>"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cli("speechgpt", "prepare-units", f"test={tmp_path / 'prompts.txt'}", "--out", tmp_path / "data",
        "--vocab", converted, "--open", "test", "--no-progress")
    max_len = 24
    out = cli("fairseq-generate", tmp_path / "data", "--user-dir", speechgpt_user_dir(), "--task", "unit_lm",
              "--sample-break-mode", "eos", "--path", converted / "checkpoint.pt", "--gen-subset", "test",
              "--beam", "1", "--max-len-a", "0", "--max-len-b", max_len, "--batch-size", "3", "--cpu",
              cwd=tmp_path).stdout
    vocab = Vocabulary.load(converted)
    ours, n_scores = {}, {}
    for line in out.splitlines():
        if line.startswith("H-"):
            key, _score, text = line.split("\t")
            ours[int(key[2:])] = [vocab.index[t] for t in text.split(" ")]
        if line.startswith("P-"):
            key, scores = line.split("\t")
            n_scores[int(key[2:])] = len(scores.split(" "))  # one per token, bos and eos included
    assert len(ours) == len(prompts)

    hf = LlamaForCausalLM.from_pretrained(export_hf(converted / "checkpoint.pt", tmp_path / "hf")).eval()
    for i, prompt in enumerate(prompts):
        ids = vocab.encode_prompt(prompt)  # bos first only where the tokenizer adds it
        with torch.no_grad():
            full = hf.generate(torch.tensor([ids]), max_new_tokens=max_len - (len(ids) - 1), do_sample=False,
                               suppress_tokens=[vocab.pad],  # fairseq never emits pad (LLaMA's pad is <unk>)
                               eos_token_id=vocab.eos, pad_token_id=vocab.pad)[0].tolist()
        if full[-1] == vocab.eos:
            full = full[:-1]
        assert len(full) > len(ids)
        # a hypothesis holds what follows the prompt's first token; fairseq-generate prints it without bos
        # symbols, and the count of positional scores has them all (and the final eos)
        assert ours[i] == [t for t in full[1:] if t != vocab.bos], f"prompt {i}"
        assert n_scores[i] == len(full), f"prompt {i}"


def test_export_then_import_reproduces_every_tensor(converted, tmp_path):
    again = convert_hf(export_hf(converted / "checkpoint.pt", tmp_path / "hf"), tmp_path / "again")
    a = torch.load(converted / "checkpoint.pt", weights_only=True)
    b = torch.load(again / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert tensor.dtype == b["model"][name].dtype and torch.equal(tensor, b["model"][name]), name
    va, vb = Vocabulary.load(converted), Vocabulary.load(again)
    assert (va.tokens, va.bos, va.eos, va.pad, va.unk, va.num_units) == (vb.tokens, vb.bos, vb.eos, vb.pad, vb.unk,
                                                                          vb.num_units)
    text = "[Human]: hello, café 123 <sosp><1><2><eosp><eoh>"
    assert va.encode(text) == vb.encode(text)
    assert a["cfg"]["model"] == b["cfg"]["model"]


def test_new_rows_start_at_the_mean_of_the_old(hf_llama, converted):
    original = load_file(str(hf_llama / "model.safetensors"))["model.embed_tokens.weight"]
    ours = torch.load(converted / "checkpoint.pt", weights_only=True)["model"]["decoder.embed_tokens.weight"]
    n = original.size(0)
    assert torch.equal(ours[:n], original)
    new = ours[n:]
    assert (new.mean(0) - original.mean(0)).abs().max() < 0.05 * original.std(0).max()
    assert len({tuple(r.tolist()) for r in new}) == len(new)  # distinct rows


def test_sharded_and_bin_checkpoints_convert_the_same(make_hf_llama, sentencepiece_model, tmp_path):
    ref_dir = make_hf_llama(tmp_path / "ref", sentencepiece_model, kv_heads=2)
    ref = torch.load(convert_hf(ref_dir, tmp_path / "ref_fs") / "checkpoint.pt", weights_only=True)["model"]
    weights = load_file(str(ref_dir / "model.safetensors"))
    for kind in ("safetensors", "bin"):
        d = tmp_path / f"sharded_{kind}"
        shutil.copytree(ref_dir, d)
        (d / "model.safetensors").unlink()
        names = sorted(weights)
        halves = {f"part-1.{kind}": names[: len(names) // 2], f"part-2.{kind}": names[len(names) // 2:]}
        for fname, keys in halves.items():
            part = {k: weights[k] for k in keys}
            if kind == "bin":
                torch.save(part, d / fname)
            else:
                from safetensors.torch import save_file
                save_file(part, str(d / fname))
        index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        (d / index).write_text(json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
        got = torch.load(convert_hf(d, tmp_path / f"fs_{kind}") / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.equal(got[k], ref[k]) for k in ref), kind


def test_released_speechgpt_layout_keeps_its_vocabulary(make_hf_llama, sentencepiece_model, tmp_path):
    """A checkpoint whose tokenizer and embeddings already hold the units and SpeechGPT tokens (like
    SpeechGPT-7B-cm, vocabulary 33006) converts without adding rows."""
    first = convert_hf(make_hf_llama(tmp_path / "base", sentencepiece_model), tmp_path / "fs1", num_units=20)
    released = export_hf(first / "checkpoint.pt", tmp_path / "released")
    second = convert_hf(released, tmp_path / "fs2")
    a = torch.load(first / "checkpoint.pt", weights_only=True)["model"]["decoder.embed_tokens.weight"]
    b = torch.load(second / "checkpoint.pt", weights_only=True)["model"]["decoder.embed_tokens.weight"]
    assert torch.equal(a, b) and Vocabulary.load(second).num_units == 20


def test_bad_hf_directories(make_hf_llama, sentencepiece_model, tmp_path):
    with pytest.raises(HFCheckpointError, match="no such directory"):
        convert_hf(tmp_path / "missing", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFCheckpointError, match="no config.json"):
        convert_hf(tmp_path / "empty", tmp_path / "o2")
    good = make_hf_llama(tmp_path / "good", sentencepiece_model)
    config = json.loads((good / "config.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(good, d)
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return d

    with pytest.raises(HFCheckpointError, match="expected a LLaMA"):
        convert_hf(variant("gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"]), tmp_path / "o3")
    with pytest.raises(HFCheckpointError, match="rope scaling 'dynamic' \\(supported: default, linear, llama3\\)"):
        convert_hf(variant("dynamic", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), tmp_path / "o4")
    with pytest.raises(HFCheckpointError, match="rope scaling 'llama3' without \\['low_freq_factor'"):
        convert_hf(variant("llama3", rope_scaling={"rope_type": "llama3", "factor": 8.0}), tmp_path / "o4")
    with pytest.raises(HFCheckpointError, match="do not match config.json"):
        convert_hf(variant("wider", hidden_size=128), tmp_path / "o5")
    noweights = variant("noweights")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="no weights found"):
        convert_hf(noweights, tmp_path / "o6")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing half-written


def test_overwrite_never_removes_an_input_or_the_working_directory(cli, make_hf_llama, sentencepiece_model,
                                                                     tmp_path):
    """The three ways --overwrite lost data: into the HF input, into the checkpoint's own directory, into `.`."""
    def snapshot(path):
        return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

    hf = make_hf_llama(tmp_path / "hf", sentencepiece_model)
    converted = cli("speechgpt", "convert-hf", hf, tmp_path / "fs", "--num-units", 20).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    runs = [("convert-hf", hf, hf), ("export-hf", tmp_path / "fs" / "checkpoint.pt", tmp_path / "fs"),
            ("convert-hf", hf, ".")]
    for verb, source, out in runs:
        run = cli("speechgpt", verb, source, out, "--overwrite", cwd=work, check=False)
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert "input" in run.stderr.splitlines()[-1] or "working directory" in run.stderr.splitlines()[-1]
    assert converted and snapshot(tmp_path) == before


def test_existing_output_is_not_overwritten(make_hf_llama, sentencepiece_model, tmp_path):
    """Not without --overwrite; with it, only an OUT holding nothing but what the verb writes."""
    hf = make_hf_llama(tmp_path / "hf", sentencepiece_model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        convert_hf(hf, out)
    with pytest.raises(OutputExistsError, match="holds 'keep.txt', which this command does not write"):
        convert_hf(hf, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    convert_hf(hf, out, num_units=20)
    convert_hf(hf, out, num_units=30, overwrite=True)  # its own earlier output is replaced
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "model.yaml", "vocab.json"]
    assert Vocabulary.load(out).num_units == 30
    exported = tmp_path / "exported"
    export_hf(out / "checkpoint.pt", exported)
    (exported / "README.md").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds 'README.md', which this command does not write"):
        export_hf(out / "checkpoint.pt", exported, overwrite=True)
    (exported / "README.md").unlink()
    export_hf(out / "checkpoint.pt", exported, overwrite=True)


def speechgpt_user_dir():
    from pathlib import Path
    return Path(__file__).resolve().parents[2] / "user_dir"
