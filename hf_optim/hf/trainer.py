"""Fit an hf-optim optimizer to the ``transformers.Trainer`` running it, for every Trainer.

:func:`attach` runs once the Trainer's optimizer exists (from the wrapper around
``transformers.Trainer.create_optimizer`` that registration installs, so for every subclass:
TRL's ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``...; and from :class:`Trainer`). It

* refuses a backend the optimizer does not support (``hf_optim._backends``);
* tells an optimizer that owns a learning-rate schedule (AMaC, AutoSGM) the run's length and
  applies one rule: while its own schedule is active it drives the learning rate and the
  Trainer's scheduler is made constant, so the two never multiply; ``optim_args``
  ``schedule_owner=trainer`` switches its own schedule off instead. The choice is logged;
* warns when ``max_grad_norm > 0`` distorts the optimizer's statistics;
* feeds a loss-aware optimizer (Momo, MomoAdam) the loss the Trainer backpropagates, captured
  at ``accelerator.backward`` (:mod:`hf_optim.hf._loss`), and warns at start-up when the
  Trainer's loss can be negative (GRPO, RLOO) while Momo's lower bound is 0;
* adds the optimizer's statistics to the Trainer's logs (:class:`OptimizerStatsCallback`).

:class:`Trainer` (= :class:`OptimizerTrainerMixin` + ``transformers.Trainer``) adds what the
stock Trainer lacks: it builds hf-optim optimizers without any registration (the fallback for
an unsupported transformers) and its ``save_model`` can write AMaC's averaged weights.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.training_args import OptimizerNames

from .._base import HFOptimizer
from .._registry import OPTIMIZERS, OptimizerInfo
from ._build import build_optimizer, optimizer_kwargs, optimizer_name, unwrap_optimizer
from ._loss import BackwardLossCapture
from ._schema import parse_optim_args

logger = logging.getLogger("hf_optim.hf")

__all__ = [
    "OptimNameArgumentsMixin",
    "OptimizerStatsCallback",
    "OptimizerTrainerMixin",
    "Trainer",
    "TrainingArguments",
    "attach",
    "check_backend_at_start_up",
    "export_averaged_weights",
]

STATISTICS_PREFIX = "optim/"

#: Trainers whose training loss can be negative (policy-gradient objectives).
NEGATIVE_LOSS_TRAINERS = ("GRPOTrainer", "RLOOTrainer", "PPOTrainer")


def _has_averaged_weights(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "eval", None)) and callable(
        getattr(optimizer, "train", None)
    )


def export_averaged_weights(optimizer: Any, model: nn.Module, output_dir: str) -> bool:
    """Save ``model`` with the optimizer's averaged weights (AMaC SWA/Lookahead) to ``output_dir``.

    Swaps the averaged weights in with ``optimizer.eval()``, saves, and swaps the training
    weights back with ``optimizer.train()``, so training is not disturbed. Returns False (and
    saves nothing) when the optimizer keeps no averaged weights.
    """
    inner = unwrap_optimizer(optimizer)
    if not _has_averaged_weights(inner):
        return False
    inner.eval()
    try:
        os.makedirs(output_dir, exist_ok=True)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(output_dir)
        else:
            torch.save(model.state_dict(), os.path.join(output_dir, "pytorch_model.bin"))
    finally:
        inner.train()
    return True


class OptimizerStatsCallback(TrainerCallback):
    """Adds ``optimizer.statistics()`` to every training log as ``optim/<key>/group_<i>``.

    Inserted first in the callback list, so TensorBoard, W&B and the console (which are
    callbacks too) see the statistics; they are also added to ``state.log_history``. With
    ``save_averaged=True`` it writes the averaged weights to ``checkpoint-N/averaged`` at
    every save.
    """

    def __init__(self, save_averaged: bool | None = False) -> None:
        self.save_averaged = bool(save_averaged)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        inner = unwrap_optimizer(optimizer)
        if logs is None or not isinstance(inner, HFOptimizer) or "loss" not in logs:
            return
        statistics = {STATISTICS_PREFIX + key: value for key, value in inner.statistics().items()}
        if not statistics:
            return
        logs.update(statistics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(statistics)

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.save_averaged or model is None or not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            export_averaged_weights(optimizer, model, os.path.join(checkpoint, "averaged"))


# -- attach: fit the optimizer to the Trainer ---------------------------------------------------


@dataclass
class _Attachment:
    optimizer: HFOptimizer
    glue: dict[str, Any]
    replace_scheduler: bool


def _info_for(optimizer: HFOptimizer) -> OptimizerInfo | None:
    for info in OPTIMIZERS.values():
        try:
            if type(optimizer) is info.load():
                return info
        except Exception:  # noqa: BLE001 - a class that does not import
            continue
    for info in OPTIMIZERS.values():  # subclasses
        try:
            if isinstance(optimizer, info.load()):
                return info
        except Exception:  # noqa: BLE001
            continue
    return None


def backend_name(accelerator: Any) -> str | None:
    """``ddp``, ``fsdp1``, ``fsdp2``, ``zero1``..``zero3`` for a multi-process or sharded run;
    None for one plain process."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        return "fsdp2" if version == 2 else "fsdp1"
    return "ddp" if accelerator.num_processes > 1 else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in {"1", "true", "yes", "on"}


