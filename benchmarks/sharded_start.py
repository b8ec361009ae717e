"""Peak host memory per rank at the start of training: two processes on `ddp_backend=fsdp2` against one process
holding the whole model.

A start is what fairseq-hydra-train does before its first update: build the model, load the weights of
`checkpoint.finetune_from_model` (as the paper configs start from a converted LLaMA), build the optimizer and read
the data. The benchmark first writes such a checkpoint of random weights (in the layout convert-hf writes), then
runs fairseq-hydra-train on examples/stage1/tiny.yaml and its bundled data, with the model widened to the shape
below, and stops it where its first update would begin: once as one process (fairseq's default backend: the whole
model, the whole checkpoint read), once as two processes under torchrun on fsdp2 (gloo). Each process prints its
peak resident memory (VmHWM: Python, torch and fairseq included). With fsdp2 each rank builds the model on the
meta device, allocates and draws only its shards, and copies its shards out of the mapped checkpoint.

    python benchmarks/sharded_start.py [--layers 16] [--dim 1536] [--ffn 4096] [--heads 12]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "examples" / "stage1"
REPORT = "sharded-start peak"


def model_overrides(args) -> list[str]:
    return [f"model.decoder_layers={args.layers}", f"model.decoder_embed_dim={args.dim}",
            f"model.decoder_ffn_embed_dim={args.ffn}", f"model.decoder_attention_heads={args.heads}",
            f"model.decoder_kv_heads={args.heads}"]


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The widened model's shape (456M parameters at the defaults)."""
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)


def write_checkpoint(args, out: Path) -> int:
    """A fairseq checkpoint of random weights of the benchmark's shape over the bundled data's vocabulary; its
    parameter count."""
    import torch
    from omegaconf import OmegaConf

    import speechgpt_fairseq
    from speechgpt_fairseq.data.vocabulary import Vocabulary
    from speechgpt_fairseq.models.hf import write_checkpoint_dir
    from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

    speechgpt_fairseq.register()
    vocab = Vocabulary.load(STAGE1 / "data-bin" / "vocab.json")
    preset = OmegaConf.load(REPO / "speechgpt_fairseq" / "presets" / "model" / "tiny.yaml")
    fields = {k: v for k, v in OmegaConf.to_container(preset).items() if k != "_name"}
    fields.update(decoder_layers=args.layers, decoder_embed_dim=args.dim, decoder_ffn_embed_dim=args.ffn,
                  decoder_attention_heads=args.heads, decoder_kv_heads=args.heads)
    cfg = SpeechGPTLlamaConfig(**fields)
    torch.manual_seed(0)
    model = SpeechGPTLlamaModel.from_config(cfg, vocab.to_dictionary())
    write_checkpoint_dir(out, model.state_dict(), cfg, vocab, overwrite=False, inputs=[])
    return model.num_parameters()


def start(args, work: Path, checkpoint: Path, processes: int) -> tuple[list[float], float]:
    """fairseq-hydra-train up to its first update; each process's peak RSS in MB, and the wall time."""
    trainer = [sys.executable, __file__, "--worker"]
    launch = [] if processes == 1 else [shutil.which("torchrun"), "--standalone", f"--nproc_per_node={processes}",
                                        __file__, "--worker"]
    sharded = [] if processes == 1 else [
        f"distributed_training.distributed_world_size={processes}", "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=fsdp2"]
    cmd = [*(launch or trainer), "--config-dir", str(STAGE1), "--config-name", "tiny", *model_overrides(args),
           *sharded, f"checkpoint.finetune_from_model={checkpoint}", f"checkpoint.save_dir={work / 'save'}",
           "task.tokens_per_sample=64", "dataset.batch_size=2", "optimizer._name=speechgpt_adamw"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peaks = [float(mb) for mb in re.findall(rf"{REPORT}: rank \d+: ([\d.]+) MB", run.stdout + run.stderr)]
    if run.returncode != 0 or len(peaks) != processes:
        sys.exit(f"sharded_start: {' '.join(cmd)} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return peaks, wall


def worker() -> None:
    """fairseq-hydra-train (the arguments are its own), stopped when its first update begins."""
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    import torch.distributed as dist
    from fairseq.trainer import Trainer
    from fairseq_cli.hydra_train import cli_main

    def report_and_stop(self, samples, raise_oom=False):
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"{REPORT}: rank {rank}: {kb / 1024:.1f} MB", flush=True)
        if dist.is_initialized():
            dist.barrier()
        os._exit(0)

    Trainer.train_step = report_and_stop
    cli_main()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p)
    p.add_argument("--repeat", type=int, default=1, help="runs of each start (the range is printed)")
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="sharded_start.") as tmp:
        tmp = Path(tmp)
        params = write_checkpoint(args, tmp / "model")
        size = (tmp / "model" / "checkpoint.pt").stat().st_size / 2**20
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; model: {args.layers} layers, width {args.dim}, "
              f"ffn {args.ffn}, {params / 1e6:.0f}M parameters; checkpoint {size:,.0f} MB (fp32)")
        results = {"one": [], "fsdp2": []}
        for _ in range(args.repeat):
            for name, processes in (("one", 1), ("fsdp2", 2)):
                work = tmp / name
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                peaks, wall = start(args, work, tmp / "model" / "checkpoint.pt", processes)
                results[name].append(max(peaks))
                print(f"{name:>6}: peak RSS per process {', '.join(f'{mb:,.0f}' for mb in peaks)} MB ({wall:.0f} s)")
        ratios = [s / o for s, o in zip(results["fsdp2"], results["one"])]
        print(json.dumps({"one_process_mb": results["one"], "fsdp2_rank_max_mb": results["fsdp2"]}))
        print(f"ratio fsdp2 rank peak / one process peak: {min(ratios):.3f}"
              + (f"-{max(ratios):.3f}" if len(ratios) > 1 else ""))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
    else:
        main()
