"""torch.distributed for torchrun launches: the process group from the environment, DDP around a task's
training step, rank partitions for evaluation, rank-0-only side effects.

``torchrun --nproc_per_node=N -m stages.teacher …`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the
rendezvous address); ``setup`` turns them into a process group — NCCL when training on CUDA (one GPU
per local rank), gloo on CPU (docs/method.md "torch.distributed on CPU"). Without those variables (or with
``WORLD_SIZE=1``) nothing here does anything: a single process runs exactly the single-process code.

What a distributed run changes (and what it does not):

- the training order is ``EpochSampler(rank, world)``: rank r takes every world-th index of the same
  (seed, epoch) permutation; the cached aug seed of image i in epoch e is still ``f(run_seed, e, i)``;
- ``train.batch_size`` is per rank (global batch = world × batch_size, as in torchvision's references);
- gradients are averaged by ``DistributedDataParallel`` around ``TrainStep`` — the task's whole training
  step as one forward, so every trainable module it uses (the student, CBAMs, connectors, projectors)
  is covered wherever it is called; ``find_unused_parameters`` handles steps that leave some unused
  (connector warm-up, per-epoch method weights);
- evaluation: each rank scores a disjoint part of the val set (``RankPartitionSampler``, no padding,
  no duplicates) and the confusion matrices are summed over ranks before any metric is computed;
- only rank 0 writes checkpoints, logs, summaries, result files and resolved configs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from attnfd_pipeline.utils import resolve_device
from attnfd_pipeline.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its node, and the
    device it trains on (``cuda:<local_rank>`` for a multi-process CUDA run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, world, local_rank) as torchrun (or any ``env://`` launcher) sets them; (0, 1, 0) without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent")
    return rank, world, local


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else env_ranks()[0]


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (also before the process group exists and after it is gone: from ``RANK``)."""
    return rank() == 0


def setup(device_spec: str = "auto", *, backend: str | None = None) -> DistContext:
    """The process group from the environment (idempotent) and this rank's device.

    ``device_spec`` as in ``train.device``; under a multi-process launch a bare ``cuda`` (or ``auto``
    with GPUs) becomes ``cuda:<LOCAL_RANK>``. ``backend``: default NCCL for CUDA, gloo for CPU (cache
    builds pass ``gloo``: they only need barriers)."""
    env_rank, env_world, local = env_ranks()
    device = resolve_device(device_spec)
    if env_world == 1 and not is_initialized():
        return DistContext(0, 1, 0, device)  # a single process: nothing changes
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", rank=env_rank, world_size=env_world)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device)


def shutdown() -> None:
    """Destroy the process group if there is one (the end of a torchrun stage)."""
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def launched() -> Iterator[None]:
    """Around a stage's body: whatever process group the body set up is destroyed when it ends."""
    try:
        yield
    finally:
        shutdown()


def barrier() -> None:
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor on ``t``'s device; ``t`` itself when single-process)."""
    if world_size() == 1:
        return t
    x = t.detach().to(_comm_device()).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; small things only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank. DDP broadcasts them at
    the start of each training forward, so after the last step each rank holds its own update; this
    makes evaluation (and anything after training) use exactly the buffers rank 0 checkpoints."""
    if world_size() == 1:
        return
    dev = _comm_device()
    for b in module.buffers():
        x = b.detach().to(dev)
        dist.broadcast(x, src=src)
        if x is not b:
            b.copy_(x)


# -----------------------------------------------------------------------------------------------
# samplers


class RankPartitionSampler(Sampler):
    """Indices ``rank, rank + world, …`` of ``range(n)``: the ranks' parts are disjoint and cover every
    index exactly once (unlike DistributedSampler, no padding duplicates). ``evaluate`` sums the
    confusion matrices of a loader with this sampler over ranks."""

    def __init__(self, n: int, *, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} not in [0, world={world})")
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def eval_sampler(n: int, ctx: DistContext) -> RankPartitionSampler | None:
    """The val sampler of this rank: None (the loader's plain sequential order) for a single process."""
    return RankPartitionSampler(n, rank=ctx.rank, world=ctx.world) if ctx.distributed else None


def is_rank_partition(loader) -> bool:
    """Whether ``loader`` covers only this rank's part of its dataset (its results must be summed)."""
    s = getattr(loader, "sampler", None)
    return isinstance(s, RankPartitionSampler) and s.world > 1


# -----------------------------------------------------------------------------------------------
# DDP around a task


class TrainStep(nn.Module):
    """A task's ``train_step(batch, epoch)`` as the forward of a module that owns ``task.modules``.

    DDP needs a forward whose autograd graph covers the parameters it synchronises; the student's
    distillation modules (CBAMs, connectors) are called by the loss, outside the student's forward.
    Wrapping the whole step covers them wherever the task calls them."""

    def __init__(self, task: Any):
        super().__init__()
        self.trained = task.modules  # registered: DDP sees (and broadcasts) exactly these
        self.task = task  # a plain attribute (a task is not a Module)

    def forward(self, batch: dict, epoch: int):
        return self.task.train_step(batch, epoch)


def wrap_task(task: Any, device: torch.device, *, find_unused_parameters: bool = True) -> nn.Module:
    """``DistributedDataParallel(TrainStep(task))``: call it as ``step(batch, epoch)``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(TrainStep(task), device_ids=ids, output_device=ids[0] if ids else None,
               find_unused_parameters=find_unused_parameters)


# -----------------------------------------------------------------------------------------------
# SyncBatchNorm (``train.sync_bn``)


def to_sync_batchnorm(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm inside ``module`` by a SyncBatchNorm sharing its parameters and buffers
    (in place); returns what ``restore_batchnorm`` needs to put the originals back. The state_dict
    keys do not change, so checkpoints stay loadable by the plain model."""
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    return swapped


def restore_batchnorm(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo ``to_sync_batchnorm``: the original modules (same parameter and buffer tensors, so they hold
    what was trained) go back in place."""
    for parent, name, child in reversed(swapped):
        sync = getattr(parent, name)
        child.load_state_dict(sync.state_dict())  # a no-op unless the tensors were replaced (``.to``)
        child.train(sync.training)
        setattr(parent, name, child)
