"""Training-step throughput of our LLaMA as fairseq-hydra-train runs it, against Hugging Face's
`LlamaForCausalLM` as SpeechGPT trains it: same shape, same weights, same batch.

Ours: the model, our criterion (`speechgpt_cross_entropy`: summed loss over the loss positions, per-modality
metrics, the output layer at loss positions only, `loss_chunk_tokens` as the paper configs set it: the output
layer, loss and their gradients 1024 positions at a time) divided by the token count as fairseq does, and our
optimizer (`speechgpt_adamw`'s kernel choice). HF: `model(input_ids, labels=...)` with -100 on the positions
without loss, and torch's fused AdamW (HF Trainer's default optimizer). Two kinds of step:
  lm   every position has a loss (stage 1, pretraining);
  sft  the first half of every example is prompt, without loss (SpeechInstruct's ASR/TTS/chain-of-modality
       examples are about half prompt): a response-only loss.
Steps are timed alternately (ours, HF, HF, ours, ...) so that drift on a shared machine and the order within a
pair hit both alike, and the median step time is reported as tokens per second, in fp32 and under bf16 autocast.

Achieved FLOP/s count the work a step needs: 6 x the non-embedding parameters per token, with the output layer
only where a loss is taken, plus 12 x layers x width x sequence per token for attention. The same run measures
the machine's own limit, a 4096 x 4096 matmul in the step's dtype, and prints each side's share of it.

Read `ratio ours/HF: Z` as our tokens/s over HF's: above 1 ours is faster, below 1 slower. On a busy machine
a few steps can land in a burst of other load; then the s/step ranges are wide and the median ratio swings.
On a CPU the process's CPU seconds per step hardly change under such load: their ratio (HF's over ours,
so again above 1 means ours is faster) is the steadier guide there.

    python benchmarks/train_step.py [--steps 4] [--warmup 2] [--device cpu] [--modes fp32,bf16] [--kinds lm,sft]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import time

import speechgpt_fairseq

speechgpt_fairseq.register()
import torch
import transformers
from speechgpt_fairseq.criterions.cross_entropy import SpeechGPTCrossEntropyCriterion
from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.kernels import adamw
from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

VOCAB = 33006  # 3 base tokens + units + 6 SpeechGPT tokens
PAPER_LOSS_CHUNK = 1024  # criterion.loss_chunk_tokens in the paper-scale configs
DIM, LAYERS, HEADS, KV_HEADS = 512, 8, 8, 2
# LLaMA's SwiGLU width: 2/3 * 4 * dim = 1365, rounded up to a multiple of 128 -> 1408
FFN = 128 * -(-int(2 * 4 * DIM / 3) // 128)


def build_ours(vocab, seq: int) -> SpeechGPTLlamaModel:
    cfg = SpeechGPTLlamaConfig(decoder_layers=LAYERS, decoder_embed_dim=DIM, decoder_ffn_embed_dim=FFN,
                               decoder_attention_heads=HEADS, decoder_kv_heads=KV_HEADS,
                               max_target_positions=max(seq, 1024), share_decoder_input_output_embed=False)
    return SpeechGPTLlamaModel.from_config(cfg, vocab)


def build_hf(ours: SpeechGPTLlamaModel, seq: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, max_position_embeddings=max(seq, 1024),
                                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(cfg)
    # same submodule names: the weight map is a prefix
    state = {(k if k.startswith("lm_head") else "model." + k): v
             for k, v in ours.decoder.state_dict().items() if k != "vocab_digest"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


class Task:
    """What our criterion reads of a fairseq task."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.target_dictionary = vocab.to_dictionary()


