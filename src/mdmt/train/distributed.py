"""One run on several processes: ``torchrun --nproc_per_node N -m mdmt.cli train ...``.

Each rank trains on its slice of every global batch under DistributedDataParallel (NCCL on GPUs, gloo on
CPU). Each rank's masked loss sums are scaled by ``world_size · B_local / B_global`` so that DDP's gradient
average equals the gradient of the single-process loss (Σ over the labelled samples of the global batch / B);
the logged sums are all-reduced. Every rank validates on the whole validation set with identical weights, so
scheduler, selection and early stopping agree without communication. Rank 0 writes every file.
Batch-norm statistics are per rank on CPU (SyncBatchNorm on CUDA). Gradient-level weightings (GradNorm,
PCGrad) need every task's per-rank gradients and are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mdmt.errors import ConfigError
from mdmt.validation import check_device

UNSUPPORTED_WEIGHTINGS = ("gradnorm", "pcgrad")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group (``world_size`` 1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains this run."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0


SINGLE = DistContext()


def from_environment() -> DistContext:
    """The context torchrun describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; another name must be a device this machine has (a one-line
    ConfigError otherwise: ``mdmt.validation.check_device``)."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun; returns the context and this rank's device.

    Not distributed: the device ``runtime.device`` names (``resolve_device``).
    """
    ctx = from_environment()
    if not ctx.enabled:
        return ctx, resolve_device(device_name)
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", ctx.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ctx, device


def check_weighting(name: str, ctx: DistContext) -> None:
    """ConfigError for a loss weighting that cannot run under DDP."""
    if ctx.enabled and name in UNSUPPORTED_WEIGHTINGS:
        raise ConfigError(
            f"loss.weighting={name!r} manipulates per-task gradients and is not supported with "
            f"{ctx.world_size} processes; use fixed, uncertainty or dwa, or train on one process"
        )


class ShardedBatchSampler:
    """Rank r takes samples r, r+W, r+2W, … of each global batch (batches smaller than W are skipped)."""

    def __init__(self, batch_sampler: Any, ctx: DistContext):
        self.batch_sampler = batch_sampler
        self.ctx = ctx

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the global sampler (same order on every rank)."""
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) >= self.ctx.world_size:
                yield batch[self.ctx.rank :: self.ctx.world_size]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (a no-op on one process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def loss_scale(local_batch: int, ctx: DistContext, device: torch.device) -> float:
    """``world_size · B_local / B_global``: makes DDP's gradient mean equal the single-process gradient."""
    if not ctx.enabled:
        return 1.0
    total = all_reduce_sum(torch.tensor(float(local_batch), device=device), ctx)
    return ctx.world_size * local_batch / float(total)


def average_gradients(params: Sequence[nn.Parameter], ctx: DistContext) -> None:
    """Mean of the gradients of parameters DDP does not own (e.g. learned task weights)."""
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is not None:
            all_reduce_sum(p.grad, ctx).div_(ctx.world_size)


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (SyncBatchNorm on CUDA); ``model`` itself when not distributed.

    Every head stays in the graph even when its task has no label in a shard (the masked loss multiplies by
    zero rather than skipping), so DDP needs no search for unused parameters.
    """
    if not ctx.enabled:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op on one process)."""
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group once every rank is here: a rank that destroyed its gloo group while another was
    still in its last collective aborted at exit now and then ("terminate called without an active exception",
    1 time in 8 in a 2-process CPU run; 0 in 12 with the barrier)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
