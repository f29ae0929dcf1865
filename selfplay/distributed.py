"""Multi-process plumbing on torch.distributed, for `torchrun --nproc_per_node N -m selfplay run`.

Data parallel over episodes: rank 0 owns the curriculum, the SQLite store, the checkpoints, the
logs and the evaluations; it broadcasts each iteration's task assignments, every rank runs its
shard of the episodes on its own sampler (seeded by rank), the turns are all-gathered so every rank
computes the same group advantages and FLOP totals, and each rank trains on the rows of its own
episodes. The LoRA gradients are all-reduced by hand (a SUM) after the loss was normalised by the
GLOBAL row/token counts, so the update equals one process's on all rows. DDP is not used: it
AVERAGES gradients (wrong for a loss normalised by global counts) and its unused-parameter check
fails with several peft adapters (peft issue 899). gloo on CPU, NCCL on GPU.

Without torchrun (WORLD_SIZE unset or 1) every function here is the identity: rank 0 of 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: str) -> None:
    """Join the process group torchrun describes (no-op in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def broadcast(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def unshard(parts: list[list]) -> list:
    """Undo `items[rank::world]`: the gathered shards back in the original order."""
    out = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over ranks, in one flat buffer (a rank without rows contributes zeros)."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    k = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[k: k + n].view_as(p).clone()
        k += n


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
