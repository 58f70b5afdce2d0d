"""The one place where hf-optim optimizers meet process groups.

Every statistic that spans more than one tensor (CASMO's group AGAR and clamp scales, Momo's
inner products and norms, ...) is formed as *partial sums* of per-tensor contributions and
finished by :func:`finish_sums`. In one process, or under plain data parallelism where every
rank holds the whole replicated tensor, the partial sums already are the totals. Under sharded
training each rank holds a slice, and the partial sums are all-reduced here: one collective per
reduction phase, because callers stack everything a phase needs into one tensor.

Each element must be counted exactly once across ranks. A rank's piece of a parameter
:func:`counts` unless another rank holds the same values and counts them instead: a plain
(replicated) tensor next to sharded ones counts on rank 0 only; a DTensor counts on the ranks
whose coordinate is 0 on every mesh dimension where it is replicated (HSDP's replicate
dimension). The sum then runs over the default process group, whatever the mesh.

DeepSpeed ZeRO-1/2 hands the optimizer one flat partition per parameter group instead (plain
tensors, padded for alignment). :mod:`hf_optim._backends` recognises that and registers each
partition here with :func:`register_flat_partition`: its sums then run over ZeRO's
data-parallel group, every rank's partition counts (they are disjoint), and
:func:`valid_numel` excludes the padding.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "local",
    "is_sharded",
    "counts",
    "valid_numel",
    "reduction_group",
    "finish_sums",
    "global_offset",
    "tensor_sums",
    "register_flat_partition",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a tensor whose elements are spread over ranks)."""
    # Only a program that has imported torch.distributed.tensor can hold a DTensor, so the
    # check never imports it (and stays a plain isinstance under torch.compile).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's piece of ``t``: ``t.to_local()`` for a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


#: attribute that marks a flat partition (DeepSpeed ZeRO-1/2): (its data-parallel process
#: group, real elements). An attribute on the tensor rather than a side table: it lives and dies
#: with the tensor, and dynamo traces a tensor attribute without a graph break.
_PARTITION_ATTRIBUTE = "_hf_optim_flat_partition"


def register_flat_partition(p: Tensor, process_group: Any, valid: int) -> None:
    """Declare ``p`` this rank's piece of a flat partition over ``process_group`` of which
    ``valid`` leading-or-interleaved elements are real (the rest is zero padding)."""
    setattr(p, _PARTITION_ATTRIBUTE, (process_group, int(valid)))


def _partition(p: Tensor) -> tuple[Any, int] | None:
    return getattr(p, _PARTITION_ATTRIBUTE, None)


def reduction_group(params: Iterable[Tensor]) -> Any | None:
    """The process group over which partial sums of ``params`` are summed; ``None`` when no
    parameter is sharded (one process, or data parallelism over whole replicas).

    DTensors: the default group (replicas are masked by :func:`counts`). ZeRO flat partitions:
    their data-parallel group (one per optimizer; mixing it with DTensors is an error).
    """
    params = list(params)
    groups = {}
    for p in params:  # a plain loop: dynamo cannot trace a walrus inside a comprehension
        entry = _partition(p)
        if entry is not None:
            groups[id(entry[0])] = entry[0]
    if groups:
        if len(groups) > 1 or any(is_sharded(p) for p in params):
            raise RuntimeError(
                "hf-optim reduces one step's statistics over one process group, but these "
                "parameters are ZeRO partitions of different data-parallel groups (or mixed "
                "with DTensors)"
            )
        return next(iter(groups.values()))
    if not any(is_sharded(p) for p in params):
        return None
    import torch.distributed as dist

    return dist.group.WORLD


def counts(p: Tensor, process_group: Any | None) -> bool:
    """Whether this rank's piece of ``p`` is counted in sums finished over ``process_group``
    (the :func:`reduction_group` of the parameters reduced together; ``None``: always)."""
    if process_group is None:
        return True
    import torch.distributed as dist

    if _partition(p) is not None:  # ZeRO partitions of different ranks are disjoint
        return True
    if not is_sharded(p):
        return dist.get_rank(group=process_group) == 0
    from torch.distributed.tensor import Replicate

    coordinate = p.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not part of the parameter's mesh
        return False
    return all(
        index == 0
        for index, placement in zip(coordinate, p.placements, strict=True)
        if isinstance(placement, Replicate)
    )


def valid_numel(p: Tensor) -> int:
    """Real elements in this rank's piece of ``p`` (padding excluded)."""
    entry = _partition(p)
    if entry is not None:
        return entry[1]
    return local(p).numel()


def finish_sums(partial: Tensor, process_group: Any | None = None) -> Tensor:
    """Turn rank-local partial sums into global sums.

    With ``process_group=None`` the partial sums are already global and are returned unchanged.
    Otherwise they are all-reduced (SUM) over the group in one collective.
    """
    if process_group is None:
        return partial
    import torch.distributed as dist

    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=process_group)
    return partial


def global_offset(p: Tensor) -> tuple[int, bool]:
    """(offset of this rank's piece in the row-major flattening of the global tensor, whether
    the piece is one contiguous run of that flattening).

    A plain tensor is its own global tensor: ``(0, True)``. A DTensor sharded only on dim 0
    (FSDP2's default) is contiguous; other layouts are not, and callers that key values on
    global positions must then compute them per element.
    """
    if not is_sharded(p):
        return 0, True
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offsets = compute_local_shape_and_global_offset(
        p.shape, p.device_mesh, p.placements
    )
    strides = torch.empty(p.shape, device="meta").stride()
    offset = sum(o * s for o, s in zip(offsets, strides, strict=True))
    shard_dims = {pl.dim for pl in p.placements if isinstance(pl, Shard)}
    return offset, shard_dims <= {0} or len(local_shape) == 0


def tensor_sums(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Per-tensor sums of all elements as a 1-D tensor (float32 or wider); empty tensors
    contribute 0. A partial (rank-local) quantity until it has gone through finish_sums."""
    if not tensors:
        return torch.zeros(0, dtype=dtype or torch.float32)
    out_dtype = dtype or accumulation_dtype(tensors[0].dtype)
    return torch.stack([t.sum(dtype=out_dtype) for t in tensors])