def backend_from_arguments(args: Any) -> str | None:
    """The backend name (as :func:`backend_name`) a run with these ``TrainingArguments`` will
    use, known before any Trainer exists: from ``--deepspeed`` / ``--fsdp`` or the environment
    ``accelerate launch`` sets from its config file."""
    if args.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config = getattr(args, "hf_deepspeed_config", None)
        if config is not None:
            stage = config.get_value("zero_optimization.stage", stage)
        return f"zero{stage if stage is not None else 0}"
    if args.fsdp or _env_flag("ACCELERATE_USE_FSDP"):
        version = (args.fsdp_config or {}).get("version") or os.environ.get("FSDP_VERSION", "1")
        return "fsdp2" if str(version) == "2" else "fsdp1"
    return "ddp" if args.world_size > 1 else None


def check_backend_at_start_up(args: Any) -> None:
    """Refuse, before any data or model work, an hf-optim optimizer that cannot run under the
    backend these arguments select (the same policy :func:`attach` applies)."""
    from .._registry import get_optimizer_info

    name = optimizer_name(args)
    if name is not None:
        info = get_optimizer_info(name)
        options = optimizer_kwargs(name, args)[0]
        refuse_unsupported_backend(info, backend_from_arguments(args), options)


def refuse_unsupported_backend(info: OptimizerInfo, backend: str | None, options: Any) -> None:
    """Raise ``NotImplementedError`` when the registry says ``info`` cannot run on ``backend``.

    The policy is :func:`hf_optim._backends.refusal`, shared with the recipes.
    """
    if backend is None:
        return
    from .._backends import refusal

    reason = refusal(info, backend, options)
    if reason:
        raise NotImplementedError(reason)


def _scheduler_is_constant(args: Any) -> bool:
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    return kind == "constant" and not (args.warmup_steps or 0)  # warmup_steps < 1: a ratio


def _own_schedule_active(optimizer: HFOptimizer, info: OptimizerInfo) -> bool:
    """Whether any group runs the optimizer's own schedule."""
    return not info.schedule_off or any(
        group.get(key, optimizer.defaults.get(key)) != value
        for group in optimizer.param_groups
        for key, value in info.schedule_off
    )


