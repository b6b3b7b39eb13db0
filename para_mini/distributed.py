# train.py under torchrun, nanoGPT's way: torchrun starts one process per GPU and sets RANK / WORLD_SIZE /
# LOCAL_RANK; each process takes its share of every step's micro-batches, PyTorch averages the adapter's gradients
# (DDP, or FSDP2 with --shard), and rank 0 alone prints and writes files. Plain `python train.py` is one process of
# rank 0, and every function here is then a no-op or the identity.
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .adapters import add_adapter, adapter_state, block_state, new_adapter
from .loading import check_tensors, read_checkpoint
from .model import Transformer


def start(device, shard, grad_accum):
    """-> (rank, world size, this rank's device): joins torchrun's process group and takes this rank's GPU;
    (0, 1, device) without torchrun."""
    if "RANK" not in os.environ:
        if shard:
            raise ValueError("--shard splits the model across processes: launch with torchrun --nproc_per_node N")
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if grad_accum % world:
        raise ValueError(f"the --grad-accum {grad_accum} micro-batches of a step are shared among {world} "
                         f"processes: make it a multiple of {world} (e.g. --batch-size 1 --grad-accum {world})")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor(x, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def rank_0s(x: float, device) -> float:
    """Rank 0's value on every rank, so that all ranks take rank 0's decisions (best adapter, early stop)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(x, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.item()


def load_sharded(weights, cfg, dtype, device):
    """The model with its adapter split across the ranks by FSDP2, one shard per rank and never whole on any: built
    on the meta device, each block sharded, then every tensor read alone from the memory-mapped checkpoint, and only
    this rank's rows of it kept (distribute_tensor with src_data_rank=None slices locally, sends nothing)."""
    from torch.distributed.fsdp import fully_shard  # imported here: it takes a second, and only --shard needs it
    from torch.distributed.tensor import distribute_tensor

    margs, tensors, unused = read_checkpoint(Path(weights))
    with torch.device("meta"):
        model = Transformer(margs)  # a tied output is loaded as an equal copy of the embedding (LLaMA-2 is untied)
    check_tensors(weights, tensors, {n: tuple(t.shape) for n, t in model.state_dict().items()}, unused)
    with torch.random.fork_rng(devices=[]):  # the adapter's initial values, drawn as add_adapter draws them
        fresh = {f"layers.{i}.{k}": p for i, block in enumerate(model.layers)
                 for k, p in block_state(new_adapter(margs, cfg, block), cfg).items()}
    add_adapter(model, cfg)  # on the meta device: the shapes, and requires_grad on the adapter alone
    file_key = {id(p): k for k, p in adapter_state(model).items()}
    file_key = {name: file_key[id(p)] for name, p in model.named_parameters() if id(p) in file_key}
    for block in model.layers:
        fully_shard(block)  # a block's weights are gathered for its forward and backward, then freed
    fully_shard(model)  # the embedding, final norm and LM head
    state = {}
    for name, p in model.state_dict().items():
        if name in file_key:
            full = fresh[file_key[name]].detach().to(device)  # fp32, as add_adapter keeps adapters
        else:
            full = tensors[name].read().to(device=device, dtype=dtype)
        state[name] = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    model.load_state_dict(state, assign=True)
    return model.eval()


def sharded(t) -> bool:
    # a DTensor (--shard) carries its device mesh; asked by attribute, so that a run without --shard never imports
    # torch.distributed.tensor
    return hasattr(t, "device_mesh")


def whole(t):
    return t.full_tensor() if sharded(t) else t  # sharded: gathered from every rank (all must call)


def like(p, t):
    """A whole tensor t as parameter p holds it: under --shard this rank's rows of it alone (sliced, not sent)."""
    t = t.to(p.device, p.dtype)
    if not sharded(p):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
