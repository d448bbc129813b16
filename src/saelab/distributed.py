"""Training on several processes started by ``torchrun`` (PyTorch distributed: NCCL on GPUs, gloo on CPUs).

Data parallel: every rank reads its own shard of the activation source (every world_size-th forward batch of
contexts, run through the model by that rank alone, or read from the cache by it alone), shuffles it in a
buffer of its own (``buffer_tokens / world_size`` rows) and trains on ``batch_size / world_size`` rows of it
per step: the ranks' batches together make the global batch. Gradients are averaged over the ranks, so a
step equals the single-process step on the concatenated batch. Losses that are not a mean over
tokens reduce their batch statistics across ranks: the TopK family's FVU-normalised errors through
``DataParallel.sum`` (``normalized_error``), BatchTopK's batch-wide top k through ``top_of_batch``. The
firing counters are summed, so every rank sees the same dead latents. Only rank 0 writes files.

Several SAEs (one per hook): ``round_robin`` gives each rank its own share of them instead. This module sits
beside files.py at the top of the package because ``saelab cache`` (data/) writes in parallel too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Rank 0 alone evaluates and saves at the end while the others wait, and a block of activations can take
# minutes to collect on a CPU: the default 10-minute NCCL timeout is too short for that.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks; with ``world_size`` 1 every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None   # the device this rank trains on (cuda:LOCAL_RANK under NCCL)
    # Tensors handed to collectives live here: CPU for gloo, this rank's GPU for NCCL.
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, the final SAE and the evaluation."""
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes "
                             f"({self.world_size}): each rank trains on an equal share of every batch")

    def share(self, rows: int) -> int:
        """This rank's part of a global number of rows (a batch, a buffer)."""
        return rows // self.world_size

    def from_main(self, value: float | torch.Tensor) -> float | torch.Tensor:
        """Rank 0's ``value`` on every rank (a number or a tensor computed from rank 0's data, e.g. the input
        scale)."""
        if not self.active:
            return value
        if isinstance(value, torch.Tensor):
            tensor = value.to(self.comm_device, torch.float64).contiguous()
            dist.broadcast(tensor, src=0)
            return tensor.to(value.device, value.dtype)
        tensor = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    # --- reductions over the global batch ------------------------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, differentiable: the gradient reaches each rank's own contribution (see _SumOverRanks)."""
        if not self.active:
            return tensor
        return _SumOverRanks.apply(tensor)

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Counts (e.g. tokens each latent fired on) summed over ranks; no gradient."""
        if not self.active:
            return counts
        total = counts.detach().clone()
        dist.all_reduce(total)
        return total

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return tensor
        smallest = tensor.detach().clone()
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        return smallest

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all), concatenated along dim 0 in rank order."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def top_of_batch(self, flat: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` of this rank's entries among the ``count * world_size`` largest of the
        global batch (``flat``: this rank's non-negative activations, flattened; ``count``: its share).

        Each rank offers its own largest candidates; the smallest of the global top is the threshold,
        and each rank keeps its entries at least that large. Zeros are left out: the single-process
        selection may include some when fewer entries are positive, but a zero code changes nothing.
        Exact ties at the threshold could select a few more entries than one process would.
        """
        if not self.active:
            return flat.topk(count, sorted=False)
        total = count * self.world_size
        candidates = flat.detach().topk(min(total, len(flat)), sorted=False).values
        threshold = self.gather(candidates).topk(total, sorted=False).values.min()
        indices = ((flat >= threshold) & (flat > 0)).nonzero().squeeze(1)
        return flat[indices], indices

    def agree_to_stop(self, requested: bool, step: int, every: int) -> bool:
        """Whether to stop before ``step``: at once on one process; with several, at the next multiple of
        ``every`` after any rank's request, on every rank together (collectives must match up, and asking
        at every step would make GPUs wait for the host)."""
        if not self.active:
            return requested
        if step % every:
            return False
        value = torch.tensor([float(requested)], device=self.comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each value averaged over the ranks (for logs: per-rank means of equal shares average to the global)."""
        if not self.active or not values:
            return values
        names = sorted(values)  # the same order on every rank
        stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float64).to(self.comm_device)
                               for n in names])
        dist.all_reduce(stacked)
        return {name: total / self.world_size for name, total in zip(names, stacked)}

    # --- parameters ----------------------------------------------------------------------------------
    def average_gradients(self, parameters) -> None:
        """Average each parameter's gradient over the ranks (each rank's loss is over its own share)."""
        if not self.active:
            return
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    def broadcast_from_main(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (as DistributedDataParallel does at the start)."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is its adjoint, the all-reduce of the incoming gradients.

    Every rank computes the same loss from the summed value, so each rank's gradient for its own
    contribution comes out ``world_size`` times the single-process one; ``average_gradients`` divides
    that back, giving exactly the gradient of the loss over the global batch.
    """

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def data_parallel_from_env(device: str | None) -> DataParallel:
    """Join the process group torchrun set up the environment for (NCCL for CUDA devices, gloo for the CPU);
    a single process without torchrun's variables gets the no-op ``DataParallel``.

    ``device``: the configured device. Under torchrun each rank takes GPU ``LOCAL_RANK`` whenever a CUDA
    device is configured or available (``--device cuda:N`` included: one GPU per process).
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DataParallel(device=device)
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    wants_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if wants_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was given but this process sees no CUDA device")
    if wants_cuda:
        torch.cuda.set_device(local_rank)
        device, backend, comm_device = f"cuda:{local_rank}", "nccl", torch.device("cuda", local_rank)
    else:
        device, backend, comm_device = device or "cpu", "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError("a process group other than torchrun's is already initialised in this process")
    return DataParallel(rank, world_size, local_rank, device, comm_device)


def release_process_group() -> None:
    """Leave the process group at the end of a command (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def round_robin(items: list, rank: int, world_size: int) -> list:
    """The items rank ``rank`` trains when several SAEs are spread over ``world_size`` ranks: every
    ``world_size``-th one, starting at ``rank``. Each item goes to exactly one rank; a rank may get none."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return items[rank::world_size]
