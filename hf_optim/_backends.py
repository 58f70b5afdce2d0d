"""Which optimizer runs right under which training backend, decided by the library.

The rules are data in the registry (``OptimizerInfo.backend_rules``); this module evaluates
them in two places:

* :func:`refusal` at start-up, from a name and constructor options (the recipes and the Hugging
  Face layer call it before training starts);
* :func:`check_backend` at the start of every ``step()`` of every hf-optim optimizer, under any
  script (stock Trainer, TRL, raw Accelerate, a raw ``deepspeed.initialize`` engine, a raw torch
  loop over DTensors). It recognises the backend from what the optimizer is handed: DTensor
  parameters (FSDP2), flattened FSDP1 parameters, or DeepSpeed's ZeRO optimizer calling
  ``step()`` (found on the call stack, once per parameter set). Under ZeRO-1/2 it also tells
  :mod:`hf_optim._reduce` the data-parallel group and the padding of each flat partition, so
  statistics over a parameter group are reduced exactly. The verdict is cached per optimizer
  and parameter set, so a step costs one tuple of parameter ids and a set lookup.

Every refusal names the optimizer, the backend, why, and what works instead; the alternatives
are computed from the same rules, so a refused backend is never recommended.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from torch.utils.weak import WeakIdKeyDictionary

from ._registry import OPTIMIZERS, OptimizerInfo, get_optimizer_info

__all__ = ["BACKENDS", "check_backend", "detect_backend", "refusal"]

#: backend name -> how messages call it
BACKENDS: dict[str, str] = {
    "ddp": "DDP",
    "fsdp1": "FSDP1 (FullyShardedDataParallel)",
    "fsdp2": "FSDP2 (torch's fully_shard; the Trainer's fsdp_config version 2)",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
}
_SHORT = {"fsdp2": "FSDP2", "fsdp1": "FSDP1"}
#: the backends offered as alternatives, in this order
_ALTERNATIVES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")


# -- start-up ---------------------------------------------------------------------------------
def refusal(
    info_or_name: OptimizerInfo | str,
    backend: str,
    options: Mapping[str, Any] | None = None,
) -> str | None:
    """The error message if ``backend`` cannot run the optimizer right with ``options``, else
    ``None``.

    ``options`` are constructor arguments (as ``optim_args`` gives them); the optional key
    ``param_groups`` is the number of parameter groups the optimizer will get (the Hugging
    Face Trainer makes 2: with and without weight decay; default 1).
    """
    info = (
        info_or_name
        if isinstance(info_or_name, OptimizerInfo)
        else get_optimizer_info(info_or_name)
    )
    _check_backend_name(backend)
    options = dict(options or {})
    groups = int(options.pop("param_groups", 1))
    return _refusal(info, backend, [_resolve(info, options)], groups, options)


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def _resolve(info: OptimizerInfo, options: Mapping[str, Any]) -> Mapping[str, Any]:
    """The options as the optimizer stores them in a param group (defaults filled in, upstream
    aliases and tuple forms translated): build it once on a one-element tensor."""
    import torch

    try:
        optimizer = info.load()([torch.zeros(1, requires_grad=True)], **options)
    except Exception:  # invalid options: the optimizer's own error comes when it is built
        return dict(options)
    return {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


def _refusal(
    info: OptimizerInfo,
    backend: str,
    groups: list[Mapping[str, Any]],
    group_count: int,
    options: Mapping[str, Any] | None = None,
) -> str | None:
    rules = _matching_rules(info, backend, groups, group_count)
    if not rules:
        return None
    name = info.load().__name__ if info.class_path else info.name
    works = [
        b
        for b in _ALTERNATIVES
        if b != backend and not _matching_rules(info, b, groups, group_count)
    ]
    fixes = [rule.fix for rule in rules]
    instead = []
    if all(fixes):  # every reason has a fix: applying them all makes this backend right
        instead.append(f"{' and '.join(fixes)} under {_SHORT.get(backend, BACKENDS[backend])}")
    if works:
        instead.append(
            ("the same options under " if instead else "") + " or ".join(BACKENDS[b] for b in works)
        )
    reasons = "; and ".join(rule.reason for rule in rules)
    return (
        f"{name} (optim='{info.name}') cannot run under {BACKENDS[backend]}: {reasons}. "
        f"What works instead: {'; or '.join(instead) or 'none of the supported backends'}."
    )


def _matching_rules(info, backend, groups, group_count):
    return [
        rule
        for rule in info.backend_rules
        if backend in rule.backends and any(rule.when(g, group_count) for g in groups)
    ]


# -- every step -------------------------------------------------------------------------------
#: optimizer -> set of parameter-set fingerprints already checked
_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_backend(optimizer: Any) -> None:
    """Raise ``RuntimeError`` at once when ``optimizer`` runs under a backend it cannot serve
    right (see the module docstring). Cheap after the first step of a parameter set."""
    key = tuple(id(p) for group in optimizer.param_groups for p in group["params"])
    seen = _CHECKED.get(optimizer)
    if seen is not None and key in seen:
        return
    zero = _calling_zero_optimizer()
    found = detect_backend(optimizer, zero)
    if found is not None:
        backend, groups, group_count = found
        info = _info_of(optimizer)
        if info is not None:
            message = _refusal(info, backend, groups, group_count)
            if message is not None:
                raise RuntimeError(message)
        if backend in ("zero1", "zero2"):
            _register_zero_partitions(zero[0])
        if zero is not None:
            _drop_empty_state(optimizer)
    _CHECKED.setdefault(optimizer, set()).add(key)


def _info_of(optimizer: Any) -> OptimizerInfo | None:
    cls = type(optimizer)
    path = f"{cls.__module__}.{cls.__qualname__}"
    for info in OPTIMIZERS.values():
        if info.class_path == path:
            return info
    for info in OPTIMIZERS.values():  # a subclass of a registered optimizer
        try:
            if isinstance(optimizer, info.load()):
                return info
        except Exception:  # pragma: no cover - a broken optional module
            continue
    return None


def detect_backend(
    optimizer: Any, zero: tuple[Any, dict] | None = None
) -> tuple[str, list[Mapping[str, Any]], int] | None:
    """``(backend, param-group options, number of param groups)`` for the sharded backend
    ``optimizer`` is stepped under, or ``None`` (one process, DDP, or unrecognised).

    DeepSpeed is recognised only while its ZeRO optimizer is calling ``step()`` (it is found on
    the call stack; ``zero`` is what :func:`_calling_zero_optimizer` found, looked up here when
    not given); DTensor parameters mean FSDP2, flattened parameters FSDP1.
    """
    groups = optimizer.param_groups
    if zero is None:
        zero = _calling_zero_optimizer()
    if zero is not None:
        zero_optimizer, frame_locals = zero
        all_groups = frame_locals.get("original_param_groups") or groups
        stage = _zero_stage(zero_optimizer)
        return f"zero{stage}", [_options(g) for g in all_groups], len(all_groups)
    params = [p for g in groups for p in g["params"]]
    from ._reduce import is_sharded

    if any(is_sharded(p) for p in params):
        return "fsdp2", [_options(g) for g in groups], len(groups)
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        return "fsdp1", [_options(g) for g in groups], len(groups)
    return None


def _options(group: Mapping[str, Any]) -> Mapping[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _calling_zero_optimizer(search: int = 12) -> tuple[Any, dict] | None:
    """DeepSpeed's ZeRO optimizer (and its frame's locals) if it is calling ``step()`` now."""
    if "deepspeed" not in sys.modules:
        return None
    frame = sys._getframe(1)
    for _ in range(search):
        if frame is None:
            break
        # Only a DeepSpeed frame's locals are read: reading ``f_locals`` snapshots them into a
        # dict the frame keeps, so reading a caller's (the user's training function) would keep
        # its Trainer and optimizer alive after the user dropped them.
        if frame.f_globals.get("__name__", "").startswith(_ZERO_MODULES):
            owner = frame.f_locals.get("self")
            if type(owner).__module__.startswith(_ZERO_MODULES):
                return owner, frame.f_locals
        frame = frame.f_back
    return None


_ZERO_MODULES = ("deepspeed.runtime.zero", "deepspeed.runtime.bf16_optimizer")


def _zero_stage(zero_optimizer: Any) -> int:
    module = type(zero_optimizer).__module__
    if "stage3" in module:
        return 3
    return 2 if getattr(zero_optimizer, "partition_gradients", False) else 1


def _drop_empty_state(optimizer: Any) -> None:
    """ZeRO steps one parameter group at a time and, after the first, reads
    ``optimizer.state[partition]`` of every group to link its fragments (``state`` is a
    defaultdict: an empty entry is left behind for each group not yet stepped). An empty entry
    is no state: removed, so that each optimizer initialises the partition's state as it would
    on any first step (AutoSGM stopped with KeyError 'step', AMaC with 'exp_avg')."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in optimizer.state and not optimizer.state[p]:
                del optimizer.state[p]


