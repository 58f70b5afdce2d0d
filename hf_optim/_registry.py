"""The optimizer registry: one record per name, read by the Hugging Face glue, the command
line, the benchmarks and the docs (registration as data, after timm's ``OptimInfo``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

__all__ = [
    "OptimizerInfo",
    "OPTIMIZERS",
    "get_optimizer_info",
    "get_optimizer_class",
    "list_optimizers",
]


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
        ),
        OptimizerInfo(
            name="momo",
            class_path="hf_optim.momo.Momo",
            description="SGD momentum with a Polyak-type adaptive step size from the loss",
            needs_loss=True,
            clipping_note="Momo's Polyak step size assumes the raw gradient of the loss it "
            "receives; a clipped gradient no longer matches that loss.",
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
