"""Momo in the conformance battery: plain, with weight decay and bias correction, and with
the online lower bound (a large cap so that the Polyak step and the estimate are active)."""

from __future__ import annotations

from cases import OptimizerCase
from hf_optim.momo import Momo

INVALID = (
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"beta": 1.0}, "beta"),
    ({"beta": 5.0}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"lb": float("nan")}, "lb"),
    ({"lb": float("-inf")}, "lb"),
    ({"bias_correction": "yes"}, "bias_correction"),
    ({"use_fstar": 1}, "use_fstar"),
    ({"implementation": "fast"}, "implementation"),
    ({"skip_nonfinite": "yes"}, "skip_nonfinite"),
)

CASES = [
    OptimizerCase(
        id="momo",
        cls=Momo,
        kwargs={"lr": 1.0},
        second_group={"lr": 0.5},
        invalid=INVALID,
    ),
    OptimizerCase(
        id="momo-wd-bias-correction",
        cls=Momo,
        kwargs={"lr": 10.0, "weight_decay": 1e-2, "bias_correction": True},
        second_group={"weight_decay": 0.0, "lr": 3.0},
        train_kwargs={"lr": 10.0, "weight_decay": 1e-3, "bias_correction": True},
        invalid=INVALID,
    ),
    OptimizerCase(
        id="momo-fstar",
        cls=Momo,
        kwargs={"lr": 100.0, "use_fstar": True, "weight_decay": 1e-3},
        second_group={"lr": 10.0},
        train_kwargs={"lr": 10.0, "use_fstar": True},
        invalid=INVALID,
    ),
]
