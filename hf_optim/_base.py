"""Behaviour every hf-optim optimizer shares: argument checks, the implementation switch
(compiled kernels or their eager reference), hyperparameters as cached 0-d tensors, the loss
plumbing of loss-aware optimizers, checkpoint loading, torch.distributed.checkpoint's
state-initialising step, and live statistics for logging.

Kept in one place so that the five algorithm files hold only their mathematics.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._reduce import accumulation_dtype

__all__ = [
    "HFOptimizer",
    "check_range",
    "check_choice",
    "check_flag",
    "check_betas",
    "IMPLEMENTATIONS",
    "MISSING_LOSS_MESSAGE",
]

MISSING_LOSS_MESSAGE = (
    "{name} needs the mini-batch loss at every step. In a raw Accelerate loop use "
    "feeder = hf_optim.LossFeeder(optimizer, accelerator) and call feeder.add(loss) after "
    "accelerator.backward(loss) (Accelerate's optimizer wrapper forwards no loss= keyword). In a "
    "plain torch loop call optimizer.step(loss=loss), or optimizer.step(closure) with a closure "
    "that returns the loss (under data parallelism: the mean over ranks, as LossFeeder does), or "
    "optimizer.set_loss(loss) before a framework calls optimizer.step(). Every transformers "
    "Trainer (optim=\"{registry_name}\", TRL's trainers included) does this for you."
)


def _as_number(value: Any) -> Any:
    """A 0-d tensor becomes its Python value (construction time only: this reads the device)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    return value


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` and its valid range unless ``value`` lies in it.

    Values must be finite unless ``allow_inf``; a one-element tensor (a tensor ``lr``) is
    checked by its value.
    """
    value = _as_number(value)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    valid_range = f"{left}{low}, {high}{right}"
    if not allow_inf:
        valid_range += ", finite"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number in {valid_range}, got {value!r}")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, in {valid_range}, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ValueError(f"{name} must be in {valid_range}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming ``name`` and its valid choices unless ``value`` is one."""
    choices = tuple(choices)
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_flag(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_betas(name: str, betas: Any, count: int = 2, *, high_open: bool = True) -> None:
    """Check a tuple of ``count`` coefficients, each in ``[0, 1)`` (or ``[0, 1]``)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"{name} must be a tuple of {count} numbers in [0, 1), got {betas!r}")
    for index, beta in enumerate(betas):
        check_range(f"{name}[{index}]", beta, 0.0, 1.0, high_open=high_open)


IMPLEMENTATIONS = ("auto", "compiled", "eager")


class HFOptimizer(torch.optim.Optimizer):
    """Base class of every hf-optim optimizer.

    Subclasses implement ``_step(loss)`` (the update, called under ``torch.no_grad``),
    ``_check_group(group)`` (validation of one param group's hyperparameters, run at
    construction and by :meth:`add_param_group`) and ``_init_param_state(group, p)`` (a
    parameter's state before its first update), and set these class attributes:

    * ``needs_loss``: the update reads the mini-batch loss (Momo, MomoAdam);
    * ``statistic_keys``: param-group entries (0-d tensors) worth logging, read by
      :meth:`statistics`;
    * ``wide_state_keys``: per-parameter state kept in float32 (float64 for float64
      parameters) whatever the parameter dtype; every other floating entry follows the
      parameter's dtype, and :meth:`load_state_dict` casts both accordingly;
    * ``counter_state_keys``: per-parameter counters (0-d float32 tensors on the parameter's
      device, as torch's ``capturable`` optimizers keep ``step``);
    * ``group_state_keys``: param-group entries that are state rather than hyperparameters
      (step counts, loss averages, statistics); a loaded group with any other unknown entry
      is another optimizer's (``None``: not declared, nothing checked);
    * ``supports_complex``: whether complex parameters are handled (as ``view_as_real``).

    The loss reaches a loss-aware optimizer by ``step(loss=...)``, by a closure, or through
    :meth:`set_loss` for frameworks that call ``step()`` without arguments. A loss handed over
    with :meth:`set_loss` is consumed by the next step; it is not optimizer state (it never
    outlives one step), so it is not part of ``state_dict()``.
    """

    needs_loss: bool = False
    statistic_keys: tuple[str, ...] = ()
    wide_state_keys: frozenset[str] = frozenset()
    counter_state_keys: frozenset[str] = frozenset()
    group_state_keys: tuple[str, ...] | None = None
    supports_complex: bool = False
    #: param-group keys of earlier versions, dropped when such a checkpoint is loaded
    retired_group_keys: tuple[str, ...] = ("foreach",)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        defaults.setdefault("implementation", "auto")
        defaults.setdefault("skip_nonfinite", False)
        self._reset_transient()
        super().__init__(params, defaults)

    def _reset_transient(self) -> None:
        """Attributes that are never state: derived caches and the loss of the next step."""
        self._pending_loss: Tensor | float | None = None
        self._scalars: dict[tuple[Any, ...], tuple[Any, Tensor]] = {}
        self._warned: set[str] = set()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # deepcopy and unpickling restore __dict__ without running __init__
        super().__setstate__(state)
        self._reset_transient()

    # -- parameter groups ---------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, then the group's hyperparameters are checked (the same messages as at
        construction); a rejected group is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_choice("implementation", group["implementation"], IMPLEMENTATIONS)
            check_flag("skip_nonfinite", group["skip_nonfinite"])
            if not self.supports_complex:
                for p in group["params"]:
                    if p.is_complex():
                        raise ValueError(
                            f"{type(self).__name__} does not support complex parameters "
                            f"(got one of shape {tuple(p.shape)}, dtype {p.dtype}); optimise "
                            "torch.view_as_real(param) instead"
                        )
            self._check_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one group's hyperparameters (``ValueError`` naming the key)."""

    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    # -- implementation switch and per-step scalars --------------------------------------
    def _compiled(self, like: Tensor) -> bool:
        """Whether kernels run compiled for tensors like ``like``."""
        from ._kernels import compiler_available

        implementation = self.defaults["implementation"]
        if implementation == "auto":
            # a process-wide choice for "auto", e.g. eager for a test run that cannot afford
            # minutes of compiling on a small CPU
            implementation = os.environ.get("HF_OPTIM_IMPLEMENTATION", "auto")
        if implementation == "eager" or torch.compiler.is_compiling():
            return False
        if implementation == "compiled":
            return True
        return compiler_available(like.device.type)

    def _scalar(self, group: dict[str, Any], key: str, like: Tensor) -> Tensor:
        """``group[key]`` as a 0-d tensor on ``like``'s device in its accumulation dtype.

        Cached and refreshed in place when the value changes, so a scheduler that sets a new
        ``lr`` every step costs neither a recompile nor a host-device copy. Never store the
        returned tensor: it changes with the group's value.
        """
        value = group[key]
        dtype = accumulation_dtype(like.dtype) if like.is_floating_point() else torch.float32
        if isinstance(value, Tensor):
            return value.detach().to(device=like.device, dtype=dtype).reshape(())
        cache_key = (id(group), key, like.device, dtype)
        cached = self._scalars.get(cache_key)
        if cached is None:
            tensor = torch.tensor(float(value), dtype=dtype, device=like.device)
            self._scalars[cache_key] = (value, tensor)
            return tensor
        cached_value, tensor = cached
        if cached_value != value:
            tensor.fill_(float(value))
            self._scalars[cache_key] = (value, tensor)
        return tensor

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    # -- loss plumbing ------------------------------------------------------------------
    def set_loss(self, loss: Tensor | float) -> None:
        """Hand over the loss for the next ``step()``, for loops that cannot pass it."""
        self._check_loss_type(loss)
        self._pending_loss = loss

    def clear_loss(self) -> None:
        """Drop a loss handed over with :meth:`set_loss` (e.g. when a step is skipped)."""
        self._pending_loss = None

    @staticmethod
    def _check_loss_type(loss: Any) -> None:
        if loss is None or isinstance(loss, Tensor):
            return
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(
                f"the loss must be a tensor or a Python number, got {type(loss).__name__} "
                f"{loss!r}"
            )

    def _missing_loss_message(self) -> str:
        from ._registry import OPTIMIZERS

        cls_path = f"{type(self).__module__}.{type(self).__qualname__}"
        registry_name = next(
            (info.name for info in OPTIMIZERS.values() if info.class_path == cls_path),
            type(self).__name__.lower(),
        )
        return MISSING_LOSS_MESSAGE.format(name=type(self).__name__, registry_name=registry_name)

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
        run with gradients enabled and its return value used as the loss; ``loss=`` gives the
        loss directly (not both)."""
        if closure is not None and loss is not None:
            raise ValueError(
                "give the loss either through a closure or as loss=..., not both "
                "(step(closure, loss=x) would silently prefer one of them)"
            )
        self._check_loss_type(loss)
        from ._backends import check_backend

        check_backend(self)
        returned = None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
            loss = returned
        if loss is None:
            loss = self._pending_loss
        self._pending_loss = None
        with torch.no_grad():
            if self._is_state_initialisation_call():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None and p not in self.state:
                            self._init_param_state(group, p)
                return returned
            if loss is None and self.needs_loss:
                raise ValueError(self._missing_loss_message())
            self._check_loss_type(loss)
            self._step(loss)
        return returned if returned is not None else loss

    def _is_state_initialisation_call(self) -> bool:
        """Whether this step is torch.distributed.checkpoint's way of materialising state:
        a fresh optimizer, every ``lr`` zero and every gradient zero.

        Only on a fresh optimizer whose learning rates are all zero does this look at the
        gradients (one host synchronisation, all-reduced under sharding so that every rank
        decides alike); every other step costs a few Python comparisons.
        """
        if self.state or torch.compiler.is_compiling():
            return False  # DCP never steps a compiled optimizer to materialise its state
        for group in self.param_groups:
            if float(group.get("lr", 0.0)) != 0.0:
                return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return False
        from ._reduce import finish_sums, local, reduction_group

        params = [p for g in self.param_groups for p in g["params"]]
        device = local(grads[0]).device
        nonzero = torch.zeros((), dtype=torch.float64, device=device)
        for grad in grads:
            nonzero = nonzero + local(grad).count_nonzero().to(device=device)
        nonzero = finish_sums(nonzero.reshape(1), reduction_group(params))
        return not bool(nonzero.item())

    def _step(self, loss: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, with what every hf-optim optimizer needs besides.

        * A state_dict of another optimizer is refused with an error naming both.
        * Param-group options added after the checkpoint was written get their defaults;
          options of earlier versions (``foreach``) are dropped.
        * Per-parameter state is cast by role: ``wide_state_keys`` to float32 (float64 for
          float64 parameters), counters to float32 tensors on the parameter's device (Python
          numbers of old checkpoints included), everything else to the parameter's dtype.
        * A parameter whose saved state lacks entries is an error, not a silent restart.
        * The loaded state never aliases the caller's tensors, so later in-place steps do not
          write into the ``state_dict`` that was passed in.
        """
        state_dict = {
            **state_dict,
            "param_groups": [self._upgrade_group(dict(g)) for g in state_dict["param_groups"]],
        }
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        pairs = [(g, p) for g in self.param_groups for p in g["params"]]
        for saved_id, (group, param) in zip(saved_ids, pairs, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved or param not in self.state:
                continue
            self._check_state_keys(group, param, set(saved))
            state = self.state[param]
            for key, value in saved.items():
                state[key] = self._cast_state_entry(key, value, state.get(key), param)

    def _upgrade_group(self, group: dict[str, Any]) -> dict[str, Any]:
        for key in self.retired_group_keys:
            group.pop(key, None)
        if self.group_state_keys is not None:
            self._refuse_foreign_group(group)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        return group

    def _refuse_foreign_group(self, group: dict[str, Any]) -> None:
        """Refuse a param group saved by another hf-optim optimizer: one carrying an option
        that belongs to another optimizer and not to this one. Other unknown keys (a user's
        ``name``, a scheduler's ``initial_lr``) are kept, as torch keeps them."""
        import inspect

        from ._registry import OPTIMIZERS

        ours = set(self.defaults) | set(self.group_state_keys or ())
        unknown = set(group) - ours
        if not unknown:
            return
        best, best_score = None, 0
        for info in OPTIMIZERS.values():
            try:
                cls = info.load()
            except Exception:  # pragma: no cover - a broken optional module
                continue
            if cls is type(self):
                continue
            theirs = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
            theirs |= set(getattr(cls, "group_state_keys", None) or ())
            score = len(unknown & theirs) - len(unknown - theirs)
            if unknown & theirs and (best is None or score > best_score):
                best, best_score = (cls, sorted(unknown & theirs)), score
        if best is not None:
            cls, foreign = best
            name = type(self).__name__
            raise ValueError(
                f"cannot load this state_dict into {name}: its param groups carry "
                f"{', '.join(map(repr, foreign))}, options of {cls.__name__} that {name} "
                f"does not have; it looks like a state_dict of {cls.__name__}. Load a "
                f"state_dict saved by {name}."
            )

    def _check_state_keys(self, group: dict[str, Any], param: Tensor, saved: set[str]) -> None:
        """Compare a parameter's saved state entries with those a fresh state has."""
        probe = torch.empty_like(param, device="meta")
        probe.grad = None
        fresh: dict[str, Any] = {}
        real_state = self.state
        try:
            self.state = defaultdict(dict)
            self._init_param_state(group, probe)
            fresh = dict(self.state[probe])
        except Exception:  # an init that cannot run on meta tensors: nothing to compare
            return
        finally:
            self.state = real_state
        missing = sorted(set(fresh) - saved)
        extra = sorted(saved - set(fresh))
        if missing or extra:
            raise ValueError(
                f"cannot load this state_dict into {type(self).__name__}: a parameter of shape "
                f"{tuple(param.shape)} has state entries {sorted(saved)}, expected "
                f"{sorted(fresh)} (missing {missing}, unexpected {extra}); it was saved by "
                "another optimizer or another configuration"
            )

    def _cast_state_entry(self, key: str, value: Any, loaded: Any, param: Tensor) -> Any:
        if key in self.counter_state_keys:
            if isinstance(value, Tensor):
                return value.detach().to(device=param.device, dtype=torch.float32, copy=True)
            return torch.tensor(float(value), dtype=torch.float32, device=param.device)
        if not isinstance(value, Tensor):
            return value
        if value.is_floating_point() and param.is_floating_point():
            dtype = accumulation_dtype(param.dtype) if key in self.wide_state_keys else param.dtype
            if value.dim() == 0 and key not in self.wide_state_keys:
                dtype = value.dtype  # per-parameter scalars keep their saved precision
            return value.detach().to(device=param.device, dtype=dtype, copy=True)
        if isinstance(loaded, Tensor):
            return loaded.clone() if loaded.data_ptr() == value.data_ptr() else loaded
        return value.detach().to(device=param.device, copy=True)

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
