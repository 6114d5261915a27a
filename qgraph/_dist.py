"""torch.distributed helpers for the passes that merge statistics across ranks (private).

A pass merges when torch.distributed is initialized with more than one rank (``merge=None``) or
when asked (``merge=True``); every rank must then run it, in the same order. A rank that fails
still takes part in :func:`agree`, so the others raise too instead of waiting in a collective.
"""

from __future__ import annotations

import torch

from qgraph._errors import PreconditionError, QGraphError


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world(merge: bool | None, what: str) -> int:
    """How many ranks ``what`` merges over: 1 for none. ``merge=True`` needs a process group."""
    if merge is False:
        return 1
    if not initialized():
        if merge:
            raise PreconditionError(f"{what}: merge_ranks=True needs torch.distributed initialized (torchrun)")
        return 1
    return torch.distributed.get_world_size()


def device() -> torch.device:
    """Where the default group's collectives take tensors: the current GPU under NCCL alone."""
    backend = str(torch.distributed.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` all-reduced over the default group (moved to its collectives' device and back)."""
    dist = torch.distributed
    on = t.to(device())
    dist.all_reduce(on, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return on.to(t.device)


def agree(error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed: a failed rank raises its own error, the others
    a one-line QGraphError naming the first failed rank."""
    failed = torch.zeros(torch.distributed.get_world_size(), dtype=torch.int64)
    failed[torch.distributed.get_rank()] = int(error is not None)
    failed = all_reduce(failed)
    if error is not None:
        raise error
    if bool(failed.any()):
        rank = int(torch.nonzero(failed)[0])
        raise QGraphError(f"{what} failed on rank {rank} (its own error is in its output)")
