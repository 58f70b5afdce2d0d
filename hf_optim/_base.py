"""Behaviour every hf-optim optimizer shares: argument checks, the foreach switch, the loss
plumbing of loss-aware optimizers, and live statistics for logging.

Kept in one place so that the five algorithm files hold only their mathematics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._reduce import accumulation_dtype

__all__ = ["HFOptimizer", "check_range", "check_choice", "check_betas", "MISSING_LOSS_MESSAGE"]

MISSING_LOSS_MESSAGE = (
    "{name} needs the mini-batch loss at every step. Give it in one of three ways: "
    "optimizer.step(loss=loss), optimizer.step(closure) with a closure that returns the loss, "
    "or optimizer.set_loss(loss) before a framework calls optimizer.step() "
    "(hf_optim.Trainer and hf_optim's Accelerate helper do this for you)."
)


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` and its valid range unless ``value`` lies in it."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    valid_range = f"{left}{low}, {high}{right}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number in {valid_range}, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ValueError(f"{name} must be in {valid_range}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming ``name`` and its valid choices unless ``value`` is one."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_betas(name: str, betas: Any, count: int = 2, *, high_open: bool = True) -> None:
    """Check a tuple of ``count`` coefficients, each in ``[0, 1)`` (or ``[0, 1]``)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"{name} must be a tuple of {count} numbers in [0, 1), got {betas!r}")
    for index, beta in enumerate(betas):
        check_range(f"{name}[{index}]", beta, 0.0, 1.0, high_open=high_open)


class HFOptimizer(torch.optim.Optimizer):
    """Base class of every hf-optim optimizer.

    Subclasses implement ``_step(loss)`` (the update, called under ``torch.no_grad``) and set
    two class attributes:

    * ``needs_loss``: the update reads the mini-batch loss (Momo, MomoAdam);
    * ``statistic_keys``: param-group entries (0-d tensors) worth logging, read by
      :meth:`statistics`.

    The loss reaches a loss-aware optimizer by ``step(loss=...)``, by a closure, or through
    :meth:`set_loss` for frameworks that call ``step()`` without arguments. A loss handed over
    with :meth:`set_loss` is consumed by the next step; it is not optimizer state (it never
    outlives one step), so it is not part of ``state_dict()``.
    """

    needs_loss: bool = False
    statistic_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        foreach = defaults.get("foreach")
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        super().__init__(params, defaults)
        self._pending_loss: Tensor | float | None = None

    # -- the foreach switch -------------------------------------------------------------
    @staticmethod
    def _use_foreach(group: dict[str, Any]) -> bool:
        """``foreach=None`` (the default) selects the fast multi-tensor path."""
        return group.get("foreach") is not False

    # -- loss plumbing ------------------------------------------------------------------
    def set_loss(self, loss: Tensor | float) -> None:
        """Hand over the loss for the next ``step()``, for loops that cannot pass it."""
        self._pending_loss = loss

    def clear_loss(self) -> None:
        """Drop a loss handed over with :meth:`set_loss` (e.g. when a step is skipped)."""
        self._pending_loss = None

    def _take_loss(self, closure: Callable[[], Any] | None, loss: Any) -> tuple[Any, Any]:
        """Return (value for ``step`` to return, loss for the update)."""
        returned = None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
        if loss is None:
            loss = returned
        if loss is None:
            loss = self._pending_loss
        self._pending_loss = None
        if loss is None and self.needs_loss:
            raise ValueError(MISSING_LOSS_MESSAGE.format(name=type(self).__name__))
        if returned is None:
            returned = loss
        return returned, loss

    @staticmethod
    def _loss_tensor(loss: Any, like: Tensor) -> Tensor:
        """The loss as a detached float32 (or wider) 0-d tensor on ``like``'s device."""
        if isinstance(loss, Tensor):
            loss = loss.detach()
            if loss.numel() != 1:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
            return loss.reshape(()).to(device=like.device, dtype=dtype)
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.tensor(float(loss), device=like.device, dtype=dtype)

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One optimizer step. ``closure`` (positional, as torch and Accelerate pass it) is
        run with gradients enabled and its return value used as the loss."""
        returned, loss = self._take_loss(closure, loss)
        with torch.no_grad():
            self._step(loss)
        return returned

    def _step(self, loss: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, with two differences every hf-optim optimizer needs.

        * Statistics kept wider than their parameter (float32 state of a bfloat16 model) keep
          their saved dtype; torch casts every floating state entry but ``step`` to the
          parameter's dtype, which would round them and break a bitwise resume.
        * The loaded state never aliases the caller's tensors, so later in-place steps do not
          write into the ``state_dict`` that was passed in.
        """
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved or param not in self.state:
                continue
            state = self.state[param]
            wide = accumulation_dtype(param.dtype) if param.is_floating_point() else None
            for key, value in saved.items():
                if not torch.is_tensor(value) or key not in state:
                    continue
                loaded = state[key]
                if (
                    value.is_floating_point()
                    and loaded.dtype != value.dtype
                    and value.dtype == wide
                ):
                    state[key] = value.to(device=param.device, copy=True)
                elif loaded.numel() and loaded.data_ptr() == value.data_ptr():
                    state[key] = loaded.clone()

    # -- statistics ---------------------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        """Live statistics as Python floats, e.g. ``{"confidence/group_0": 0.83}``.

        Reads the group entries named in ``statistic_keys``. This synchronises with the
        device once; call it when logging, never inside the training step.
        """
        names: list[str] = []
        values: list[Tensor] = []
        for index, group in enumerate(self.param_groups):
            for key in self.statistic_keys:
                value = group.get(key)
                if value is None:
                    continue
                names.append(f"{key}/group_{index}")
                values.append(torch.as_tensor(value).detach().reshape(()).to(torch.float64))
        if not values:
            return {}
        device = values[0].device
        stacked = torch.stack([value.to(device) for value in values])
        return dict(zip(names, stacked.tolist(), strict=False))
