"""Host memory and time of saving a checkpoint under `ddp_backend=fsdp2`, two processes: the full state gathered on
rank 0 (the default) against each rank writing its own shards (`distributed_training.use_sharded_state=true`).

Each run is fairseq-hydra-train on examples/stage1/tiny.yaml and its bundled data with the model widened to the
shape below (as benchmarks/sharded_start.py: started from a checkpoint of random weights), for one update with
AdamW, then the checkpoint fairseq saves at the end. Around that save every rank prints its resident memory
before it and its peak during it (VmHWM, reset just before the save through /proc/self/clear_refs), and the
save's wall time. What a save adds on rank 0 is the figure that decides whether a 7B or 13B run can save at all:
gathered, rank 0 receives the whole model and its AdamW state (16 bytes per parameter in fp32).

    python benchmarks/sharded_save.py [--layers 16] [--dim 1536] [--ffn 4096] [--heads 12]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_start import STAGE1, add_shape_arguments, model_overrides, write_checkpoint  # noqa: E402

REPORT = "sharded-save"


def save(args, work: Path, checkpoint: Path, shards: bool) -> tuple[list[dict], float]:
    """One update and the save after it, two processes; per rank {before, peak, seconds}, and the save's size on
    disk in MB."""
    cmd = [shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", __file__, "--worker",
           "--config-dir", str(STAGE1), "--config-name", "tiny", *model_overrides(args),
           "distributed_training.distributed_world_size=2", "distributed_training.distributed_backend=gloo",
           "distributed_training.ddp_backend=fsdp2", f"distributed_training.use_sharded_state={shards}",
           f"checkpoint.finetune_from_model={checkpoint}", f"checkpoint.save_dir={work / 'save'}",
           "checkpoint.no_last_checkpoints=false", "dataset.disable_validation=true",
           "optimization.max_update=1", "lr_scheduler.total_num_update=1", "task.tokens_per_sample=64",
           "dataset.batch_size=2", "optimizer._name=speechgpt_adamw"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    found = re.findall(rf"{REPORT}: rank (\d+): before ([\d.]+) MB, peak ([\d.]+) MB, ([\d.]+) s",
                       run.stdout + run.stderr)
    if run.returncode != 0 or len(found) != 2:
        sys.exit(f"sharded_save: {' '.join(cmd)} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    ranks = [{"rank": int(r), "before": float(b), "peak": float(p), "seconds": float(s)}
             for r, b, p, s in sorted(found)]
    size = sum(f.stat().st_size for f in (work / "save").rglob("*") if f.is_file() and "best" not in f.name)
    return ranks, size / 2**20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def worker() -> None:
    """fairseq-hydra-train (the arguments are its own), with fairseq's save measured on every rank."""
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    import torch.distributed as dist
    from fairseq import checkpoint_utils
    from fairseq_cli.hydra_train import cli_main

    original = checkpoint_utils.save_checkpoint

    def measured(cfg, trainer, *args, **kwargs):
        before = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        t0 = time.perf_counter()
        result = original(cfg, trainer, *args, **kwargs)
        dist.barrier()
        print(f"{REPORT}: rank {dist.get_rank()}: before {before:.1f} MB, peak {_status_mb('VmHWM'):.1f} MB, "
              f"{time.perf_counter() - t0:.2f} s", flush=True)
        return result

    checkpoint_utils.save_checkpoint = measured
    cli_main()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(p)
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="sharded_save.") as tmp:
        tmp = Path(tmp)
        params = write_checkpoint(args, tmp / "model")
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; model: {args.layers} layers, width {args.dim}, "
              f"ffn {args.ffn}, {params / 1e6:.0f}M parameters; fp32 weights + AdamW state "
              f"{params * 12 / 2**20:,.0f} MB")
        added = {}
        for name, shards in (("gathered", False), ("shards", True)):
            work = tmp / name
            work.mkdir()
            ranks, size = save(args, work, tmp / "model" / "checkpoint.pt", shards)
            added[name] = [r["peak"] - r["before"] for r in ranks]
            print(f"{name:>8}: " + "; ".join(f"rank {r['rank']} {r['before']:,.0f} MB before, +{r['peak'] - r['before']:,.0f} MB "
                                             f"while saving, {r['seconds']:.1f} s" for r in ranks)
                  + f"; {size:,.0f} MB written")
        print(json.dumps(added))
        print(f"ratio rank-0 memory added by saving, shards / gathered: "
              f"{added['shards'][0] / added['gathered'][0]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
    else:
        main()
