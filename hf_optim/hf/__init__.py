"""Hugging Face integration: ``optim=`` names, the Trainer, loss plumbing, Accelerate.

Importing this package does not import transformers; each name below loads its module (and
transformers) on first use. The ``optim=`` names are registered by ``import hf_optim`` (see
:mod:`hf_optim.hf._autoregister`); :func:`register_hf_optimizers` does it explicitly and raises
when the installed transformers cannot be extended. ``python -m hf_optim SCRIPT.py`` runs an
unmodified script with the names registered.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "trainer",
    "TrainingArguments": "trainer",
    "OptimizerTrainerMixin": "trainer",
    "OptimNameArgumentsMixin": "trainer",
    "OptimizerStatsCallback": "trainer",
    "export_averaged_weights": "trainer",
    "LossFeeder": "_loss",
    "LossWindow": "_loss",
    "attach": "trainer",
    "check_backend_at_start_up": "trainer",
    "register_hf_optimizers": "_register",
    "registration_status": "_register",
    "HFOptimRegistrationError": "_register",
    "SUPPORTED_TRANSFORMERS": "_register",
    "build_optimizer": "_build",
    "optimizer_kwargs": "_build",
    "optimizer_cls_and_kwargs": "_build",
    "unwrap_optimizer": "_build",
    "OptimArgsError": "_schema",
    "parse_optim_args": "_schema",
    "argument_specs": "_schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
