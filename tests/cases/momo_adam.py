"""MomoAdam in the conformance battery: plain, with decoupled (divide=False) weight decay,
and with the online lower bound (a large cap so that the Polyak step is active)."""

from __future__ import annotations

from cases import OptimizerCase
from hf_optim.momo_adam import MomoAdam

INVALID = (
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (1.5, 0.9)}, "betas"),
    ({"betas": (0.9, -0.1)}, "betas"),
    ({"betas": (0.9,)}, "betas"),
    ({"eps": -1e-8}, "eps"),
    ({"eps": float("inf")}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"lb": float("nan")}, "lb"),
    ({"divide": None}, "divide"),
    ({"use_fstar": "no"}, "use_fstar"),
    ({"implementation": "fast"}, "implementation"),
    ({"skip_nonfinite": "yes"}, "skip_nonfinite"),
)

CASES = [
    OptimizerCase(
        id="momo_adam",
        cls=MomoAdam,
        kwargs={"lr": 1e-2},
        second_group={"lr": 0.1, "betas": (0.8, 0.99)},
        train_kwargs={"lr": 1e-1},
        invalid=INVALID,
    ),
    OptimizerCase(
        id="momo_adam-wd-no-divide",
        cls=MomoAdam,
        kwargs={"lr": 1.0, "weight_decay": 1e-2, "divide": False},
        second_group={"weight_decay": 0.0, "eps": 1e-6},
        train_kwargs={"lr": 1e-1, "weight_decay": 1e-3, "divide": False},
        invalid=INVALID,
    ),
    OptimizerCase(
        id="momo_adam-fstar",
        cls=MomoAdam,
        kwargs={"lr": 10.0, "use_fstar": True, "weight_decay": 1e-3},
        second_group={"lr": 1.0},
        train_kwargs={"lr": 1e-1, "use_fstar": True},
        invalid=INVALID,
    ),
]