def make_step(model, loss_of, opt, autocast, sync):
    def step() -> tuple[float, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast():
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0, loss.item()
    return step


def ours_loss(criterion, sample):
    def loss_of(model):
        loss, sample_size, _ = criterion(model, sample)
        return loss / sample_size  # fairseq divides the gradients by the sample size; the same work
    return loss_of


def hf_loss(tokens, labels):
    def loss_of(model):
        # `shift_labels`: the labels are already next tokens, so HF scores the same positions as ours
        return model(input_ids=tokens, labels=labels, shift_labels=labels, use_cache=False).loss
    return loss_of


def step_flops(model, tokens: int, loss_positions: int, seq: int) -> float:
    """FLOPs a step needs: 6 per parameter per token (the output layer at loss positions only) + attention."""
    decoder = model.decoder
    head = decoder.output_weight.numel()
    body = sum(p.numel() for n, p in decoder.named_parameters() if n.startswith(("layers.", "norm.")))
    return 6 * body * tokens + 6 * head * loss_positions + 12 * LAYERS * DIM * seq * tokens


def matmul_peak(device: torch.device, dtype: torch.dtype, sync, n: int = 4096, reps: int = 4) -> float:
    """FLOP/s of the best of `reps` n x n matmuls: what this machine reaches on the most favourable work."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per model and mode (even: balances the order)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--kinds", default="lm,sft", help="comma-separated: lm (loss everywhere), sft (response only)")
    p.add_argument("--loss-chunk", type=int, default=PAPER_LOSS_CHUNK,
                   help="our criterion.loss_chunk_tokens; default: the paper configs' (examples/stage*/llama_7b.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the token batch")
    args = p.parse_args()
    modes, kinds = args.modes.split(","), args.kinds.split(",")
    if bad := set(modes) - {"fp32", "bf16"}:
        p.error(f"unknown mode(s) {sorted(bad)} in --modes; expected fp32 and/or bf16")
    if bad := set(kinds) - {"lm", "sft"}:
        p.error(f"unknown kind(s) {sorted(bad)} in --kinds; expected lm and/or sft")
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    print(f"machine: {machine(device)} ({args.device}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    vocab = Vocabulary.units_only(num_units=VOCAB - 3 - 6)
    dictionary = vocab.to_dictionary()
    assert len(dictionary) == VOCAB, len(dictionary)
    pad = dictionary.pad()
    torch.manual_seed(args.seed)
    batch = torch.randint(dictionary.nspecial, VOCAB, (args.batch, args.seq + 1), device=device)  # no pad tokens
    tokens, target = batch[:, :-1], batch[:, 1:]
    ntok = tokens.numel()
    print(f"shape: {LAYERS} layers, width {DIM}, ffn {FFN}, {HEADS} heads, {KV_HEADS} kv heads, vocab {VOCAB}, "
          f"batch {args.batch} x seq {args.seq} = {ntok} tokens/step; warmup {args.warmup}, steps {args.steps}")
    criterion = SpeechGPTCrossEntropyCriterion(Task(vocab), loss_chunk_tokens=args.loss_chunk)
    print(f"our criterion.loss_chunk_tokens: {args.loss_chunk}")

    for mode in modes:
        autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mode == "bf16"
                    else contextlib.nullcontext)
        peak = matmul_peak(device, torch.bfloat16 if mode == "bf16" else torch.float32, sync)
        print(f"{mode}  matmul peak (4096 x 4096, {mode}): {peak / 1e9:,.1f} GFLOP/s")
        for kind in kinds:
            loss_target = target.clone()
            if kind == "sft":
                loss_target[:, :args.seq // 2] = pad  # the prompt half: no loss
            loss_positions = int(loss_target.ne(pad).sum())
            sample = {"net_input": {"src_tokens": tokens}, "target": loss_target, "ntokens": loss_positions,
                      "nsentences": args.batch}
            labels = loss_target.masked_fill(loss_target.eq(pad), -100)
            # fresh models per mode and kind, so AdamW state and weights start equal on both sides
            torch.manual_seed(args.seed)
            ours = build_ours(dictionary, args.seq).to(device).train()
            hf = build_hf(ours, args.seq).to(device).train()
            flops = step_flops(ours, ntok, loss_positions, args.seq)
            print(f"{mode} {kind}  {loss_positions} of {ntok} positions with a loss; a step needs "
                  f"{flops / 1e12:.2f} TFLOP")
            steps = {
                "ours": make_step(ours, ours_loss(criterion, sample), adamw(ours.parameters(), 1e-4, (0.9, 0.999),
                                                                            1e-8, 0.01), autocast, sync),
                "HF": make_step(hf, hf_loss(tokens, labels),
                                torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01,
                                                  fused=device.type in ("cpu", "cuda")), autocast, sync),
            }
            times, cpu = {name: [] for name in steps}, {name: [] for name in steps}
            losses = {}
            for i in range(args.warmup + args.steps):
                # interleaved, the order flipped every repetition (ours, HF, HF, ours, ...): the step that runs
                # first in a pair measured a few percent slower here, whichever model it was
                for name, step in (list(steps.items()) if (i - args.warmup) % 2 == 0 else reversed(steps.items())):
                    dt, dc, loss = step()
                    losses.setdefault(name, loss)  # first step: same weights, same batch -> same loss
                    if i >= args.warmup:
                        times[name].append(dt)
                        cpu[name].append(dc)
            rate = {name: ntok / statistics.median(t) for name, t in times.items()}
            print(f"{mode} {kind}  first-step loss  ours: {losses['ours']:.4f}  HF: {losses['HF']:.4f}")
            # the s/step range shows how noisy the machine was: a wide one calls for more --steps
            print(f"{mode} {kind}  " + "  ".join(
                f"{name}: {rate[name]:,.0f} tok/s (median {statistics.median(t):.2f} s/step, "
                f"range {min(t):.2f}-{max(t):.2f})" for name, t in times.items()))
            print(f"{mode} {kind}  achieved  " + "  ".join(
                f"{name}: {flops / statistics.median(t) / 1e9:,.1f} GFLOP/s "
                f"({100 * flops / statistics.median(t) / peak:.0f}% of the matmul peak)" for name, t in times.items()))
            if device.type == "cpu":
                c = {name: statistics.median(t) for name, t in cpu.items()}
                print(f"{mode} {kind}  CPU s/step  ours: {c['ours']:.2f}  HF: {c['HF']:.2f}  "
                      f"CPU-time ratio HF/ours: {c['HF'] / c['ours']:.3f}")
            print(f"{mode} {kind}  ratio ours/HF: {rate['ours'] / rate['HF']:.3f}")
            del ours, hf, steps


if __name__ == "__main__":
    main()
