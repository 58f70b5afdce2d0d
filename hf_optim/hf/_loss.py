"""Hand a loss-aware optimizer (Momo, MomoAdam) the loss of each accumulation window.

One object, :class:`LossWindow`, does it for every loop: it adds up the micro-batch losses of
one window and, on the window's last micro-batch, averages the total over data-parallel ranks
(Accelerate's ``reduce``) and hands it to the optimizer with ``set_loss``, before the step.

* Every ``transformers.Trainer`` (stock, ``hf_optim.Trainer``, TRL's ``SFTTrainer``,
  ``DPOTrainer``, ``GRPOTrainer``, ...) passes the loss it trains on to ``accelerator.backward``,
  whatever its ``compute_loss`` does. :class:`BackwardLossCapture` wraps that one call on the
  Trainer's own ``Accelerator`` (an instance attribute, gone with the Trainer), records the loss
  and calls the original ``backward``. The loss is handed over *before* the original runs,
  because under DeepSpeed the engine steps the optimizer inside ``backward``. The Trainer has
  already divided each micro-batch loss for accumulation, so the window's sum is what it logs.
* A raw Accelerate loop uses :class:`LossFeeder`, which averages the unscaled micro-batch
  losses the loop gives it.

The window's start drops any loss still pending (a step the fp16 scaler skipped), so a stale
loss never reaches a later step. This module imports torch and, when reducing over ranks,
accelerate.
"""

from __future__ import annotations

from typing import Any

import torch

from ._build import unwrap_optimizer

__all__ = ["BackwardLossCapture", "LossFeeder", "LossWindow"]


def _mean_over_ranks(value: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Accelerate's ``reduce(value, "mean")`` (identity in one process): all-reduce SUM, then
    divide by the world size, the same float as the Trainer's ``nested_gather(...).mean()``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    if accelerator is not None:
        return accelerator.reduce(value, reduction="mean")
    from accelerate.utils import reduce

    return reduce(value, reduction="mean")


class LossWindow:
    """The loss of one accumulation window, handed to ``optimizer`` at the window's end.

    ``average=False``: the window loss is the sum of what :meth:`add` received (losses already
    divided for accumulation, as the Trainer's are); ``average=True``: their mean.
    """

    def __init__(self, optimizer: Any, accelerator: Any = None, *, average: bool = False) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        self.accelerator = accelerator
        self.average = average
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, loss: torch.Tensor | float, *, ends: bool) -> torch.Tensor | None:
        """Record one micro-batch's loss; when ``ends``, hand the window loss (averaged over
        ranks) to the optimizer and return it."""
        if isinstance(loss, torch.Tensor):
            value = loss.detach().reshape(())
        else:
            value = torch.tensor(float(loss))
        if self._sum is None:
            self.optimizer.clear_loss()  # whatever a skipped step left behind
            self._sum = value.clone()
        else:
            self._sum = self._sum + value
        self._count += 1
        if not ends:
            return None
        total = self._sum / self._count if self.average else self._sum
        total = _mean_over_ranks(total, self.accelerator)
        self._sum, self._count = None, 0
        self.optimizer.set_loss(total)
        return total

    def reset(self) -> None:
        """Forget a partial window and any loss not yet consumed."""
        self._sum, self._count = None, 0
        self.optimizer.clear_loss()


class BackwardLossCapture:
    """Replaces ``accelerator.backward`` on one ``Accelerator``: feeds ``window`` and calls the
    original. Installed by :func:`hf_optim.hf.trainer.attach` for a loss-aware optimizer."""

    def __init__(self, accelerator: Any, window: LossWindow) -> None:
        self.original = accelerator.backward
        self.accelerator = accelerator
        self.window = window

    @classmethod
    def install(cls, accelerator: Any, optimizer: Any) -> BackwardLossCapture:
        current = accelerator.__dict__.get("backward")
        if isinstance(current, cls):  # a second train(), or a new optimizer
            current.window = LossWindow(optimizer, accelerator)
            return current
        capture = cls(accelerator, LossWindow(optimizer, accelerator))
        accelerator.backward = capture
        return capture

    def _scale(self, kwargs: dict[str, Any]) -> float:
        # What Accelerator.backward divides by itself (1 under the Trainer, which sets
        # Accelerate's accumulation to 1 and passes scale_wrt_gas=False to DeepSpeed).
        from accelerate.utils import DistributedType

        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if deepspeed and kwargs.get("scale_wrt_gas", True) is False:
            return 1.0
        return float(self.accelerator.gradient_accumulation_steps)

    def __call__(self, loss: torch.Tensor, **kwargs: Any) -> Any:
        scale = self._scale(kwargs)
        self.window.add(
            loss if scale == 1.0 else loss / scale, ends=self.accelerator.sync_gradients
        )
        return self.original(loss, **kwargs)


class LossFeeder:
    """Hands a loss-aware optimizer its loss in a raw Accelerate (or plain torch) loop.

    Accelerate's ``AcceleratedOptimizer.step(closure=None)`` forwards no ``loss=`` keyword, and
    with ``accelerator.accumulate`` the optimizer steps once per window. Call :meth:`add` with
    each micro-batch's unscaled loss after ``accelerator.backward``; on the window's last
    micro-batch the window mean, averaged over ranks, goes to the optimizer::

        optimizer = hf_optim.Momo(model.parameters(), lr=1.0)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        feeder = hf_optim.LossFeeder(optimizer, accelerator)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                feeder.add(loss)
                optimizer.step()
                optimizer.zero_grad()

    ``add`` does nothing for optimizers that need no loss, so one loop serves all five. Without
    an ``accelerator``, ``gradient_accumulation_steps`` says how many ``add`` calls make a
    window. Under data parallelism every rank must hand the optimizer the same loss (else the
    replicas drift apart): the feeder averages over ranks; a closure passed to ``step()`` must
    return that mean itself.
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
        self._window = LossWindow(self.optimizer, accelerator, average=True)
        self._calls = 0

    @property
    def needs_loss(self) -> bool:
        return bool(getattr(self.optimizer, "needs_loss", False))

    def add(self, loss: torch.Tensor | float) -> torch.Tensor | None:
        """Record one micro-batch's (unscaled) loss. On the window's last micro-batch the window
        mean, averaged over ranks, is handed to the optimizer and returned."""
        self._calls += 1
        if not self.needs_loss:
            return None
        if self.accelerator is not None:
            ends = bool(self.accelerator.sync_gradients)
        else:
            ends = self._calls % self.gradient_accumulation_steps == 0
        return self._window.add(loss, ends=ends)

    def reset(self) -> None:
        """Forget a partial window and any loss not yet consumed (e.g. after a skipped step)."""
        self._calls = 0
        if self.needs_loss:
            self._window.reset()
