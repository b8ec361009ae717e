"""The LLaMA decoder: the cache's prefill and steps agree with the full forward pass; configs and checkpoints that
do not fit are refused."""
import pytest
import torch
import torch.nn.functional as F

import speechgpt_fairseq

speechgpt_fairseq.register()
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.checkpoints import ModelConfigError
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel


def build(kv_heads=2, tied=False, vocab=None, **kw):
    torch.manual_seed(0)
    vocab = vocab or Vocabulary.units_only(40)
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                               decoder_attention_heads=4, decoder_kv_heads=kv_heads,
                               share_decoder_input_output_embed=tied, init_std=0.3, **kw)
    return SpeechGPTLlamaModel.from_config(cfg, vocab.to_dictionary()).eval()


def last_logits(model, rows: list[torch.Tensor]) -> torch.Tensor:
    """Each row alone through the full forward pass: the logits after its last token (B, V)."""
    with torch.no_grad():
        return torch.stack([model(r.unsqueeze(0))[0][0, -1] for r in rows])


@pytest.mark.parametrize("kv_heads,tied,lengths", [(4, False, (7, 2, 5)), (2, True, (7, 2, 5)), (1, False, (7, 2, 5)),
                                                   (2, False, (4, 4, 4))])
def test_prefill_and_steps_equal_the_full_forward_pass(kv_heads, tied, lengths):
    """Prompts prefilled together (left-padded where their lengths differ), then one token per row per step, then
    several tokens per row at once onto the filled cache (chunked prefill, a conversation's next turn)."""
    model = build(kv_heads, tied)
    rows = [torch.randint(3, 49, (n,)) for n in lengths]
    d = model.decoder
    cache = d.new_cache(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(d.prefill(rows, cache), last_logits(model, rows), atol=1e-5, rtol=0)
        for _ in range(2):
            new = torch.randint(3, 49, (3, 1))
            rows = [torch.cat([r, n]) for r, n in zip(rows, new)]
            torch.testing.assert_close(d.step(new, cache), last_logits(model, rows), atol=1e-5, rtol=0)
        new = torch.randint(3, 49, (3, 4))
        got = d.step(new, cache, every_position=True)  # (B, 4, V)
        for r, n, g in zip(rows, new, got):
            full = model(torch.cat([r, n]).unsqueeze(0))[0][0, -4:]
            torch.testing.assert_close(g, full, atol=1e-5, rtol=0)


def test_generation_fuses_projections_in_place_and_training_goes_on():
    """A cache made without gradients fuses each layer's q/k/v and gate/up weights into one tensor each (a step
    reads them in two matmuls instead of five), in place: the same Parameters and values. Training afterwards
    updates what the fused tensors read; a dtype change gives the weights storage of their own again, and the next
    cache fuses them anew."""
    model = build()
    d, attn, mlp = model.decoder, model.decoder.layers[1].self_attn, model.decoder.layers[1].mlp
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [torch.randint(3, 49, (n,)) for n in (5, 3)]
    cache = d.new_cache(2, 8)
    qkv, o, gate_up, down = cache.layer_weights[1]
    assert o is not None and down is not None and not o.is_mkldnn  # fp32: the weights as they are
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(gate_up, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert qkv.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(d.prefill(rows, cache), last_logits(model, rows), atol=1e-5, rtol=0)

    model.train()
    model(torch.randint(3, 49, (2, 6)))[0].logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (attn.k_proj.weight, mlp.up_proj.weight))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(attn.k_proj.weight, before["decoder.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))

    model.eval().double()
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    rows = [r.clone() for r in rows]
    cache = d.new_cache(2, 8)
    assert cache.layer_weights[1].qkv.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(d.prefill(rows, cache), last_logits(model, rows), atol=1e-10, rtol=0)


def test_lora_layers_are_not_fused_and_their_adapters_count_in_steps():
    """A group of projections one of which has a LoRA adapter runs as separate layers (a fused weight would leave
    the adapter out), and so does a projection of its own with one (o_proj); a group without adapters is fused."""
    model = build(lora_rank=2, lora_target_modules="k_proj,o_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.5)  # an adapter that changes the output (lora_B starts at zero)
    rows = [torch.randint(3, 49, (n,)) for n in (4, 6)]
    d = model.decoder
    cache = d.new_cache(2, 10)
    qkv, o, gate_up, down = cache.layer_weights[0]
    assert qkv is None and o is None and gate_up is not None and down is not None
    with torch.no_grad():
        torch.testing.assert_close(d.prefill(rows, cache), last_logits(model, rows), atol=1e-5, rtol=0)
        new = torch.randint(3, 49, (2, 1))
        expected = last_logits(model, [torch.cat([r, n]) for r, n in zip(rows, new)])
        torch.testing.assert_close(d.step(new, cache), expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="this CPU has no oneDNN bf16 products")
def test_bf16_steps_on_packed_weights_are_the_steps_on_the_weights_and_follow_changes(monkeypatch):
    """In bf16 on the CPU a cache holds packed copies of every weight a step reads (`kernels.packed_weights`): its
    prefill and steps give the logits of the same calls on the weights themselves, bit for bit. After a weight
    changes in place (an optimizer step, a load), the next step packs the weights again and sees the change."""
    from speechgpt_fairseq.models import kernels

    model = build(kv_heads=2).to(torch.bfloat16)
    d = model.decoder
    rows = [torch.randint(3, 49, (n,)) for n in (5, 3)]
    packed = d.new_cache(2, 12)
    assert all(w.is_mkldnn for w in packed.layer_weights[1]) and packed.output_weight.is_mkldnn
    with monkeypatch.context() as m:
        m.setattr(kernels, "packed_weights", lambda weights, rows: weights)
        plain = d.new_cache(2, 12)
    assert not any(w.is_mkldnn for w in plain.layer_weights[1]) and not plain.output_weight.is_mkldnn
    with torch.no_grad():
        assert torch.equal(d.prefill(rows, packed), d.prefill(rows, plain))
        for change in (False, False, True, False):
            if change:
                d.layers[1].mlp.down_proj.weight.mul_(1.5)
                d.layers[0].self_attn.k_proj.weight.mul_(-1)
            new = torch.randint(3, 49, (2, 1))
            assert torch.equal(d.step(new, packed), d.step(new, plain))


def test_reordered_cache_rows_continue_their_own_sequences():
    """Beam search reorders rows, repeats one (beams of a prompt) and drops others (finished)."""
    model = build()
    rows = [torch.randint(3, 49, (n,)) for n in (4, 6, 3)]
    d = model.decoder
    cache = d.new_cache(3, 12)
    order = torch.tensor([2, 0, 0, 2, 2])
    with torch.no_grad():
        d.prefill(rows, cache)
        cache.reorder(order)
        new = torch.randint(3, 49, (5, 1))
        expected = last_logits(model, [torch.cat([rows[i], n]) for i, n in zip(order.tolist(), new)])
        torch.testing.assert_close(d.step(new, cache), expected, atol=1e-5, rtol=0)
        cache.reorder(torch.tensor([4, 1]))
        more = torch.randint(3, 49, (2, 2))
        seqs = [torch.cat([rows[order[i]], new[i], m]) for i, m in zip((4, 1), more)]
        torch.testing.assert_close(d.step(more, cache), last_logits(model, seqs), atol=1e-5, rtol=0)


def test_fairseq_incremental_decoding_equals_full_forward():
    """fairseq's stock generator calls the decoder with every token so far and an incremental state, and reorders
    it (beams); the cache starts small and grows (past 64 tokens here)."""
    model = build()
    tokens = torch.randint(3, 49, (3, 70))
    order = torch.tensor([2, 0, 0])
    state, steps = {}, []
    with torch.no_grad():
        for t in range(tokens.size(1)):
            if t == 40:
                model.decoder.reorder_incremental_state(state, order)
                tokens = tokens[order]
                steps = [s[order] for s in steps]
            out, _ = model.decoder(tokens[:, :t + 1], incremental_state=state)
            steps.append(out)
        full, _ = model(tokens)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    tokens = torch.randint(3, 49, (2, 10))
    grads = []
    for recompute in (False, True):
        model = build(checkpoint_activations=recompute).train()
        logits, _ = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_is_close_to_fp32():
    model = build()
    tokens = torch.randint(3, 49, (2, 10))
    ref, _ = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = model(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float().softmax(-1) - ref.softmax(-1)).abs().max() < 0.05


def test_rope_theta_changes_the_model():
    tokens = torch.randint(3, 49, (1, 12))
    a, _ = build(rope_theta=10000.0)(tokens)
    b, _ = build(rope_theta=500000.0)(tokens)
    assert not torch.allclose(a, b)


def test_bad_configs_are_refused():
    with pytest.raises(ModelConfigError, match="multiple of decoder_kv_heads"):
        build(kv_heads=3)
    with pytest.raises(ModelConfigError, match="must divide by"):
        SpeechGPTLlamaModel.from_config(SpeechGPTLlamaConfig(decoder_embed_dim=30, decoder_attention_heads=4), 10)


def test_checkpoint_of_another_vocabulary_is_refused_saying_what_differs():
    """Not '1106 tokens differs from 1106 tokens': the sizes when they differ, else that the tokens or ids do."""
    a, b = build(vocab=Vocabulary.units_only(40)), build(vocab=Vocabulary.units_only(41))
    n_a, n_b = len(Vocabulary.units_only(40)), len(Vocabulary.units_only(41))
    with pytest.raises(ModelConfigError, match=f"vocabulary differs from the data directory's \\({n_a} tokens "
                                               f"against {n_b}\\)"):
        b.load_state_dict(a.state_dict())
    swapped = Vocabulary.units_only(40).to_dictionary()
    swapped.symbols[5], swapped.symbols[6] = swapped.symbols[6], swapped.symbols[5]
    c = SpeechGPTLlamaModel.from_config(a.decoder.cfg, swapped)
    with pytest.raises(ModelConfigError, match=f"both have {n_a} tokens, but other tokens at some ids"):
        c.load_state_dict(a.state_dict())


def test_checkpoint_of_another_shape_is_refused():
    a = build()
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=64,
                               decoder_attention_heads=4)
    b = SpeechGPTLlamaModel.from_config(cfg, Vocabulary.units_only(40).to_dictionary())
    with pytest.raises(ModelConfigError, match="does not fit the configured model"):
        b.load_state_dict(a.state_dict())


def test_packed_rows_equal_examples_run_alone():
    """Examples packed into one row with example_ids give the logits each has on its own."""
    model = build(kv_heads=2)
    examples = [torch.randint(3, 49, (n,)) for n in (5, 9, 3)]
    row = torch.cat(examples).unsqueeze(0)
    ids = torch.cat([torch.full((len(e),), i) for i, e in enumerate(examples)]).unsqueeze(0)
    packed, _ = model(row, example_ids=ids)
    alone = torch.cat([model(e.unsqueeze(0))[0] for e in examples], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
