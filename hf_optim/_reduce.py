"""The one place where hf-optim optimizers reduce across tensors.

Every statistic that spans more than one tensor (CASMO's group AGAR and clamp scales, Momo's
inner products and norms, ...) is formed as *partial sums* of per-tensor contributions and
finished by :func:`finish_sums`. In one process, or under plain data parallelism where every
rank holds the whole replicated tensor, the partial sums already are the totals. Under sharded
training (FSDP2 DTensors, flat shards) each rank holds a slice, and this is where the partial
sums are all-reduced: one collective per step for all statistics together, because callers
stack everything they need into one tensor before calling it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "tensor_sums", "finish_sums"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_sums(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Per-tensor sums of all elements as a 1-D tensor (float32 or wider).

    Empty tensors contribute 0. The result is a partial (rank-local) quantity until it has
    gone through :func:`finish_sums`.
    """
    if not tensors:
        return torch.zeros(0, dtype=dtype or torch.float32)
    out_dtype = dtype or accumulation_dtype(tensors[0].dtype)
    return torch.stack([t.sum(dtype=out_dtype) for t in tensors])


def finish_sums(partial: Tensor, process_group: object | None = None) -> Tensor:
    """Turn rank-local partial sums into global sums.

    With ``process_group=None`` (one process, or data parallelism over replicated tensors) the
    partial sums are already global and are returned unchanged. With a process group the sums
    are all-reduced (SUM) over it in one collective.
    """
    if process_group is None:
        return partial
    import torch.distributed as dist

    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=process_group)
    return partial
