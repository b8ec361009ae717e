"""fairseq-hydra-train (the arguments are its own) with FSDP2's gradient reduce-scatters counted per update.

Run under torchrun by tests/test_distributed.py; each rank prints `rank R reduce-scatters per update: [n, ...]`.
Not a test module: pytest collects only test_*.py.
"""
import torch.distributed as dist
from fairseq.trainer import Trainer
from fairseq_cli.hydra_train import cli_main

counted: list[int] = []
reduce_scatter, train_step = dist.reduce_scatter_single, Trainer.train_step


def counting_reduce_scatter(*args, **kwargs):
    counted[-1] += 1
    return reduce_scatter(*args, **kwargs)


def counting_train_step(self, samples, raise_oom=False):
    counted.append(0)
    return train_step(self, samples, raise_oom)


dist.reduce_scatter_single, Trainer.train_step = counting_reduce_scatter, counting_train_step
try:
    cli_main()
finally:
    print(f"rank {dist.get_rank() if dist.is_initialized() else 0} reduce-scatters per update: {counted}", flush=True)
