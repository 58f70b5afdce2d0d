"""Momo in the conformance battery: plain, with weight decay and bias correction, and with
the online lower bound (a large cap so that the Polyak step and the estimate are active)."""

from __future__ import annotations

from cases import OptimizerCase
from hf_optim.momo import Momo

INVALID = (
    ({"lr": -1.0}, "lr"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"beta": 1.5}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"lb": float("nan")}, "lb"),
    ({"bias_correction": "yes"}, "bias_correction"),
    ({"use_fstar": 1}, "use_fstar"),
    ({"foreach": "fast"}, "foreach"),
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
