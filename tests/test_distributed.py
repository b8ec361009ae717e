"""Multi-process training through fairseq's own launch options, two CPU processes on gloo under torchrun:
data parallel (fairseq's default pytorch_ddp) equals one process with update_freq 2; ddp_backend=fsdp2
(speechgpt_fairseq/fsdp.py) equals that unsharded run, holds half of the parameters per rank, and, stopped after
3 updates and started again, resumes from its checkpoint to the same losses and weights."""
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from speechgpt_fairseq import fsdp

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "examples" / "stage1"
# a few updates of the tiny config; AdamW from kernels.py, a warmup short enough for the losses to move
RUN = ["task.tokens_per_sample=64", "dataset.batch_size=4", "common.log_interval=1", "dataset.validate_interval_updates=3",
       "optimization.max_update=6", "lr_scheduler.total_num_update=6", "lr_scheduler.warmup_updates=2",
       "optimizer._name=speechgpt_adamw",
       "checkpoint.save_interval_updates=3", "checkpoint.keep_interval_updates=-1"]
# validation on the first 4 batches: fairseq validates max_valid_steps + 1 batches per process, and two processes
# take alternate batches
ONE_PROCESS = ["dataset.max_valid_steps=3"]
TWO_PROCESSES = ["distributed_training.distributed_world_size=2", "distributed_training.distributed_backend=gloo",
                 "dataset.max_valid_steps=1"]


def train(cli, cwd: Path, *overrides: str, processes: int = 1, trainer: Path | None = None, check=True) -> str:
    """fairseq-hydra-train (or a script that runs it), as one process or under torchrun; the log."""
    trainer = str(trainer or Path(sys.executable).parent / "fairseq-hydra-train")
    launch = [] if processes == 1 else ["torchrun", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launch, trainer, "--config-dir", STAGE1, "--config-name", "tiny", *RUN, *overrides]
    run = cli(*cmd, cwd=cwd, check=check)
    return run.stdout + run.stderr


def losses(log: str) -> dict[int, float]:
    """{update: training loss} from fairseq's per-update log lines."""
    found = re.findall(r"train_inner.* loss=([0-9.]+),.* num_updates=(\d+),", log)
    return {int(n): float(loss) for loss, n in found}


def valid_losses(log: str) -> dict[int, float]:
    """{update: validation loss}."""
    found = re.findall(r"valid on 'valid' subset \| loss ([0-9.]+) \|.* num_updates (\d+)", log)
    return {int(n): float(loss) for loss, n in found}


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory) -> tuple[str, Path]:
    """One process, two batches per update: the run the multi-process ones must reproduce."""
    cwd = tmp_path_factory.mktemp("one_process")
    log = train(cli, cwd, *ONE_PROCESS, "optimization.update_freq=[2]")
    return log, cwd / "checkpoints" / "stage1-tiny"


SHARDED = [*TWO_PROCESSES, "distributed_training.ddp_backend=fsdp2", "criterion.loss_chunk_tokens=48"]


@pytest.fixture(scope="module")
def sharded(cli, tmp_path_factory) -> tuple[str, Path]:
    """Two processes on fsdp2, with the chunked output-layer loss, stopped after 3 of the 6 updates."""
    cwd = tmp_path_factory.mktemp("fsdp2")
    log = train(cli, cwd, *SHARDED, "optimization.max_update=3", processes=2)
    return log, cwd


