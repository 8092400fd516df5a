"""The few torch.distributed collectives a probe needs, behind one small object.

Under ``torchrun`` every rank runs the same probe; a probe that can split its work (grid points of
a surface, probe vectors of a trace or density, ...) asks ``ctx.dist`` for its share and combines the
pieces with ``all_reduce_sum`` or ``all_gather_split``. Probes that cannot split compute the same
result on every rank; rank 0 alone writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torch.distributed job (rank, world size) and its collectives."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """Whether more than one process takes part (collectives are no-ops otherwise)."""
        return self.world_size > 1

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Σ over ranks of ``array`` (float64), identical on every rank."""
        if not self.active:
            return np.asarray(array)
        t = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.numpy()

    def all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of ``t`` (in place where the backend allows; returned either way)."""
        if self.active:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def shard(self, items: list) -> list[int]:
        """Indices of ``items`` this rank owns: rank, rank + W, rank + 2W, ..."""
        return list(range(self.rank, len(items), self.world_size))

    def split(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items, [⌈n·r/W⌉, ⌈n·(r+1)/W⌉): rank order is item order."""
        return range(-(-n * self.rank // self.world_size), -(-n * (self.rank + 1) // self.world_size))

    def all_gather_split(self, part: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
        """Every rank's ``part`` (its ``split(n)`` slice along ``dim``) concatenated in rank order, on every rank.

        The parts are padded to ⌈n/W⌉ for the collective (all_gather needs equal sizes) and trimmed after;
        the result has the device and dtype of ``part``. Alone: ``part`` itself.
        """
        if not self.active:
            return part
        x = part.movedim(dim, 0)
        size = -(-n // self.world_size)
        comm = _comm_device()
        buf = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=comm)
        buf[: x.shape[0]] = x.to(comm)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, buf)
        counts = [len(Distributed(r, self.world_size).split(n)) for r in range(self.world_size)]
        out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(part.device)
        return out.movedim(0, dim)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (in memory between our own processes)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank reaches this call (nothing to wait for in a single process)."""
        if self.active:
            torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where a tensor must be for the collective: the current GPU under NCCL, the CPU under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def chunks_for_rank(n_points: int, chunk_size: int, rank: int, world_size: int) -> np.ndarray:
    """Flat point indices of the fixed chunks ``rank``, ``rank + W``, ... of ``chunk_size`` consecutive points.

    Whole chunks move between ranks, so every point is evaluated in the same chunk as in a
    single-process run and the combined result is identical to it bit for bit.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    starts = np.arange(0, n_points, chunk_size)[rank::world_size]
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s, min(s + chunk_size, n_points)) for s in starts])