def _register_zero_partitions(zero_optimizer: Any) -> None:
    """Tell :mod:`hf_optim._reduce` each flat fp32 partition's data-parallel group and how many
    of its elements are real (ZeRO pads partitions for alignment)."""
    import torch.distributed as dist

    from ._reduce import register_flat_partition

    needed = (
        "single_partition_of_fp32_groups",
        "real_dp_process_group",
        "partition_size",
        "round_robin_bit16_meta",
        "round_robin_bit16_offsets",
    )
    missing = [name for name in needed if not hasattr(zero_optimizer, name)]
    if missing:
        raise RuntimeError(
            f"hf-optim cannot read the partitions of DeepSpeed's {type(zero_optimizer).__name__} "
            f"(no {', '.join(missing)}), so it cannot reduce its statistics over them; use "
            "DeepSpeed ZeRO-2, DDP or FSDP2"
        )
    for index, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        group = zero_optimizer.real_dp_process_group[index]
        size = int(zero_optimizer.partition_size[index])
        start = dist.get_rank(group=group) * size
        end = start + size
        metas = zero_optimizer.round_robin_bit16_meta[index]
        offsets = zero_optimizer.round_robin_bit16_offsets[index]
        valid = sum(
            max(0, min(offset + meta.numel(), end) - max(offset, start))
            for meta, offset in zip(metas, offsets, strict=True)
        )
        register_flat_partition(flat, group, valid)
