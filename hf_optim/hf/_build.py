"""Build an hf-optim optimizer from ``TrainingArguments``: arguments and parameter groups.

Arguments: the values transformers itself hands every optimizer handler
(``OptimizerContext.optimizer_kwargs`` and ``adam_kwargs``: ``lr``, ``betas``, ``eps``) and the
Trainer's ``weight_decay``, each kept only where the constructor has that argument and the
registry record's ``hf_arguments`` says it means the same thing; then ``optim_args`` (typed by
:mod:`hf_optim.hf._schema`), every key of which wins, an upstream alias (AMaC's ``wd``)
included. The run's length in optimizer steps fills the record's ``total_steps_argument``
unless ``optim_args`` gives it.

Parameter groups: the Trainer's decay / no-decay split (and its split by device mesh). The
decay group carries no ``weight_decay`` of its own, so the constructor's value (from
``optim_args`` or ``TrainingArguments``) applies to it; the no-decay group gets 0.

This module imports transformers only inside the functions that need it.
"""

from __future__ import annotations

import contextvars
from collections import defaultdict
from typing import Any

from torch import nn

from .._base import HFOptimizer
from .._registry import OPTIMIZERS, get_optimizer_info
from ._schema import OptimArgsError, argument_specs, parse_optim_args

__all__ = [
    "build_optimizer",
    "current_trainer",
    "optimizer_cls_and_kwargs",
    "optimizer_kwargs",
    "optimizer_name",
    "param_groups",
    "stock_trainer_handler",
    "unwrap_optimizer",
]

#: The Trainer whose ``create_optimizer`` is running (set by the wrapper that
#: :mod:`hf_optim.hf._register` puts around ``transformers.Trainer.create_optimizer``), so the
#: static handler can read the run's length and the Trainer's decay rule.
current_trainer: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "hf_optim_current_trainer", default=None
)

#: Constructor argument -> the ``TrainingArguments`` fields it is taken from (registry
#: ``hf_arguments`` must list all of them).
_FROM_TRAINING_ARGUMENTS = {
    "lr": ("learning_rate",),
    "betas": ("adam_beta1", "adam_beta2"),
    "eps": ("adam_epsilon",),
    "weight_decay": ("weight_decay",),
}


def optimizer_name(args: Any) -> str | None:
    """The hf-optim name in ``args.optim`` (an Enum member or a str), or None."""
    optim = getattr(args, "optim", None)
    value = getattr(optim, "value", optim)
    return value if isinstance(value, str) and value in OPTIMIZERS else None


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's (or DeepSpeed's) wrappers."""
    for _ in range(8):
        if isinstance(optimizer, HFOptimizer) or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return optimizer


def _context(args: Any, model: Any = None) -> Any:
    """The ``OptimizerContext`` transformers builds in ``Trainer.get_optimizer_cls_and_kwargs``."""
    from transformers.trainer_optimizer import OptimizerContext

    return OptimizerContext(
        args=args,
        model=model,
        optimizer_kwargs={"lr": args.learning_rate},
        adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
        optim_args={},
    )


def optimizer_kwargs(
    name: str, args: Any, max_steps: int | None = None, context: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor kwargs, glue options) for optimizer ``name`` from a ``TrainingArguments``
    (and the ``OptimizerContext`` transformers built from it, when there is one)."""
    info = get_optimizer_info(name)
    cls = info.load()
    specs = argument_specs(cls)
    context = context if context is not None else _context(args)
    offered = {
        **context.optimizer_kwargs,
        **context.adam_kwargs,
        "weight_decay": args.weight_decay,
    }
    explicit, glue = parse_optim_args(name, getattr(args, "optim_args", None))
    # An upstream alias given in optim_args (AMaC's wd) replaces its readable argument too.
    aliases = getattr(cls, "argument_aliases", {})
    overridden = set(explicit) | {aliases[key] for key in explicit if key in aliases}
    kwargs = {
        key: value
        for key, value in offered.items()
        if key in specs
        and key not in overridden
        and all(f in info.hf_arguments for f in _FROM_TRAINING_ARGUMENTS.get(key, (key,)))
    }
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
    ``Trainer(optimizer_cls_and_kwargs=...)`` or peft's ``create_loraplus_optimizer``."""
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


def param_groups(model: nn.Module, cls: type, trainer: Any = None) -> list[dict[str, Any]]:
    """The Trainer's groups: trainable parameters split into decay / no-decay (and by device
    mesh, as ``Trainer.create_optimizer`` does for mixed DTensor meshes). The decay group takes
    the constructor's ``weight_decay``; the no-decay group gets 0."""
    decay = _decay_parameter_names(model, trainer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay: dict[str, Any] = (
        {"weight_decay": 0.0} if "weight_decay" in argument_specs(cls) else {}
    )
    groups = [
        {"params": [p for n, p in named if n in decay]},
        {"params": [p for n, p in named if n not in decay], **no_decay},
    ]
    meshes = {getattr(p, "device_mesh", None) for _, p in named}
    if len(meshes) > 1:
        split = []
        for group in groups:
            by_mesh: dict[Any, list[Any]] = defaultdict(list)
            for p in group["params"]:
                by_mesh[getattr(p, "device_mesh", None)].append(p)
            split.extend({**group, "params": params} for params in by_mesh.values())
        groups = split
    return groups


def build_optimizer(
    name: str, args: Any, model: nn.Module, trainer: Any = None
) -> tuple[HFOptimizer, dict[str, Any]]:
    """Instantiate optimizer ``name`` for ``model``; returns (optimizer, glue options)."""
    max_steps = getattr(getattr(trainer, "state", None), "max_steps", None)
    kwargs, glue = optimizer_kwargs(name, args, max_steps)
    cls = get_optimizer_info(name).load()
    return cls(param_groups(model, cls, trainer), **kwargs), glue


def stock_trainer_handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """The ``_OPTIMIZER_HANDLERS`` entry for every hf-optim name: ``(class, kwargs)``, with the
    parameter groups in ``kwargs["params"]`` when the Trainer passes the model (so the decay
    group takes ``optim_args``' ``weight_decay``)."""
    name = optimizer_name(ctx.args)
    if name is None:  # pragma: no cover - only registered under our names
        raise ValueError(f"not an hf-optim optimizer: {ctx.args.optim!r}")
    trainer = current_trainer.get()
    max_steps = getattr(getattr(trainer, "state", None), "max_steps", None)
    cls = get_optimizer_info(name).load()
    kwargs, _ = optimizer_kwargs(name, ctx.args, max_steps, ctx)
    if ctx.model is not None:
        kwargs["params"] = param_groups(ctx.model, cls, trainer)
    return cls, kwargs
