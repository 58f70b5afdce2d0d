"""``hf_optim.Trainer``, its mixin, the fallback ``TrainingArguments`` and the statistics callback.

``OptimizerTrainerMixin`` composes with any ``transformers.Trainer`` subclass (TRL's
``SFTTrainer``...): ``class MyTrainer(OptimizerTrainerMixin, SFTTrainer)``. It

* builds hf-optim optimizers from ``args.optim`` / ``args.optim_args`` in ``create_optimizer``
  (``create_optimizer_and_scheduler`` is never called by the 5.x training loop);
* feeds a loss-aware optimizer (Momo, MomoAdam) the loss the Trainer backpropagates and logs:
  the sum of ``training_step``'s returns over the accumulation window, averaged over ranks,
  handed over on the window's last micro-batch; a window is keyed by ``state.global_step``, so
  a skipped (fp16 overflow) step leaves nothing behind for the next one;
* applies the schedule rule of :mod:`hf_optim.hf._build` (a constant Trainer scheduler while
  the optimizer runs its own schedule), warns about gradient clipping, logs the optimizer's
  live statistics, and saves averaged weights when ``optim_args`` has ``save_averaged=true``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.training_args import OptimizerNames

from .._base import HFOptimizer
from .._registry import OPTIMIZERS
from ._build import (
    build_optimizer,
    configure_for_trainer,
    constant_scheduler,
    mean_over_ranks,
    optimizer_name,
    unwrap_optimizer,
)
from ._schema import parse_optim_args

logger = logging.getLogger("hf_optim.hf")

__all__ = [
    "OptimNameArgumentsMixin",
    "OptimizerStatsCallback",
    "OptimizerTrainerMixin",
    "Trainer",
    "TrainingArguments",
    "export_averaged_weights",
]

STATISTICS_PREFIX = "optim/"


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

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):  # noqa: D401
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


class OptimizerTrainerMixin:
    """Make a ``transformers.Trainer`` subclass build and drive hf-optim optimizers."""

    _hf_optim_decided: dict[str, Any]
    _hf_optim_glue: dict[str, Any]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        name = optimizer_name(self.args)
        glue: dict[str, Any] = {}
        if (
            self.optimizer is None
            and name is not None
            and getattr(self, "optimizer_cls_and_kwargs", None) is None
        ):
            opt_model = self.model if model is None else model
            self.optimizer, glue = build_optimizer(name, self.args, opt_model, self)
        else:
            super().create_optimizer(model)
            if name is not None:
                glue = parse_optim_args(name, self.args.optim_args)[1]
        self._hf_optim_glue = glue
        self._hf_optim_decided = configure_for_trainer(self.optimizer, self, glue)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        decided = getattr(self, "_hf_optim_decided", {})
        if self.lr_scheduler is None and decided.get("replace_scheduler"):
            self.lr_scheduler = constant_scheduler(optimizer or self.optimizer)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        optimizer = unwrap_optimizer(self.optimizer)
        if getattr(optimizer, "needs_loss", False):
            step = self.state.global_step
            window = getattr(self, "_hf_optim_window", None)
            if window is None or window[0] != step:
                # A new window: drop whatever a skipped step left behind.
                optimizer.clear_loss()
                window = (step, loss)
            else:
                window = (step, window[1] + loss)
            self._hf_optim_window = window
            if self.accelerator.sync_gradients:
                optimizer.set_loss(mean_over_ranks(window[1]))
                self._hf_optim_window = None
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        glue = getattr(self, "_hf_optim_glue", {})
        inner = unwrap_optimizer(self.optimizer)
        if _internal_call or not glue.get("save_averaged") or not _has_averaged_weights(inner):
            # Checkpoints keep the training weights: resuming needs them (the averages are in
            # optimizer.pt; OptimizerStatsCallback writes them beside the checkpoint).
            return super().save_model(output_dir, _internal_call=_internal_call)
        inner.eval()
        try:
            return super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            inner.train()


class Trainer(OptimizerTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that builds and drives hf-optim optimizers (see the mixin)."""


def _optim_choices() -> list[str]:
    stock = [member.value for member in OptimizerNames if member.value not in OPTIMIZERS]
    return stock + list(OPTIMIZERS)


def _default_optim() -> str:
    default = transformers.TrainingArguments.__dataclass_fields__["optim"].default
    return getattr(default, "value", default)


@dataclass
class OptimNameArgumentsMixin:
    """Dataclass mixin giving any ``TrainingArguments`` class the hf-optim names without
    registration: ``@dataclass class MyArgs(OptimNameArgumentsMixin, Seq2SeqTrainingArguments)``.

    ``optim`` becomes a plain ``str`` field whose ``choices`` (read by ``HfArgumentParser``)
    include the hf-optim names; ``optim_args`` is validated against the optimizer's typed schema
    at construction.
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
        parse_optim_args(name, self.optim_args)
        # The stock validation only knows its own Enum: let it see a stock name, then restore.
        self.optim = "adamw_torch"
        super().__post_init__()
        self.optim = OptimizerNames(name) if name in OptimizerNames._value2member_map_ else name


@dataclass
class TrainingArguments(OptimNameArgumentsMixin, transformers.TrainingArguments):
    """``transformers.TrainingArguments`` that accepts the hf-optim names with or without
    registration (the fallback when the installed transformers cannot be extended)."""