def test_two_data_parallel_processes_equal_one_with_update_freq_2(cli, tmp_path, reference):
    ref_log, ref_dir = reference
    log = train(cli, tmp_path, *TWO_PROCESSES, processes=2)  # ddp_backend: fairseq's default, pytorch_ddp
    assert "ddp_backend': 'pytorch_ddp'" in log and "'distributed_world_size': 2" in log
    ref_losses = losses(ref_log)
    assert sorted(ref_losses) == list(range(1, 7)) and ref_losses[6] < ref_losses[1] - 1  # it learns
    assert sorted(valid_losses(ref_log)) == [3, 6]
    assert losses(log) == pytest.approx(ref_losses, abs=1.5e-3)  # as logged: 3 decimals
    assert valid_losses(log) == pytest.approx(valid_losses(ref_log), abs=1.5e-3)
    assert_same_weights(tmp_path / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt", ref_dir / "checkpoint_last.pt")


def test_fsdp2_matches_the_unsharded_run_and_holds_half_per_rank(reference, sharded):
    ref_log, ref_dir = reference
    log, cwd = sharded
    # each rank built the model on the meta device and drew its own shards: the unsharded run's weights
    assert "fsdp2: model built on the meta device; each rank allocated and drew its own shards" in log
    assert losses(log) == pytest.approx({n: losses(ref_log)[n] for n in (1, 2, 3)}, abs=1.5e-3)
    assert valid_losses(log) == pytest.approx({3: valid_losses(ref_log)[3]}, abs=1.5e-3)
    shares = re.search(r"fsdp2: parameters held per rank: ([\d,]+), ([\d,]+) of ([\d,]+)", log)
    held = [int(n.replace(",", "")) for n in shares.groups()]
    assert sum(held[:2]) == held[2] == sum(t.numel() for k, t in weights(ref_dir / "checkpoint_last.pt").items()
                                           if k != "decoder.vocab_digest")
    assert all(abs(n / held[2] - 0.5) < 0.01 for n in held[:2])
    # the checkpoint holds the full state, gathered: the unsharded run's weights, every name at its full shape
    assert_same_weights(cwd / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt", ref_dir / "checkpoint_1_3.pt")


def test_fsdp2_resumes_under_sharding(cli, reference, sharded):
    ref_log, ref_dir = reference
    _, cwd = sharded
    resumed = train(cli, cwd, *SHARDED, processes=2)  # the same command, to the full 6 updates
    assert "(epoch 1 @ 3 updates)" in resumed  # fairseq's "Loaded checkpoint ..." line
    assert losses(resumed) == pytest.approx({n: losses(ref_log)[n] for n in (4, 5, 6)}, abs=1.5e-3)
    assert valid_losses(resumed) == pytest.approx({6: valid_losses(ref_log)[6]}, abs=1.5e-3)
    assert_same_weights(cwd / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt", ref_dir / "checkpoint_last.pt")


def test_fsdp2_sharded_checkpoints_resume_bit_identically_and_read_whole(cli, tmp_path, sharded):
    """use_sharded_state=true: each rank writes its shards, the checkpoint file is an index; a run resumed from the
    update-3 checkpoint ends with the weights of the run that was never stopped, bit for bit; readers outside
    training get the model whole; shards no checkpoint refers to any more are removed, nothing else is."""
    from safetensors.torch import load_file

    from speechgpt_fairseq.models.checkpoints import read_checkpoint
    from speechgpt_fairseq.models.hf import export_hf
    from speechgpt_fairseq.models.checkpoints import load_base_weights

    shards = [*SHARDED, "distributed_training.use_sharded_state=true"]
    whole, resumed = (tmp_path / run / "checkpoints" / "stage1-tiny" for run in ("whole", "resumed"))
    whole.mkdir(parents=True)
    log = train(cli, tmp_path / "whole", *shards, processes=2)  # never stopped: saves at updates 3 and 6
    index = torch.load(whole / "checkpoint_1_3.pt", map_location="cpu", weights_only=True)
    assert index["model"] == {} and "last_optimizer_state" not in index and index["sharded_state"] == "shards-3"
    assert sorted(p.name for p in (whole / "shards-3").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # read whole, the sharded checkpoint's model is the one the same run saves gathered (the `sharded` fixture)
    at_3, gathered = read_checkpoint(whole / "checkpoint_1_3.pt")["model"], weights(sharded[1] / "checkpoints" /
                                                                                 "stage1-tiny" / "checkpoint_1_3.pt")
    assert at_3.keys() == gathered.keys() and all(torch.equal(at_3[k], gathered[k]) for k in gathered)

    resumed.mkdir(parents=True)
    shutil.copy(whole / "checkpoint_1_3.pt", resumed / "checkpoint_last.pt")
    shutil.copytree(whole / "shards-3", resumed / "shards-3")
    (resumed / "shards-99").mkdir()
    (resumed / "shards-99" / "notes.txt").write_text("not shards: kept")
    again = train(cli, tmp_path / "resumed", *shards, "checkpoint.keep_interval_updates=1", processes=2)
    assert "(epoch 1 @ 3 updates)" in again and losses(again) == {n: losses(log)[n] for n in (4, 5, 6)}
    end, expected = (read_checkpoint(d / "checkpoint_last.pt")["model"] for d in (resumed, whole))
    assert end.keys() == expected.keys() and all(torch.equal(end[k], expected[k]) for k in expected)
    assert sorted(p.name for p in resumed.glob("shards-*")) == ["shards-6", "shards-99"]  # shards-3: unreferenced

    hf = export_hf(whole / "checkpoint_last.pt", tmp_path / "hf")  # export-hf reads it whole too
    assert torch.equal(load_file(hf / "model.safetensors")["model.embed_tokens.weight"],
                       expected["decoder.embed_tokens.weight"])
    base = load_base_weights(whole / "checkpoint_last.pt")  # and so does a LoRA model's lora_base
    assert all(torch.equal(base[k], expected[k]) for k in expected)
    refused = train(cli, tmp_path / "resumed", check=False)  # pytorch_ddp cannot take fsdp2's optimizer shards
    assert "resume it with ddp_backend=fsdp2, or add checkpoint.reset_optimizer=true" in refused


def test_fsdp2_reduces_gradients_once_per_update_whatever_update_freq(cli, tmp_path):
    """With update_freq 2, the micro-batch before an update's last keeps its gradients on each rank: one
    reduce-scatter per sharded unit (2 blocks and the root) per update, and the weights of one process
    accumulating the same 4 batches per update."""
    accumulated = ["optimization.max_update=4", "lr_scheduler.total_num_update=4",
                   "dataset.validate_interval_updates=4", "checkpoint.save_interval_updates=4"]
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
    train(cli, tmp_path / "one", *accumulated, *ONE_PROCESS, "optimization.update_freq=[4]")
    counter = Path(__file__).with_name("count_reduce_scatters.py")
    log = train(cli, tmp_path / "two", *accumulated, *SHARDED, "optimization.update_freq=[2]", processes=2,
                trainer=counter)
    counts = re.findall(r"rank (\d) reduce-scatters per update: \[([\d, ]*)\]", log)
    assert sorted(rank for rank, _ in counts) == ["0", "1"]
    assert all([int(n) for n in per_update.split(",")] == [3] * 4 for _, per_update in counts), counts
    two, one = (tmp_path / run / "checkpoints" / "stage1-tiny" / "checkpoint_last.pt" for run in ("two", "one"))
    assert_same_weights(two, one)


def test_fsdp2_needs_two_processes_and_bf16_not_fp16():
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.trainer import Trainer

    fsdp.install()  # what speechgpt_fairseq.register() does; no other test of this module runs in-process first
    cfg = OmegaConf.structured(FairseqConfig())
    cfg.distributed_training.ddp_backend = "fsdp2"  # accepted by fairseq's typed config
    with pytest.raises(fsdp.FSDP2Error, match="shards across processes: launch two or more"):
        Trainer(cfg, None, None, None)
    cfg.distributed_training.distributed_world_size, cfg.common.fp16 = 2, True
    with pytest.raises(fsdp.FSDP2Error, match="common.bf16=true; fp16 and the memory_efficient"):
        Trainer(cfg, None, None, None)


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def tiny_model(on_meta: bool = False):
    from speechgpt_fairseq.data.vocabulary import Vocabulary
    from speechgpt_fairseq.models.llama import SpeechGPTLlamaConfig, SpeechGPTLlamaModel

    torch.manual_seed(0)
    cfg = SpeechGPTLlamaConfig(decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                               decoder_attention_heads=4, decoder_kv_heads=2, init_std=0.3)
    return SpeechGPTLlamaModel.from_config(cfg, Vocabulary.units_only(40).to_dictionary(), on_meta=on_meta)


def test_a_model_built_on_the_meta_device_is_sharded_with_the_weights_it_would_have_whole(one_process_group):
    whole = tiny_model()
    meta = tiny_model(on_meta=True)
    assert all(p.is_meta for p in meta.parameters())
    sharded = fsdp.shard(meta, one_process_group, torch.device("cpu"), bf16=False)
    state = sharded.state_dict()
    assert state.keys() == whole.state_dict().keys()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(state[name], tensor), name  # the vocabulary digest included


def test_fsdp2_maps_the_checkpoint_it_loads(tmp_path):
    """Under fsdp2 every rank loads a checkpoint itself (no broadcast of the whole state), mapped: its tensors are
    views of the file, read only where a rank copies its shards from."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.configs import FairseqConfig

    from speechgpt_fairseq.data.vocabulary import Vocabulary
    from speechgpt_fairseq.models.checkpoints import fairseq_checkpoint

    model = tiny_model()
    weights = {**model.state_dict(), "big": torch.randn(512, 512)}  # pages wholly inside a tensor are dropped
    path = tmp_path / "checkpoint.pt"
    torch.save(fairseq_checkpoint(weights, model.decoder.cfg, Vocabulary.units_only(40), "data"), path)
    weight = "big"
    cfg = OmegaConf.structured(FairseqConfig())
    with fsdp._mapped_checkpoint_loads(cfg):
        assert cfg.checkpoint.load_checkpoint_on_all_dp_ranks
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path), load_on_all_ranks=True)
    assert mapped_file(state["model"][weight]) == str(path)
    assert torch.equal(state["model"][weight], weights[weight])
    assert not cfg.checkpoint.load_checkpoint_on_all_dp_ranks  # restored, and torch.load reads files again
    read = checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"][weight]
    assert mapped_file(read) is None
    # once a rank has its shards, the file's pages are dropped; memory of its own never is (it would read zeros)
    for tensor in (state["model"][weight], read):
        fsdp._drop_mapped_pages(tensor)
        assert torch.equal(tensor, weights[weight])


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds `tensor`'s data (Linux /proc/self/maps), or None."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            bounds, _, _, _, _, *path = line.split()
            low, high = (int(x, 16) for x in bounds.split("-"))
            if low <= address < high:
                return path[0] if path and path[0].startswith("/") else None
    return None


def test_fsdp2_accumulates_gradients_over_micro_batches(one_process_group):
    """update_freq > 1: the sharded gradients of two backward passes are the sum of the plain model's."""
    import copy

    plain = tiny_model()
    sharded = fsdp.shard(copy.deepcopy(plain), one_process_group, torch.device("cpu"), bf16=False)
    for tokens in torch.randint(3, 49, (2, 3, 9)):
        for model in (plain, sharded):
            model(tokens)[0].square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(b.grad.full_tensor(), a.grad, msg=name)


def test_fsdp2_bf16_computes_in_bf16_on_fp32_shards_and_saves_fp32(one_process_group):
    import copy

    from torch.distributed.tensor import DTensor

    plain = tiny_model()
    sharded = fsdp.shard(copy.deepcopy(plain), one_process_group, torch.device("cpu"), bf16=True)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in sharded.parameters())
    tokens = torch.randint(3, 49, (2, 9))
    logits, _ = sharded(tokens)
    assert logits.dtype == torch.bfloat16
    assert (logits.float().softmax(-1) - plain(tokens)[0].softmax(-1)).abs().max() < 0.05
    state = sharded.state_dict()
    assert state.keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(state[name], tensor), name  # the fp32 master weights, gathered
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    sharded.load_state_dict(changed)
    for name, tensor in sharded.state_dict().items():
        assert torch.equal(tensor, changed[name]), name
