"""Conformance cases: one module per optimizer file, each defining ``CASES``.

A case is an optimizer class with a configuration to exercise. Every module in this package is
collected automatically, so a new optimizer joins the whole conformance battery by adding one
file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

import pytest

#: the implementation axis of per-optimizer tests: the eager reference in the default pass, the
#: compiled kernels in the slow pass (compiling on 2 cores costs seconds per kernel)
IMPLEMENTATIONS = ("eager", pytest.param("compiled", marks=pytest.mark.slow))


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration for the shared battery.

    * ``kwargs``: the configuration under test; keep internal windows short (e.g. a
      calibration of a few steps) so that the tests reach every phase of the algorithm.
    * ``second_group``: hyperparameters that differ in the second parameter group.
    * ``train_kwargs``: configuration for the convergence tests (defaults to ``kwargs``).
    * ``invalid``: ``(kwargs, name)`` pairs that must raise ``ValueError`` mentioning ``name``.
    * ``zero_grad_moves_reason``: why this configuration moves parameters on zero gradients.
    * ``host_sync_reason``: set only where the spec says the algorithm cannot avoid a host
      synchronisation inside ``step()``; the sync and graph-break checks then skip with it.
    """

    id: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    second_group: dict[str, Any] = field(default_factory=dict)
    train_kwargs: dict[str, Any] | None = None
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()
    host_sync_reason: str | None = None
    #: why zero gradients may move the parameters (AMaC's noise); ``None``: they must not
    zero_grad_moves_reason: str | None = None

    @property
    def needs_loss(self) -> bool:
        return bool(getattr(self.cls, "needs_loss", False))

    def make(self, params: Any, **overrides: Any):
        """The optimizer, with the eager reference unless ``implementation=`` says otherwise
        (the battery's implementation axis asks for the compiled kernels explicitly)."""
        return self.cls(params, **{"implementation": "eager", **self.kwargs, **overrides})


def all_cases() -> list[OptimizerCase]:
    cases: list[OptimizerCase] = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        cases.extend(module.CASES)
    return cases
