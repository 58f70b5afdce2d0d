"""hf-optim: CASMO, AutoSGM, AMaC, Momo and MomoAdam for PyTorch and the Hugging Face stack.

The optimizers import only torch. The Hugging Face glue lives in :mod:`hf_optim.hf` and is
loaded on first use of ``hf_optim.Trainer``, ``hf_optim.TrainingArguments`` and friends.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._base import HFOptimizer
from ._registry import (
    OPTIMIZERS,
    OptimizerInfo,
    get_optimizer_class,
    get_optimizer_info,
    list_optimizers,
)
from .hf import _autoregister

__version__ = "0.1.0"

_LAZY = {info.class_path.rpartition(".")[2]: info.class_path for info in OPTIMIZERS.values()}
# The Hugging Face glue (imports transformers when first touched).
_LAZY.update(
    {
        name: f"hf_optim.hf.{name}"
        for name in (
            "Trainer",
            "TrainingArguments",
            "OptimizerTrainerMixin",
            "OptimizerStatsCallback",
            "LossFeeder",
            "register_hf_optimizers",
        )
    }
)

__all__ = [
    "HFOptimizer",
    "OPTIMIZERS",
    "OptimizerInfo",
    "get_optimizer_class",
    "get_optimizer_info",
    "list_optimizers",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    # Optimizer classes load on first access so that a partial install (or a module that fails
    # to import) never breaks ``import hf_optim``.
    if name in _LAZY:
        module_name, _, class_name = _LAZY[name].rpartition(".")
        value = getattr(importlib.import_module(module_name), class_name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_optim' has no attribute {name!r}")


# Make optim="casmo" work with the stock TrainingArguments/Trainer: register now if
# transformers is already imported, otherwise right after it is (no transformers import here).
_autoregister.install()
