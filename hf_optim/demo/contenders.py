"""The demo's contenders: one ``TrainingArguments(optim=..., optim_args=...)`` recipe each.

Adding an optimizer to the demo is adding a row here. Every row is trained through the same
Trainer, on the same data order, from the same initial weights; only the optimizer, its
learning rate, the Trainer's scheduler and ``optim_args`` differ. Run
``python -m hf_optim.demo --list`` to print this table resolved for a number of steps.
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
            learning_rate=3e-3,
            why="the Trainer's default optimizer; lr tuned on this task (1e-3, 3e-3, 1e-2)",
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
