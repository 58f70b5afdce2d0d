"""Hand a loss-aware optimizer (Momo, MomoAdam) its loss in a raw Accelerate loop.

Accelerate's ``AcceleratedOptimizer.step(closure=None)`` forwards no ``loss=`` keyword, and
with ``accelerator.accumulate`` the optimizer steps only once per window. :class:`LossFeeder`
collects the micro-batch losses of a window and, on the window's last micro-batch, hands their
mean (the loss of the whole mini-batch, averaged over data-parallel ranks) to the optimizer
with ``set_loss``. The optimizer itself stays a plain ``torch.optim.Optimizer``, so
``accelerator.prepare`` and every LR scheduler accept it::

    optimizer = hf_optim.Momo(model.parameters(), lr=1.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    feeder = hf_optim.LossFeeder(optimizer, accelerator)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            feeder.add(loss)            # on the last micro-batch: optimizer.set_loss(window mean)
            optimizer.step()
            optimizer.zero_grad()

``feeder.add`` is harmless for optimizers that need no loss, so one loop serves all five.
"""

from __future__ import annotations

from typing import Any

import torch

from ._build import mean_over_ranks, unwrap_optimizer

__all__ = ["LossFeeder"]


class LossFeeder:
    """Collects the loss of one accumulation window and hands it to the optimizer.

    ``optimizer``: the hf-optim optimizer, prepared or not. ``accelerator``: the
    ``accelerate.Accelerator`` driving the loop; without one, ``gradient_accumulation_steps``
    says how many :meth:`add` calls make a window.
    """

    def __init__(
        self, optimizer: Any, accelerator: Any = None, gradient_accumulation_steps: int = 1
    ) -> None:
        if accelerator is None and gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}"
            )
        self.optimizer = unwrap_optimizer(optimizer)
        self.accelerator = accelerator
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._calls = 0

    @property
    def needs_loss(self) -> bool:
        return bool(getattr(self.optimizer, "needs_loss", False))

    def _window_ends(self) -> bool:
        if self.accelerator is not None:
            return bool(self.accelerator.sync_gradients)
        return self._calls % self.gradient_accumulation_steps == 0

    def add(self, loss: torch.Tensor | float) -> torch.Tensor | None:
        """Record one micro-batch's (unscaled) loss. On the window's last micro-batch the window
        mean, averaged over ranks, is handed to the optimizer and returned."""
        self._calls += 1
        if not self.needs_loss:
            return None
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if self._count == 0:
            self.optimizer.clear_loss()
        self._sum = value if self._sum is None else self._sum + value
        self._count += 1
        if not self._window_ends():
            return None
        window = mean_over_ranks(self._sum / self._count)
        self._sum, self._count = None, 0
        self.optimizer.set_loss(window)
        return window

    def reset(self) -> None:
        """Forget a partial window and any loss not yet consumed (e.g. after a skipped step)."""
        self._sum, self._count, self._calls = None, 0, 0
        if self.needs_loss:
            self.optimizer.clear_loss()
