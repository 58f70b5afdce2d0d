"""The optimizer registry: one record per name, read by the Hugging Face glue, the command
line, the benchmarks and the docs (registration as data, after timm's ``OptimInfo``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BackendRule",
    "OptimizerInfo",
    "OPTIMIZERS",
    "get_optimizer_info",
    "get_optimizer_class",
    "list_optimizers",
]


def _always(group: Mapping[str, Any], groups: int) -> bool:
    return True


@dataclass(frozen=True)
class BackendRule:
    """One combination of training backend and options an optimizer cannot run right under.

    ``when(group, groups)`` receives one parameter group's resolved options (as the optimizer
    stores them) and the number of parameter groups; it returns True where the rule refuses.
    Backend names: ``ddp``, ``fsdp1``, ``fsdp2``, ``zero1``, ``zero2``, ``zero3`` (see
    :mod:`hf_optim._backends`, which evaluates the rules and words the errors).
    """

    backends: tuple[str, ...]
    #: why the combination would be wrong (completes "... cannot run under X: <reason>")
    reason: str
    when: Callable[[Mapping[str, Any], int], bool] = _always
    #: the change of options that makes it right on the same backend ("" if none)
    fix: str = ""


# -- backend rules shared by every hf-optim optimizer ---------------------------------------
_FSDP1 = BackendRule(
    ("fsdp1",),
    "FSDP1 hands the optimizer flattened 1-D pieces of each rank's slice (some empty, with "
    "padding), so the tensor shapes and the shard layout its statistics and state depend on are "
    "gone",
)
_ZERO3 = BackendRule(
    ("zero3",),
    "ZeRO-3 steps the optimizer once per flat fp32 sub-group partition, which cuts across "
    "tensors and parameter groups; hf-optim does not map its statistics, counters and state "
    "onto those partitions",
)
_ZERO12 = ("zero1", "zero2")


_MOMO_ZERO_GROUPS = BackendRule(
    _ZERO12,
    "its Polyak step size sums inner products and norms over all parameter groups, and ZeRO "
    "steps each group separately (the Hugging Face Trainer makes two groups: with and without "
    "weight decay)",
    lambda group, groups: groups > 1,
    fix="a single parameter group",
)


def _option(group: Mapping[str, Any], key: str, default: Any) -> Any:
    return group.get(key, default)


@dataclass(frozen=True)
class OptimizerInfo:
    """What the rest of the package needs to know about one optimizer.

    ``hf_arguments`` maps ``transformers.TrainingArguments`` fields onto constructor arguments
    where they mean the same thing: ``learning_rate``, ``weight_decay``, ``adam_beta1``,
    ``adam_beta2`` (combined into ``betas``) and ``adam_epsilon``.
    """

    name: str
    class_path: str
    description: str
    needs_loss: bool = False
    owns_schedule: bool = False
    hf_arguments: tuple[str, ...] = field(default=("learning_rate", "weight_decay"))
    #: constructor arguments that switch the optimizer's own learning-rate schedule off (used
    #: by the Hugging Face glue for ``optim_args`` ``schedule_owner=trainer``)
    schedule_off: tuple[tuple[str, object], ...] = ()
    #: why the Trainer's gradient clipping (``max_grad_norm``) distorts this optimizer
    clipping_note: str = ""
    #: keeps averaged weights that ``train()``/``eval()`` swap in and out (SWA, Lookahead)
    has_averaged_weights: bool = False
    #: the constructor argument that takes the run's length in optimizer steps (the Hugging
    #: Face glue fills it from the Trainer's ``max_steps`` unless the user gives it)
    total_steps_argument: str | None = None
    #: combinations of training backend and options that are refused (all others run right)
    backend_rules: tuple[BackendRule, ...] = ()

    def load(self) -> type:
        module_name, _, class_name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module_name), class_name)


OPTIMIZERS: dict[str, OptimizerInfo] = {
    info.name: info
    for info in (
        OptimizerInfo(
            name="casmo",
            class_path="hf_optim.casmo.CASMO",
            description="Adam scaled by an AGAR signal-to-noise confidence (calibrated, DDEA-adapted)",
            hf_arguments=(
                "learning_rate",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_epsilon",
            ),
            backend_rules=(
                _FSDP1,
                _ZERO3,
                BackendRule(
                    _ZERO12,
                    "granularity='parameter' computes an AGAR statistic per tensor, and "
                    "ZeRO's flat partition of a parameter group mixes the tensors' elements",
                    lambda group, groups: _option(group, "granularity", "group") == "parameter",
                    fix="granularity='group'",
                ),
            ),
        ),
        OptimizerInfo(
            name="autosgm",
            class_path="hf_optim.autosgm.AutoSGM",
            description="low-pass-filter momentum with an iteration-dependent learning-rate numerator",
            owns_schedule=True,
            hf_arguments=("learning_rate", "weight_decay", "adam_epsilon"),
            schedule_off=(("window", "none"),),
            total_steps_argument="window_steps",
            clipping_note="AutoSGM's iteration-dependent step size is computed from the raw "
            "gradient statistics, which clipping rescales step by step.",
            backend_rules=(
                _FSDP1,
                _ZERO3,
                BackendRule(
                    _ZERO12,
                    "its learning-rate numerator (num_lrc 2, 3 or 4) is a mean per tensor "
                    "(per_tensor=True), and ZeRO's flat partition of a parameter group mixes "
                    "the tensors' elements",
                    lambda group, groups: (
                        _option(group, "num_lrc", 0) in (2, 3, 4)
                        and bool(_option(group, "per_tensor", True))
                    ),
                    fix="per_tensor=False (a numerator per element) or num_lrc=0",
                ),
            ),
        ),
        OptimizerInfo(
            name="amac",
            class_path="hf_optim.amac.AMaC",
            description="Adam with warm-up/cosine, centralization, noise, clipping, Lookahead and SWA",
            owns_schedule=True,
            schedule_off=(("schedule", False),),
            total_steps_argument="total_steps",
            clipping_note="AMaC already clips its normalised update internally (clip_value); "
            "clipping the gradient first applies a second, different clip.",
            has_averaged_weights=True,
            hf_arguments=(
                "learning_rate",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_epsilon",
            ),
            backend_rules=(
                _FSDP1,
                _ZERO3,
                BackendRule(
                    _ZERO12,
                    "gradient centralization removes a mean per output channel, and ZeRO's "
                    "flat partition has no channels (it mixes the tensors' elements)",
                    lambda group, groups: bool(_option(group, "centralize_gradients", True)),
                    fix="centralize_gradients=False",
                ),
                BackendRule(
                    _ZERO12,
                    "its noise is keyed by parameter and element position, which ZeRO's flat "
                    "partition changes, so the run would not be the run it is without ZeRO",
                    lambda group, groups: float(_option(group, "noise_factor", 0.01)) != 0.0,
                    fix="noise_factor=0",
                ),
            ),
        ),
        OptimizerInfo(
            name="momo",
            class_path="hf_optim.momo.Momo",
            description="SGD momentum with a Polyak-type adaptive step size from the loss",
            needs_loss=True,
            clipping_note="Momo's Polyak step size assumes the raw gradient of the loss it "
            "receives; a clipped gradient no longer matches that loss.",
            backend_rules=(_FSDP1, _ZERO3, _MOMO_ZERO_GROUPS),
        ),
        OptimizerInfo(
            name="momo_adam",
            class_path="hf_optim.momo_adam.MomoAdam",
            description="Adam with a Polyak-type adaptive step size from the loss",
            needs_loss=True,
            clipping_note="MomoAdam's Polyak step size assumes the raw gradient of the loss it "
            "receives; a clipped gradient no longer matches that loss.",
            hf_arguments=(
                "learning_rate",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_epsilon",
            ),
            backend_rules=(_FSDP1, _ZERO3, _MOMO_ZERO_GROUPS),
        ),
    )
}


def list_optimizers() -> list[str]:
    """The registered names, in registry order."""
    return list(OPTIMIZERS)


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The record for ``name``; a ``ValueError`` lists the valid names otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown hf-optim optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}"
        ) from None


def get_optimizer_class(name: str) -> type:
    return get_optimizer_info(name).load()
