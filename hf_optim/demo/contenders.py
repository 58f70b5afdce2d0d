"""The demo's contenders: one ``TrainingArguments(optim=..., optim_args=...)`` recipe each.

Adding an optimizer to the demo is adding a row here. Every row is trained through the same
Trainer, on the same data order, from the same initial weights; only the optimizer, its
learning rate, the Trainer's scheduler, gradient clipping and ``optim_args`` differ. Run
``python -m hf_optim.demo --list`` to print this table resolved for a number of steps.

Learning rates were picked by exact match after 1000 steps (the default run) from the grids
given in ``why``; every other setting follows the upstream READMEs or the optimizer's docs.
Gradient clipping (the Trainer's ``max_grad_norm=1``) is kept for the Adam-type optimizers and
switched off where it distorts the optimizer's own statistics or clipping (the Hugging Face
glue warns about those).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Contender", "CONTENDERS", "DEFAULT_CONTENDERS", "get_contender", "format_optim_args"]


def _no_args(steps: int) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Contender:
    """How the demo trains with one optimizer.

    ``optim_args`` maps the run's number of optimizer steps to the ``optim_args`` entries
    (so step-dependent settings such as a calibration window scale with ``--steps``).
    ``why`` says where the choice comes from; it is printed in the docs table.
    """

    name: str
    optim: str
    learning_rate: float
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    optim_args: Callable[[int], dict[str, Any]] = field(default=_no_args)
    why: str = ""

    def resolved_optim_args(self, steps: int) -> str | None:
        return format_optim_args(self.optim_args(steps)) or None

    def training_arguments(self, steps: int) -> dict[str, Any]:
        """The ``TrainingArguments`` fields this contender sets."""
        return {
            "optim": self.optim,
            "optim_args": self.resolved_optim_args(steps),
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": self.lr_scheduler_type,
            "warmup_steps": self.warmup_ratio,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
        }


def format_optim_args(values: dict[str, Any]) -> str:
    """``{"a": 1, "betas": (0.9, 0.99)}`` -> ``"a=1,betas=0.9:0.99"`` (tuples joined by ``:``)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, (tuple, list)):
            value = ":".join(str(item) for item in value)
        parts.append(f"{key}={value}")
    return ",".join(parts)


CONTENDERS: dict[str, Contender] = {
    contender.name: contender
    for contender in (
        Contender(
            name="adamw",
            optim="adamw_torch",
            learning_rate=1e-2,
            why="the Trainer's default optimizer and schedule (linear decay, 5% warm-up); "
            "lr from {3e-3, 1e-2, 3e-2}",
        ),
        Contender(
            name="casmo",
            optim="casmo",
            learning_rate=1e-2,
            optim_args=lambda steps: {"tau_init_steps": max(10, steps // 20)},
            why="Adam scaled by a confidence <= 1, so AdamW's schedule; calibration over 5% "
            "of the steps (the CASMO README's B2 rule); lr from {3e-3, 1e-2, 3e-2}",
        ),
        Contender(
            name="autosgm",
            optim="autosgm",
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            max_grad_norm=0.0,
            optim_args=lambda steps: {
                "num_lrc": 3,
                "gamma": 0.5528,
                "window": "cosine",
                "window_steps": steps,
            },
            why="the AutoSGM README's setup: correlation numerator 3, filter zero 0.5528, its own "
            "cosine window over the run, Trainer scheduler constant; lr from {3e-3, 1e-2, 3e-2}",
        ),
        Contender(
            name="amac",
            optim="amac",
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            max_grad_norm=0.0,
            optim_args=lambda steps: {
                "warmup_steps": max(1, steps // 20),
                "swa_start": 3 * steps // 4,
            },
            why="its own warm-up (5%) and cosine to the end, Trainer scheduler constant; SWA "
            "over the last quarter; it clips its own update; heavy-ball momentum 0.9 on the Adam "
            "direction multiplies the step by ~10, hence a small lr, from {1e-4, 3e-4, 1e-3}",
        ),
        Contender(
            name="momo",
            optim="momo",
            learning_rate=0.3,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            max_grad_norm=0.0,
            why="constant lr as the Momo README recommends, lb=0 (cross-entropy); lr from "
            "{0.1, 0.3, 1 (the Momo README's default)}",
        ),
        Contender(
            name="momo_adam",
            optim="momo_adam",
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            max_grad_norm=0.0,
            optim_args=lambda steps: {"use_fstar": True},
            why="constant lr as the Momo README recommends; the loss floor estimated online (use_fstar), "
            "since with wrong labels the attainable loss is far above lb=0; lr from {1e-3, 3e-3, "
            "1e-2 (the Momo README's default)}",
        ),
    )
}

#: what ``python -m hf_optim.demo`` runs without ``--optimizers``
DEFAULT_CONTENDERS: tuple[str, ...] = tuple(CONTENDERS)


def get_contender(name: str) -> Contender:
    try:
        return CONTENDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown demo optimizer {name!r}; choose from: {', '.join(CONTENDERS)}"
        ) from None
