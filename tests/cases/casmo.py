"""CASMO in the conformance battery: both granularities, both centres, the upstream switches,
with a calibration window short enough that the battery reaches calibration and the DDEA."""

from __future__ import annotations

from hf_optim.casmo import CASMO

from . import OptimizerCase

INVALID = (
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"granularity": "tensor"}, "granularity"),
    ({"tau_init_steps": 0}, "tau_init_steps"),
    ({"tau_init_steps": 2.5}, "tau_init_steps"),
    ({"tau_clip_range": (0.5, 0.1)}, "tau_clip_range"),
    ({"tau_clip_range": 0.5}, "tau_clip_range"),
    ({"tau_dead_zone": 1.5}, "tau_dead_zone"),
    ({"c_min": 1.5}, "c_min"),
    ({"agar_clamp_factor": 0.0}, "agar_clamp_factor"),
    ({"center": "median"}, "center"),
    ({"adaptive_c_min": "yes"}, "adaptive_c_min"),
    ({"agar_bias_correction": 1.5}, "agar_bias_correction"),
)

# The battery trains 6 to 14 steps: a 4-step window calibrates at step 4 and the DDEA runs after.
SHORT = {"lr": 1e-2, "tau_init_steps": 4, "weight_decay": 0.01}
# The convergence tests run 150 steps.
TRAIN = {"lr": 5e-2, "tau_init_steps": 20}

CASES = [
    OptimizerCase(
        id="casmo-group",
        cls=CASMO,
        kwargs=SHORT,
        second_group={"lr": 5e-3, "c_min": 0.3, "tau_dead_zone": 0.0, "betas": (0.8, 0.99)},
        train_kwargs=TRAIN,
        invalid=INVALID,
    ),
    OptimizerCase(
        id="casmo-parameter",
        cls=CASMO,
        kwargs={**SHORT, "granularity": "parameter", "tau_init_steps": 3},
        second_group={"lr": 5e-3, "tau_init_steps": 5, "agar_clamp_factor": None},
        train_kwargs={**TRAIN, "granularity": "parameter"},
        invalid=INVALID,
    ),
    OptimizerCase(
        id="casmo-upstream-switches",
        cls=CASMO,
        kwargs={
            **SHORT,
            "center": "mean",
            "adaptive_c_min": True,
            "agar_bias_correction": True,
        },
        second_group={"center": "tau", "agar_clamp_factor": 3.0, "weight_decay": 0.0},
        train_kwargs={**TRAIN, "center": "mean", "adaptive_c_min": True},
        invalid=INVALID,
    ),
]