def _decide_schedule(inner: HFOptimizer, info: OptimizerInfo, trainer: Any) -> bool:
    """Apply the schedule rule (logged); True when the Trainer's scheduler must be constant."""
    args = trainer.args
    max_steps = int(getattr(trainer.state, "max_steps", 0) or 0)
    target = info.total_steps_argument
    if (
        max_steps > 0
        and hasattr(inner, "set_total_steps")
        and (target is None or inner.defaults.get(target) is None)
    ):
        inner.set_total_steps(max_steps)  # an optimizer built without the run's length
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if not _own_schedule_active(inner, info):
        logger.warning(
            "hf-optim: %s's own learning-rate schedule is off (%s); the Trainer's '%s' "
            "scheduler drives the learning rate.",
            info.name,
            ", ".join(f"{k}={v!r}" for k, v in info.schedule_off),
            scheduler,
        )
        return False
    replace = not _scheduler_is_constant(args)
    keys = [key for key, _ in info.schedule_off] + ([target] if target else [])
    logger.warning(
        "hf-optim: %s runs its own learning-rate schedule (%s); %s. optim_args "
        "schedule_owner=trainer switches it off and lets the Trainer's scheduler drive.",
        info.name,
        ", ".join(f"{k}={inner.defaults.get(k)!r}" for k in keys),
        f"the Trainer's '{scheduler}' scheduler (and its warm-up) is replaced by a constant one "
        "so that the two do not multiply"
        if replace
        else "the Trainer's scheduler is constant",
    )
    return replace


def _warn_negative_loss(inner: HFOptimizer, trainer: Any) -> None:
    kinds = {cls.__name__ for cls in type(trainer).__mro__}
    if not kinds.intersection(NEGATIVE_LOSS_TRAINERS):
        return
    if any(g.get("lb", 0.0) >= 0.0 and not g.get("use_fstar", False) for g in inner.param_groups):
        warnings.warn(
            f"hf-optim: {type(trainer).__name__}'s loss can be negative, but "
            f"{type(inner).__name__}'s lower bound lb is not below it: its Polyak step is then "
            "zero. Set optim_args use_fstar=true (estimate the bound online) or lb to a value "
            "below the lowest loss, e.g. lb=-10.",
            UserWarning,
            stacklevel=2,
        )


def attach(trainer: Any) -> None:
    """Fit ``trainer.optimizer`` (if it is an hf-optim optimizer) to ``trainer``. Idempotent:
    a second ``train()`` only re-applies the scheduler rule."""
    inner = unwrap_optimizer(trainer.optimizer)
    if not isinstance(inner, HFOptimizer):
        return
    attached = trainer.__dict__.get("_hf_optim_attachment")
    if attached is None or attached.optimizer is not inner:
        attached = _attach(trainer, inner)
        trainer._hf_optim_attachment = attached
    if attached.replace_scheduler and trainer.lr_scheduler is None:
        # create_scheduler() keeps a scheduler that is already set; marking it created makes
        # the next train() build it afresh, as the Trainer does with its own.
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
        trainer._created_lr_scheduler = True


def _attach(trainer: Any, inner: HFOptimizer) -> _Attachment:
    info = _info_for(inner)
    args = trainer.args
    name = optimizer_name(args)
    glue = parse_optim_args(name, args.optim_args)[1] if name is not None else {}
    label = info.name if info is not None else type(inner).__name__
    if info is not None:
        options = {**inner.defaults, "param_groups": len(inner.param_groups)}
        refuse_unsupported_backend(info, backend_name(trainer.accelerator), options)
    replace = info is not None and info.owns_schedule and _decide_schedule(inner, info, trainer)
    note = info.clipping_note if info is not None else ""
    if note and (args.max_grad_norm or 0) > 0:
        warnings.warn(
            f"hf-optim: max_grad_norm={args.max_grad_norm} with {label}: {note} "
            "Set max_grad_norm=0 (--max_grad_norm 0) unless you want both.",
            UserWarning,
            stacklevel=3,
        )
    if inner.needs_loss:
        BackwardLossCapture.install(trainer.accelerator, inner)
        _warn_negative_loss(inner, trainer)
    callbacks = trainer.callback_handler.callbacks
    if not any(isinstance(cb, OptimizerStatsCallback) for cb in callbacks):
        # First, so that reporting integrations (TensorBoard, console) see the statistics.
        callbacks.insert(0, OptimizerStatsCallback(save_averaged=glue.get("save_averaged")))
    return _Attachment(inner, glue, replace)


