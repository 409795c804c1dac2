"""Data-parallel fine-tuning under torchrun: process group, sharded batches, metric sums.

When ``torchrun`` (``python -m torch.distributed.run``) starts the processes it
sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` then joins the process group (``nccl`` on CUDA,
``gloo`` on the CPU) and :func:`shard_loader` gives each rank its share of
every batch.

The global batch stays the one the loader was built with: with ``W`` ranks and
a loader of batch ``B``, each rank gets ``B/W`` samples of the very batch a
single process would have drawn (the order comes from the loader's own
sampler and generator, identical on every rank), and DDP averages the
gradients. So ``W x (B/W)`` makes the same step as ``1 x B`` (up to float
summation order and BatchNorm, whose batch statistics stay per rank), the
learning rate needs no rescaling, the number of steps per epoch is unchanged,
and a checkpoint written by ``W`` ranks resumes under any other ``W``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

log = logging.getLogger(__name__)

__all__ = ["DistContext", "setup", "teardown", "shard_loader", "all_sum", "launched_by_torchrun"]


@dataclass
class DistContext:
    """Where this process stands: ``world_size`` 1 and ``rank`` 0 when not distributed."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    created_group: bool = False  # this call initialised the group, so teardown destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_world_size() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given; else CUDA (``cuda:LOCAL_RANK`` under torchrun) when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device: torch.device, distributed: bool | None = None) -> DistContext:
    """Join (or reuse) the process group when launched by torchrun; a 1-process context otherwise.

    ``distributed``: None (default) follows the environment, False ignores it.
    """
    if distributed is False:
        return DistContext()
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")),
                          local_world_size(), dist.get_backend())
        return ctx if ctx.world_size > 1 else DistContext()
    if not launched_by_torchrun():
        if distributed:
            from ..errors import UsageError

            raise UsageError("distributed=True needs the WORLD_SIZE, RANK and MASTER_ADDR variables that "
                             "torchrun sets; launch with python -m torch.distributed.run")
        return DistContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")),
                      local_world_size(), backend, created_group=True)
    log.info("rank %d of %d joined the %s process group", ctx.rank, ctx.world_size, backend)
    return ctx


def teardown(ctx: DistContext) -> None:
    """Leave the process group this run joined.  The DistributedDataParallel wrapper and its reducer (which
    hold the group, in reference cycles) are collected first: a group destroyed while they live is freed
    with them at interpreter exit instead, where a gloo rank can abort ("terminate called without an
    active exception", seen once in CI on 2 loaded cores)."""
    if ctx.created_group and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def all_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves when not distributed)."""
    if not ctx.enabled:
        return list(values)
    backend_cuda = ctx.backend == "nccl"
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if backend_cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


class ShardSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` whose order is another sampler's.

    Every rank draws the full order from ``base`` (the single-process loader's
    sampler, seeded alike on all ranks) and keeps the indices ``rank, rank+W,
    ...``; the ``b = B/W`` consecutive ones a rank batches together are then
    its share of the global batch a single process would have drawn. With
    ``pad`` (training) the order is padded to a multiple of ``W`` by repeating
    its start, as DistributedSampler does, so every rank makes the same number
    of steps; without (evaluation) no sample is counted twice.
    """

    def __init__(self, base: Iterable[int], dataset, num_replicas: int, rank: int, pad: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.base = base
        self.pad = pad
        n = len(dataset)
        self.num_samples = math.ceil(n / num_replicas) if pad else len(range(rank, n, num_replicas))

    def __iter__(self) -> Iterator[int]:
        order = list(iter(self.base))
        if self.pad and len(order) % self.num_replicas:
            extra = self.num_replicas - len(order) % self.num_replicas
            order += (order * math.ceil(extra / len(order)))[:extra]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class _SlicedBatches:
    """Rank ``r``'s slice ``r::W`` of every batch of an iterable that is not a map-style DataLoader."""

    def __init__(self, batches: Any, ctx: DistContext):
        self.batches, self.ctx = batches, ctx

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield _slice(batch, self.ctx.rank, self.ctx.world_size)


def _slice(obj: Any, rank: int, world: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[rank::world]
    if isinstance(obj, dict):
        return {k: _slice(v, rank, world) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(v, rank, world) for v in obj)
    return obj


def shard_loader(loader: Any, ctx: DistContext, *, train: bool) -> Any:
    """This rank's share of ``loader`` (``loader`` itself when not distributed); see the module docstring."""
    if not ctx.enabled or loader is None:
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None or not hasattr(loader.dataset, "__len__"):
        return _SlicedBatches(loader, ctx)
    b = loader.batch_size
    per_rank = math.ceil(b / ctx.world_size)
    if b % ctx.world_size and ctx.is_main:
        log.warning("batch %d does not split evenly over %d ranks: each takes %d, the global batch is %d",
                    b, ctx.world_size, per_rank, per_rank * ctx.world_size)
    if train and loader.generator is None and ctx.is_main:
        log.warning("the training loader has no generator: every rank must seed torch alike "
                    "(torch.manual_seed) or the ranks shuffle differently")
    sampler = ShardSampler(loader.sampler, loader.dataset, ctx.world_size, ctx.rank, pad=train)
    # the loader's own generator: each epoch's iterator draws its worker seed from it before the sampler
    # draws the order, exactly as the single-process loader does
    return DataLoader(loader.dataset, batch_size=per_rank, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, timeout=loader.timeout, generator=loader.generator)
