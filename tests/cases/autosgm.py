"""AutoSGM configurations for the conformance battery: the constant numerator with a window,
and each iteration-dependent numerator (2, 3, 4), in both configuration styles."""

from __future__ import annotations

from hf_optim.autosgm import AutoSGM

from . import OptimizerCase

# readable-style cases (keys they set are overridden here, never combined with a tuple)
_INVALID = (
    ({"lr": -1.0}, "lr"),
    ({"num_lrc": 5}, "num_lrc"),
    ({"beta_i": 1.0}, "beta_i"),
    ({"beta_n": -0.1}, "beta_n"),
    ({"beta_a": 1.5}, "beta_a"),
    ({"gamma": 0.95}, "gamma"),
    ({"eta_i": -1.0}, "eta_i"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"eps": -1e-8}, "eps"),
    ({"window": "triangle"}, "window"),
    ({"window": "cosine", "window_steps": 0}, "window_steps"),
    ({"window": "cosine", "window_steps": 10, "window_flat": 1.0}, "window_flat"),
    ({"window": "cosine", "window_steps": 10, "window_floor": 2.0}, "window_floor"),
    ({"window": "beta_exp", "window_steps": 10, "window_shape": 1.0}, "window_shape"),
    ({"window_unit_steps": 0}, "window_unit_steps"),
    ({"lr": 0.5, "lr_cfg": (True, 1e-3, 0)}, "conflicts"),
    ({"cf": 0.0}, "cf"),
    ({"maximize": "yes"}, "maximize"),
)
# the tuple-style case: invalid tuples, and a keyword that contradicts a tuple
_INVALID_TUPLES = (
    ({"lr_cfg": (True, -1e-3, 2)}, "lr"),
    ({"lr_cfg": (True, 1e-3, 9)}, "num_lrc"),
    ({"lr_cfg": (True, 1e-3)}, "lr_cfg"),
    ({"beta_cfg": (0.99, 0.999, 1.2, 0.0, 0, True)}, "beta_i"),
    ({"beta_cfg": (0.99, 0.999, 0.9, 0.95, 0, True)}, "gamma"),
    ({"rc_cfg": (1, 1, 0, 2, 1, 10, 1, 1, 0)}, "inseq"),
    ({"rc_cfg": (9, 0, 0, 2, 1, 10, 1, 1, 0)}, "rcm"),
    ({"rc_cfg": (1, 0, 0, 2, 1, 10, 1, 3, 0)}, "cfact"),
    ({"rc_cfg": (1, 0, 0, 2, 1, 0, 1, 1, 0)}, "tau"),
    ({"rc_cfg": (1, 0, 0, 2, 1, 10, 1, 1, 1.0)}, "window_flat"),
    ({"wd_cfg": (0.01, 3)}, "decoupled"),
    ({"wd_cfg": (-0.01, 0)}, "weight_decay"),
    ({"eps_cfg": (1e-10,)}, "eps_cfg"),
)

CASES = [
    OptimizerCase(
        id="autosgm-lrc0-window",
        cls=AutoSGM,
        kwargs={
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
        # the second group mixes in an iteration-dependent numerator
        second_group={"lr": 5e-3, "beta_i": 0.8, "gamma": 0.0, "num_lrc": 3, "beta_n": 0.95},
        train_kwargs={"lr": 5e-2, "window": "cosine", "window_steps": 150},
        invalid=_INVALID,
    ),
    OptimizerCase(
        id="autosgm-lrc2-tuples",
        cls=AutoSGM,
        kwargs={
            "lr_cfg": (True, 1e-2, 2),
            "beta_cfg": (0.99, 0.999, 0.9, 0.0, 0, True),
            "rc_cfg": (2, 0, 0.05, 1, 1, 2, 5, 1, 0),
            "wd_cfg": (0.0, 0),
            "eps_cfg": (1e-10, True),
        },
        second_group={"lr": 2e-2, "num_lrc": 4, "eps_inside_sqrt": False},
        train_kwargs={"lr_cfg": (True, 5e-2, 2), "beta_cfg": (0.99, 0.999, 0.9, 0.0, 0, True)},
        invalid=_INVALID_TUPLES,
    ),
    OptimizerCase(
        id="autosgm-lrc3-nag",
        cls=AutoSGM,
        kwargs={
            "lr": 1e-2,
            "num_lrc": 3,
            "beta_n": 0.99,
            "gamma": 0.9 / 1.9,
            "window": "logistic",
            "window_steps": 6,
            "window_shape": 4.0,
            "restart": True,
            "weight_decay": 0.01,
        },
        second_group={"lr": 3e-2, "beta_n": 0.9, "cf": 2.0, "maximize": True},
        train_kwargs={"lr": 0.1, "num_lrc": 3, "beta_n": 0.99},
        invalid=_INVALID,
    ),
    OptimizerCase(
        id="autosgm-lrc4-elementwise",
        cls=AutoSGM,
        kwargs={
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
        second_group={"per_tensor": True, "maximize": False, "lr": 2e-2},
        train_kwargs={"lr": 0.1, "num_lrc": 4, "beta_n": 0.99},
        invalid=_INVALID,
    ),
]
