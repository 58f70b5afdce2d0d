"""AMaC in the conformance battery: every feature on with windows short enough that the
battery's 6 to 14 steps pass through warm-up, cosine, the floor, Lookahead synchronisations and
SWA events (and a resume split on an event); every extra feature off; upstream's names."""

from __future__ import annotations

from hf_optim.amac import AMaC

from . import OptimizerCase

INVALID = (
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"beta1": 1.5}, "beta1"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"wd": -0.1}, "wd"),
    ({"wd": 0.1, "weight_decay": 0.1}, "weight_decay"),
    ({"momentum": 1.0}, "momentum"),
    ({"mu": -0.5}, "mu"),
    ({"noise_factor": -0.01}, "noise_factor"),
    ({"clip_value": 0.0}, "clip_value"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.5}, "warmup_steps"),
    ({"total_steps": 0}, "total_steps"),
    ({"total_steps": 1e-3}, "total_steps"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"lookahead_k": 0}, "lookahead_k"),
    ({"k": 0}, "'k'|k must"),
    ({"lookahead_alpha": 0.0}, "lookahead_alpha"),
    ({"alpha": 1.0}, "alpha"),
    ({"swa_start": -1}, "swa_start"),
    ({"seed": -1}, "seed"),
    ({"eval_weights": "swa"}, "eval_weights"),
    ({"schedule": "yes"}, "schedule"),
    ({"centralize_gradients": 1}, "centralize_gradients"),
    ({"lookahead": None}, "lookahead"),
    ({"total_steps": 10, "warmup_steps": 20, "schedule": True}, "warmup_steps"),
    ({"noise_factor": float("inf")}, "noise_factor"),
    ({"eps": float("nan")}, "eps"),
)

NOISE_MOVES = "AMaC's noise moves parameters whatever the gradient (documented)"

# The battery runs 12 (foreach), 14 (resume, split at 6) and 12 (host sync) steps: warm-up
# ends at 3, Lookahead synchronises at 3, 6, 9, 12, SWA averages at 6, 9, 12 and the cosine
# reaches its floor at 12.
EVERYTHING = {
    "total_steps": 12,
    "lr": 1e-2,
    "warmup_steps": 3,
    "lookahead_k": 3,
    "swa_start": 4,
    "noise_factor": 0.05,
    "clip_value": 0.5,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.05,
    "seed": 7,
}
OFF = {
    "lr": 1e-2,
    "schedule": False,
    "centralize_gradients": False,
    "noise_factor": 0.0,
    "clip_value": None,
    "dynamic_weight_decay": False,
    "lookahead": False,
    "swa": False,
}
# the convergence tests run 150 steps
TRAIN = {
    "total_steps": 150,
    "lr": 1e-2,
    "warmup_steps": 10,
    "swa_start": 50,
    "noise_factor": 0.01,
}

CASES = [
    OptimizerCase(
        id="amac-everything",
        cls=AMaC,
        kwargs=EVERYTHING,
        second_group={
            "lr": 5e-3,
            "betas": (0.8, 0.99),
            "momentum": 0.5,
            "weight_decay": 0.0,
            "lookahead_k": 2,
            "lookahead_alpha": 0.8,
            "swa_start": 2,
            "noise_factor": 0.2,
            "seed": 3,
            "warmup_steps": 0,
            "min_lr_ratio": 0.0,
        },
        train_kwargs=TRAIN,
        invalid=INVALID,
        zero_grad_moves_reason=NOISE_MOVES,
    ),
    OptimizerCase(
        id="amac-features-off",
        cls=AMaC,
        kwargs=OFF,
        second_group={"lr": 5e-3, "momentum": 0.0, "weight_decay": 0.0, "bias_correction": False},
        train_kwargs={**OFF, "lr": 1e-2},
        invalid=INVALID,
    ),
    OptimizerCase(
        id="amac-upstream-names",
        cls=AMaC,
        kwargs={
            "total_steps": 10,
            "lr": 1e-2,
            "beta1": 0.85,
            "beta2": 0.99,
            "mu": 0.8,
            "wd": 0.02,
            "alpha": 0.7,
            "k": 3,
            "warmup_steps": 0,
            "swa_start": 0,
        },
        second_group={"wd": 0.0, "mu": 0.0, "k": 2},
        train_kwargs={"total_steps": 150, "lr": 1e-2, "mu": 0.9, "wd": 0.01, "warmup_steps": 0},
        invalid=INVALID,
        zero_grad_moves_reason=NOISE_MOVES,
    ),
]
