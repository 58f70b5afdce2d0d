"""Build an hf-optim optimizer from ``TrainingArguments`` and fit it to the Trainer running it.

Shared by the stock-Trainer handler (``optim="casmo"`` with ``transformers.Trainer``) and by
:class:`hf_optim.hf.OptimizerTrainerMixin`. The rules applied here:

* arguments: registry ``hf_arguments`` mapped from ``TrainingArguments``, then ``optim_args``
  (typed, see :mod:`hf_optim.hf._schema`), which win;
* parameter groups: the Trainer's own decay / no-decay split;
* schedules: an optimizer that owns a learning-rate schedule (AMaC's warm-up and cosine,
  AutoSGM's window) is told the run's total optimizer steps (its ``total_steps_argument``,
  unless the user gives it). While its own schedule is active it drives the learning rate and
  the Trainer's scheduler is made constant, so the two never multiply; ``optim_args``
  ``schedule_owner=trainer`` does the opposite: the optimizer's own schedule is switched off
  (its ``schedule_off`` arguments) and the Trainer's scheduler drives. The choice is logged;
* gradient clipping: a warning when ``max_grad_norm > 0`` distorts the optimizer's statistics;
* loss: a loss-aware optimizer on the stock Trainer gets the loss from a forward hook
  (:class:`ForwardLossCapture`); :class:`~hf_optim.hf.OptimizerTrainerMixin` feeds it from
  ``training_step`` instead.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._base import HFOptimizer
from .._registry import OPTIMIZERS, OptimizerInfo, get_optimizer_info
from ._schema import OptimArgsError, argument_specs, parse_optim_args, training_arguments_kwargs

logger = logging.getLogger("hf_optim.hf")

__all__ = [
    "ForwardLossCapture",
    "build_optimizer",
    "configure_for_trainer",
    "mean_over_ranks",
    "optimizer_cls_and_kwargs",
    "optimizer_kwargs",
    "optimizer_name",
    "stock_trainer_handler",
    "unwrap_optimizer",
]

USE_HF_OPTIM_TRAINER = (
    "Use hf_optim.Trainer (or class MyTrainer(hf_optim.hf.OptimizerTrainerMixin, YourTrainer)), "
    "which feeds the optimizer exactly the loss the Trainer backpropagates."
)


def optimizer_name(args: Any) -> str | None:
    """The hf-optim name in ``args.optim`` (an Enum member or a str), or None."""
    optim = getattr(args, "optim", None)
    value = getattr(optim, "value", optim)
    return value if isinstance(value, str) and value in OPTIMIZERS else None


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's (or DeepSpeed's) wrappers."""
    seen = 0
    while not isinstance(optimizer, HFOptimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a 0-d tensor over the default process group (identity in one process).

    Summing then dividing gives the same float as the Trainer's ``nested_gather(...).mean()``
    for the loss it logs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / dist.get_world_size()
    return value.detach()


def optimizer_kwargs(
    name: str, args: Any, max_steps: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor kwargs, glue options) for ``name`` from a ``TrainingArguments``.

    ``max_steps``, the run's length in optimizer steps when known, fills the registry's
    ``total_steps_argument`` unless ``optim_args`` gives it.
    """
    info = get_optimizer_info(name)
    kwargs = training_arguments_kwargs(name, args)
    explicit, glue = parse_optim_args(name, getattr(args, "optim_args", None))
    kwargs.update(explicit)
    if glue.get("schedule_owner") == "trainer":
        for key, value in info.schedule_off:
            if key in explicit and explicit[key] != value:
                raise OptimArgsError(
                    f"optim_args schedule_owner=trainer switches {name}'s own schedule off "
                    f"({key}={value!r}), which contradicts {key}={explicit[key]!r}"
                )
            kwargs[key] = value
    target = info.total_steps_argument
    if target is not None and target not in explicit and max_steps is not None and max_steps > 0:
        kwargs[target] = int(max_steps)
    return kwargs, glue


def optimizer_cls_and_kwargs(
    args: Any, max_steps: int | None = None
) -> tuple[type, dict[str, Any]]:
    """``(class, constructor kwargs)`` for ``args.optim``, e.g. for
    ``Trainer(optimizer_cls_and_kwargs=...)`` or ``peft``'s ``create_loraplus_optimizer``.

    (``Trainer.get_optimizer_cls_and_kwargs`` returns a factory for hf-optim names, because the
    stock Trainer path needs the model and the Trainer.)
    """
    name = optimizer_name(args)
    if name is None:
        raise ValueError(
            f"args.optim={getattr(args, 'optim', None)!r} is not an hf-optim optimizer; "
            f"valid names: {', '.join(OPTIMIZERS)}"
        )
    return get_optimizer_info(name).load(), optimizer_kwargs(name, args, max_steps)[0]


def _decay_parameter_names(model: nn.Module, trainer: Any) -> set[str]:
    if trainer is not None:
        return set(trainer.get_decay_parameter_names(model))
    from transformers import Trainer

    # Trainer.get_decay_parameter_names reads nothing from self.
    return set(Trainer.get_decay_parameter_names(None, model))


def default_param_groups(model: nn.Module, args: Any, trainer: Any = None) -> list[dict[str, Any]]:
    """The Trainer's grouping: trainable parameters split into decay and no-decay."""
    decay = _decay_parameter_names(model, trainer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def build_optimizer(
    name: str, args: Any, model: nn.Module, trainer: Any = None, params: Any = None
) -> tuple[HFOptimizer, dict[str, Any]]:
    """Instantiate optimizer ``name`` for ``model``; returns (optimizer, glue options)."""
    max_steps = getattr(getattr(trainer, "state", None), "max_steps", None)
    kwargs, glue = optimizer_kwargs(name, args, max_steps)
    if params is None:
        params = default_param_groups(model, args, trainer)
    return get_optimizer_info(name).load()(params, **kwargs), glue


# -- the Trainer that is running us ------------------------------------------------------------


def _calling_trainer(max_depth: int = 8) -> Any:
    """The ``transformers.Trainer`` whose ``create_optimizer`` called the handler's factory.

    The stock Trainer passes a factory only the model (``cls()(model, **kwargs)``); its state
    (total steps, callbacks, loss settings) is reached through the calling frame.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _scheduler_is_constant(args: Any) -> bool:
    kind = getattr(getattr(args, "lr_scheduler_type", None), "value", None) or str(
        getattr(args, "lr_scheduler_type", "")
    )
    warmup = getattr(args, "warmup_steps", 0) or 0
    ratio = getattr(args, "warmup_ratio", 0) or 0
    return kind == "constant" and not warmup and not ratio


def constant_scheduler(optimizer: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def configure_for_trainer(
    optimizer: Any, trainer: Any, glue: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Fit ``optimizer`` to ``trainer``: total steps, the schedule rule, clipping warnings and
    the statistics callback. Returns what was decided (``{"schedule": ...}``)."""
    from .trainer import OptimizerStatsCallback

    glue = dict(glue or {})
    inner = unwrap_optimizer(optimizer)
    decided: dict[str, Any] = {"schedule_owner": None, "replace_scheduler": False}
    if not isinstance(inner, HFOptimizer):
        return decided
    info = _info_for(inner)
    args = trainer.args
    label = info.name if info is not None else type(inner).__name__
    max_steps = int(getattr(trainer.state, "max_steps", 0) or 0)

    if info is not None and info.owns_schedule:
        target = info.total_steps_argument
        if (
            max_steps > 0
            and hasattr(inner, "set_total_steps")
            and (target is None or inner.defaults.get(target) is None)
        ):
            inner.set_total_steps(max_steps)  # an optimizer the user built without a length
        scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        if _own_schedule_active(inner, info):
            decided["schedule_owner"] = "optimizer"
            decided["replace_scheduler"] = not _scheduler_is_constant(args)
            logger.warning(
                "hf-optim: %s runs its own learning-rate schedule (%s); %s. optim_args "
                "schedule_owner=trainer switches it off and lets the Trainer's scheduler drive.",
                label,
                ", ".join(f"{k}={inner.defaults.get(k)!r}" for k in _schedule_keys(info)),
                f"the Trainer's '{scheduler}' scheduler (and its warm-up) is replaced by a "
                "constant one so that the two do not multiply"
                if decided["replace_scheduler"]
                else "the Trainer's scheduler is constant",
            )
        else:
            decided["schedule_owner"] = "trainer"
            logger.warning(
                "hf-optim: %s's own learning-rate schedule is off (%s); the Trainer's '%s' "
                "scheduler drives the learning rate.",
                label,
                ", ".join(f"{k}={v!r}" for k, v in info.schedule_off),
                scheduler,
            )
    note = getattr(info, "clipping_note", "") if info is not None else ""
    if note and (getattr(args, "max_grad_norm", 0) or 0) > 0:
        warnings.warn(
            f"hf-optim: max_grad_norm={args.max_grad_norm} with {label}: {note} "
            "Set max_grad_norm=0 (--max_grad_norm 0) unless you want both.",
            UserWarning,
            stacklevel=3,
        )
    if getattr(inner, "needs_loss", False) and getattr(trainer, "is_deepspeed_enabled", False):
        raise NotImplementedError(
            f"{label} needs the loss at each step, but DeepSpeed steps the optimizer inside "
            "backward where no loss can be handed over; use DDP or FSDP."
        )
    callbacks = trainer.callback_handler.callbacks
    if not any(isinstance(cb, OptimizerStatsCallback) for cb in callbacks):
        # First, so that reporting integrations (TensorBoard, console) see the statistics.
        callbacks.insert(0, OptimizerStatsCallback(save_averaged=glue.get("save_averaged")))
    return decided


def _schedule_keys(info: OptimizerInfo) -> list[str]:
    keys = [key for key, _ in info.schedule_off]
    if info.total_steps_argument:
        keys.append(info.total_steps_argument)
    return keys


def _own_schedule_active(optimizer: HFOptimizer, info: OptimizerInfo) -> bool:
    """Whether any group runs the optimizer's own schedule (not every ``schedule_off`` setting
    in place)."""
    if not info.schedule_off:
        return True
    return any(
        any(
            group.get(key, optimizer.defaults.get(key)) != value for key, value in info.schedule_off
        )
        for group in optimizer.param_groups
    )


def _info_for(optimizer: HFOptimizer) -> OptimizerInfo | None:
    for info in OPTIMIZERS.values():
        module_name, _, class_name = info.class_path.rpartition(".")
        if type(optimizer).__name__ == class_name and type(optimizer).__module__ == module_name:
            return info
    for info in OPTIMIZERS.values():  # subclasses
        try:
            if isinstance(optimizer, info.load()):
                return info
        except Exception:  # noqa: BLE001 - a class that does not import yet
            continue
    return None


# -- loss capture for the stock Trainer ---------------------------------------------------------


class ForwardLossCapture:
    """A forward hook that hands a loss-aware optimizer the loss the stock Trainer logs.

    For each training forward it reads ``output.loss`` and adds this micro-batch's share of
    the window loss, the way ``Trainer.training_step`` scales it: times the world size when the
    model normalised by a global ``num_items_in_batch`` (``average_tokens_across_devices``),
    divided by the number of accumulation steps otherwise. On the micro-batch that ends the
    accumulation window (Accelerate's ``sync_gradients``) the sum is averaged over ranks and
    handed over with ``optimizer.set_loss``. The result equals the Trainer's logged loss.
    """

    def __init__(self, optimizer: HFOptimizer, args: Any, trainer: Any = None) -> None:
        self.optimizer = optimizer
        self.args = args
        self.trainer = trainer
        self.window: torch.Tensor | None = None
        self.window_step: int | None = None

    def _world_size(self) -> int:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    def __call__(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        from accelerate.state import GradientState

        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise RuntimeError(
                f"{type(self.optimizer).__name__} needs the training loss, but the model returned "
                f"none (labels missing or consumed outside the model). {USE_HF_OPTIM_TRAINER}"
            )
        step = self.trainer.state.global_step if self.trainer is not None else None
        if self.window is None or step != self.window_step:
            # A new window: drop whatever a skipped step (or a stale window) left behind.
            self.window, self.window_step = None, step
            self.optimizer.clear_loss()
        loss = loss.detach()
        if kwargs.get("num_items_in_batch") is not None:
            if getattr(self.args, "average_tokens_across_devices", False):
                loss = loss * self._world_size()
        else:
            steps = getattr(self.trainer, "current_gradient_accumulation_steps", None)
            loss = loss / (steps or self.args.gradient_accumulation_steps)
        self.window = loss if self.window is None else self.window + loss
        if GradientState().sync_gradients:
            self.optimizer.set_loss(mean_over_ranks(self.window))
            self.window, self.window_step = None, None


def _check_hook_supported(trainer: Any, name: str) -> None:
    from transformers import Trainer

    from .trainer import OptimizerTrainerMixin

    reasons = []
    if getattr(trainer, "label_smoother", None) is not None:
        reasons.append("label smoothing is on (the model's loss is not the loss backpropagated)")
    if getattr(trainer, "compute_loss_func", None) is not None:
        reasons.append("a compute_loss_func is set")
    if type(trainer).compute_loss is not Trainer.compute_loss and not isinstance(
        trainer, OptimizerTrainerMixin
    ):
        reasons.append(f"{type(trainer).__name__} overrides compute_loss")
    if reasons:
        raise RuntimeError(
            f"optim={name!r} with {type(trainer).__name__} cannot capture the loss the Trainer "
            f"backpropagates: {'; '.join(reasons)}. {USE_HF_OPTIM_TRAINER}"
        )


class _StockTrainerFactory:
    """What the stock handler returns: the Trainer calls ``_StockTrainerFactory()(model, **kw)``."""

    def __call__(self, model: nn.Module, *, hf_optim_name: str, args: Any) -> HFOptimizer:
        trainer = _calling_trainer()
        info = get_optimizer_info(hf_optim_name)
        if info.needs_loss and trainer is not None:
            _check_hook_supported(trainer, hf_optim_name)
        optimizer, glue = build_optimizer(hf_optim_name, args, model, trainer)
        if info.needs_loss:
            model.register_forward_hook(
                ForwardLossCapture(optimizer, args, trainer), with_kwargs=True
            )
        if trainer is not None:
            decided = configure_for_trainer(optimizer, trainer, glue)
            if decided.get("replace_scheduler") and trainer.lr_scheduler is None:
                # create_scheduler() keeps a scheduler that is already set.
                trainer.lr_scheduler = constant_scheduler(optimizer)
        return optimizer


def stock_trainer_handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """The ``_OPTIMIZER_HANDLERS`` entry for every hf-optim name.

    It returns a factory (not the class) because the optimizer needs the model and the Trainer:
    the forward hook for the loss, and the run's total steps. Arguments are validated here so a
    bad ``optim_args`` fails before any model work.
    """
    name = optimizer_name(ctx.args)
    if name is None:  # pragma: no cover - only registered under our names
        raise ValueError(f"not an hf-optim optimizer: {ctx.args.optim!r}")
    optimizer_kwargs(name, ctx.args)
    return _StockTrainerFactory, {"hf_optim_name": name, "args": ctx.args}


def constructor_arguments(name: str) -> list[str]:
    """Names accepted in ``optim_args`` for ``name`` (for docs and error messages)."""
    return list(argument_specs(get_optimizer_info(name).load()))
