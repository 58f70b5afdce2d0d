"""Optimizer configurations shared by the sharded-training checks (FSDP2, DCP, DeepSpeed, bench).

Every configuration issue 12 lists: CASMO in both granularities, AutoSGM with each numerator
(``num_lrc`` 0, 2, 3, 4) and every window, AMaC with every feature on (noise, gradient
centralization, Lookahead, SWA) and off, Momo and MomoAdam with and without ``use_fstar``, and
torch's AdamW as the control. ``second`` holds the overrides of the second parameter group.

The checks train :data:`STEPS` steps: CASMO's 4-step calibration window ends and the DDEA runs
after it, AMaC passes warm-up, Lookahead synchronisations and SWA averaging, the AutoSGM windows
are short enough to pass through their shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STEPS = 12


@dataclass(frozen=True)
class Config:
    name: str
    #: registry name (``hf_optim.get_optimizer_class``) or ``"adamw"`` for torch.optim.AdamW
    optimizer: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    second: dict[str, Any] = field(default_factory=dict)
    #: a negative control: the check passes when it finds the mismatch
    expect_mismatch: bool = False

    @property
    def family(self) -> str:
        return self.optimizer


_CASMO = {"lr": 1e-2, "tau_init_steps": 4, "weight_decay": 0.01}
_AMAC_ALL = {
    "total_steps": STEPS,
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

CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("adamw", "adamw", {"lr": 1e-2, "weight_decay": 0.01}, {"lr": 5e-3}),
        Config("naive-norm-control", "naive-norm-control", {"lr": 0.02}, {"lr": 0.01}, True),
        Config(
            "casmo-group",
            "casmo",
            _CASMO,
            {"lr": 5e-3, "c_min": 0.3, "tau_dead_zone": 0.0, "betas": (0.8, 0.99)},
        ),
        Config(
            "casmo-parameter",
            "casmo",
            {**_CASMO, "granularity": "parameter", "tau_init_steps": 3},
            {"lr": 5e-3, "tau_init_steps": 5, "agar_clamp_factor": None},
        ),
        Config(
            "casmo-upstream-switches",
            "casmo",
            {**_CASMO, "center": "mean", "adaptive_c_min": True, "agar_bias_correction": True},
            {"center": "tau", "agar_clamp_factor": 3.0, "weight_decay": 0.0},
        ),
        Config(
            "autosgm-lrc0-cosine",
            "autosgm",
            {
                "lr": 1e-2,
                "num_lrc": 0,
                "gamma": 0.3,
                "window": "cosine",
                "window_steps": 8,
                "window_half": False,
                "window_flat": 0.2,
                "window_floor": 0.1,
                "weight_decay": 0.01,
                "decoupled": True,
            },
            {"lr": 5e-3, "beta_i": 0.8, "gamma": 0.0, "num_lrc": 3, "beta_n": 0.95},
        ),
        Config(
            "autosgm-lrc2-linear",
            "autosgm",
            {"lr": 1e-2, "num_lrc": 2, "beta_n": 0.9, "window": "linear", "window_steps": 10},
            {"lr": 2e-2, "num_lrc": 4, "eps_inside_sqrt": False},
        ),
        Config(
            "autosgm-lrc3-logistic-restart",
            "autosgm",
            {
                "lr": 1e-2,
                "num_lrc": 3,
                "beta_n": 0.99,
                "gamma": 0.9 / 1.9,
                "window": "logistic",
                "window_steps": 6,
                "window_shape": 4.0,
                "restart": True,
            },
            {"lr": 3e-2, "beta_n": 0.9, "cf": 2.0, "maximize": True},
        ),
        Config(
            "autosgm-lrc4-beta_exp-elementwise",
            "autosgm",
            {
                "lr": 1e-2,
                "num_lrc": 4,
                "beta_n": 0.99,
                "per_tensor": False,
                "debias": True,
                "weight_decay": 0.05,
                "decoupled": True,
                "window": "beta_exp",
                "window_steps": 10,
                "window_shape": 0.5,
                "window_unit_steps": 2,
            },
            # elementwise in both groups: runs under ZeRO with several groups
            {"lr": 2e-2, "num_lrc": 2, "beta_n": 0.9},
        ),
        Config(
            "autosgm-lrc4-polynomial",
            "autosgm",
            {"lr": 1e-2, "num_lrc": 4, "beta_n": 0.9, "window": "polynomial", "window_steps": 10},
            {"num_lrc": 2, "lr": 2e-2},
        ),
        Config(
            "autosgm-lrc2-logistic_late",
            "autosgm",
            {
                "lr": 1e-2,
                "num_lrc": 2,
                "beta_n": 0.9,
                "window": "logistic_late",
                "window_steps": 10,
            },
            {"num_lrc": 0, "lr": 2e-2},
        ),
        Config(
            "amac-everything",
            "amac",
            _AMAC_ALL,
            {
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
        ),
        Config(
            # skip_nonfinite adds a count to AMaC's one collective: every rank must issue it
            # with the same size, the rank holding empty shards included
            "amac-everything-skip-nonfinite",
            "amac",
            {**_AMAC_ALL, "skip_nonfinite": True},
            {"lr": 5e-3, "momentum": 0.5, "noise_factor": 0.2, "seed": 3},
        ),
        Config(
            "amac-features-off",
            "amac",
            {
                "lr": 1e-2,
                "schedule": False,
                "centralize_gradients": False,
                "noise_factor": 0.0,
                "clip_value": None,
                "dynamic_weight_decay": False,
                "lookahead": False,
                "swa": False,
            },
            {"lr": 5e-3, "momentum": 0.0, "weight_decay": 0.0, "bias_correction": False},
        ),
        Config("momo", "momo", {"lr": 1.0}, {"lr": 0.5}),
        Config(
            "momo-wd-bias-correction",
            "momo",
            {"lr": 10.0, "weight_decay": 1e-2, "bias_correction": True},
            {"weight_decay": 0.0, "lr": 3.0},
        ),
        Config(
            "momo-fstar",
            "momo",
            {"lr": 100.0, "use_fstar": True, "weight_decay": 1e-3},
            {"lr": 10.0},
        ),
        Config("momo_adam", "momo_adam", {"lr": 1e-2}, {"lr": 0.1, "betas": (0.8, 0.99)}),
        Config(
            "momo_adam-wd-no-divide",
            "momo_adam",
            {"lr": 1.0, "weight_decay": 1e-2, "divide": False},
            {"weight_decay": 0.0, "eps": 1e-6},
        ),
        Config(
            "momo_adam-fstar",
            "momo_adam",
            {"lr": 10.0, "use_fstar": True, "weight_decay": 1e-3},
            {"lr": 1.0},
        ),
    )
}

#: not hf-optim optimizers: torch's AdamW (must pass) and a deliberately naive reduction
#: (must be caught: it proves the check can fail)
CONTROLS = ("adamw", "naive-norm-control")
FAMILIES = ("adamw", "naive-norm-control", "casmo", "autosgm", "amac", "momo", "momo_adam")


def select(patterns: list[str]) -> list[Config]:
    """Configurations named by ``patterns``: a family (optimizer name, e.g. ``casmo``: all its
    configurations), a configuration name, or ``all``. Unknown names raise, listing the valid ones."""
    chosen: list[Config] = []
    for pattern in patterns:
        if pattern == "all":
            matches = list(CONFIGS.values())
        elif pattern in FAMILIES:
            matches = [c for c in CONFIGS.values() if c.family == pattern]
        else:
            matches = [CONFIGS[pattern]] if pattern in CONFIGS else []
        if not matches:
            raise SystemExit(
                f"unknown configuration {pattern!r}; valid: all, {', '.join(FAMILIES)}, "
                + ", ".join(CONFIGS)
            )
        chosen.extend(c for c in matches if c not in chosen)
    return chosen