# -- hf_optim.Trainer ---------------------------------------------------------------------------


class OptimizerTrainerMixin:
    """Builds hf-optim optimizers from ``args.optim`` without registration and saves AMaC's
    averaged weights with ``save_model`` (``optim_args`` ``save_averaged=true``). Composes
    with any ``transformers.Trainer`` subclass; everything else is done for every Trainer."""

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        name = optimizer_name(self.args)
        if self.optimizer is None and name is not None and self.optimizer_cls_and_kwargs is None:
            opt_model = self.model if model is None else model
            self.optimizer, _ = build_optimizer(name, self.args, opt_model, self)
        else:
            super().create_optimizer(model)
        attach(self)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        attached = self.__dict__.get("_hf_optim_attachment")
        inner = unwrap_optimizer(self.optimizer)
        if (
            _internal_call
            or attached is None
            or not attached.glue.get("save_averaged")
            or not _has_averaged_weights(inner)
        ):
            # Checkpoints keep the training weights: resuming needs them (the averages are in
            # optimizer.pt; OptimizerStatsCallback writes them beside the checkpoint).
            return super().save_model(output_dir, _internal_call=_internal_call)
        inner.eval()
        try:
            return super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            inner.train()


class Trainer(OptimizerTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that builds hf-optim optimizers even without registration and
    can save AMaC's averaged weights (see :class:`OptimizerTrainerMixin`)."""


# -- hf_optim.TrainingArguments -----------------------------------------------------------------


def _optim_choices() -> list[str]:
    stock = [member.value for member in OptimizerNames if member.value not in OPTIMIZERS]
    return stock + list(OPTIMIZERS)


def _default_optim() -> str:
    default = transformers.TrainingArguments.__dataclass_fields__["optim"].default
    return getattr(default, "value", default)


def check_optimizer_arguments(name: str, args: Any) -> None:
    """Build optimizer ``name`` from ``args`` on a throw-away parameter, so that a bad
    ``optim_args`` key, type or value fails now, with the optimizer's own message, and not when
    training starts."""
    from .._registry import get_optimizer_info

    info = get_optimizer_info(name)
    max_steps = args.max_steps if args.max_steps and args.max_steps > 0 else None
    kwargs, _ = optimizer_kwargs(name, args, max_steps)
    target = info.total_steps_argument
    if target is not None and target not in kwargs:
        # The run's length is only known at train(); any length long enough for the other
        # arguments (warm-up, averaging starts) stands in for it here.
        kwargs[target] = 10**9
    info.load()([torch.zeros(2, requires_grad=True)], **kwargs)


@dataclass
class OptimNameArgumentsMixin:
    """Dataclass mixin giving any ``TrainingArguments`` class the hf-optim names without
    registration: ``@dataclass class MyArgs(OptimNameArgumentsMixin, Seq2SeqTrainingArguments)``.

    ``optim`` becomes a plain ``str`` field whose ``choices`` (read by ``HfArgumentParser``)
    include the hf-optim names; ``optim_args`` and the optimizer's values are checked at
    construction.
    """

    optim: str = field(
        default=_default_optim(),
        metadata={
            "help": "The optimizer to use: a transformers name or an hf-optim name "
            f"({', '.join(OPTIMIZERS)}).",
            "choices": _optim_choices(),
        },
    )

    def __post_init__(self) -> None:
        name = getattr(self.optim, "value", self.optim)
        if name not in OPTIMIZERS:
            super().__post_init__()
            return
        # The stock validation only knows its own Enum: let it see a stock name, then restore.
        self.optim = "adamw_torch"
        super().__post_init__()
        self.optim = OptimizerNames(name) if name in OptimizerNames._value2member_map_ else name
        check_optimizer_arguments(name, self)


@dataclass
class TrainingArguments(OptimNameArgumentsMixin, transformers.TrainingArguments):
    """``transformers.TrainingArguments`` that accepts the hf-optim names with or without
    registration and checks the optimizer's arguments at construction."""
