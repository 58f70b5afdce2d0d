"""Teach the stock transformers stack the names ``casmo``, ``autosgm``, ``amac``, ``momo`` and
``momo_adam``.

transformers has no plugin registry for optimizers: ``TrainingArguments.__post_init__`` runs
``OptimizerNames(self.optim)`` (a closed ``str`` Enum) and ``Trainer.get_optimizer_cls_and_kwargs``
looks the name up in the module-level dict ``trainer_optimizer._OPTIMIZER_HANDLERS``. Registration
therefore (1) adds one member per name to ``OptimizerNames``, (2) adds one handler per name to
that dict and (3) wraps ``transformers.Trainer.create_optimizer``, the one method every Trainer
subclass runs before training, so that the optimizer is fitted to the Trainer running it
(:func:`hf_optim.hf.trainer.attach`: the loss for Momo at ``accelerator.backward``, the run's
length, the schedule rule, statistics) and a malformed ``optim_args`` gets hf-optim's message
instead of transformers' ``not enough values to unpack``. The wrapper does nothing for other
optimizers. All three steps are idempotent and feature-detected; when an internal is missing the
error names the supported transformers versions and the fallback (``hf_optim.TrainingArguments``
and ``hf_optim.Trainer``, which need no registration).

Why extend the Enum rather than subclass ``TrainingArguments``: only the Enum route covers every
subclass of ``TrainingArguments`` (``Seq2SeqTrainingArguments``, TRL's configs), ``--optim casmo``
in ``HfArgumentParser``, ``set_optimizer()`` and the stock ``Trainer`` at once (integration.md §1.3).
"""

from __future__ import annotations

import functools
import importlib
import threading
from types import ModuleType
from typing import Any

from .._registry import OPTIMIZERS

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "HFOptimRegistrationError",
    "register_hf_optimizers",
    "register_names",
    "register_handlers",
    "register_trainer",
    "registration_status",
]

#: The transformers versions whose internals this module was written against (tested: 5.24).
SUPPORTED_TRANSFORMERS = ">=5.23,<6"

_FALLBACK = (
    "Fallback that needs no registration: use hf_optim.TrainingArguments (or add "
    "hf_optim.hf.OptimNameArgumentsMixin to your arguments class) with hf_optim.Trainer (or "
    "hf_optim.hf.OptimizerTrainerMixin for other Trainer classes), or pass "
    "Trainer(optimizer_cls_and_kwargs=(hf_optim.CASMO, {...}))."
)

_lock = threading.RLock()
_status: dict[str, str | None] = {"names": None, "handlers": None, "trainer": None}


class HFOptimRegistrationError(RuntimeError):
    """The installed transformers lacks an internal that registration relies on."""


def _error(what: str, module: ModuleType | str) -> HFOptimRegistrationError:
    try:
        import transformers

        version = transformers.__version__
    except Exception:  # noqa: BLE001 - only used in the message
        version = "unknown"
    name = module if isinstance(module, str) else module.__name__
    return HFOptimRegistrationError(
        f"hf-optim cannot register optim= names with transformers {version}: {what} "
        f"(in {name}). hf-optim supports transformers {SUPPORTED_TRANSFORMERS} (tested with "
        f"5.24). {_FALLBACK}"
    )


def _enum_member_name(name: str) -> str:
    return name.upper()


def register_names(module: ModuleType, *, strict: bool = True) -> bool:
    """Add every hf-optim name to ``module.OptimizerNames``. Returns True when done."""
    with _lock:
        enum_cls = getattr(module, "OptimizerNames", None)
        required = ("_member_map_", "_value2member_map_", "_member_names_")
        if enum_cls is None or not all(hasattr(enum_cls, attr) for attr in required):
            error = _error("OptimizerNames is missing or is not a standard Enum", module)
            _status["names"] = str(error)
            if strict:
                raise error
            return False
        for name in OPTIMIZERS:
            if name in enum_cls._value2member_map_:
                continue
            member_name = _enum_member_name(name)
            # A str-Enum member is a str instance carrying the Enum bookkeeping attributes;
            # built the way EnumType builds its own members (CPython 3.10 to 3.13).
            member = str.__new__(enum_cls, name)
            member._name_ = member_name
            member._value_ = name
            member.__objclass__ = enum_cls
            if hasattr(member, "_sort_order_") or hasattr(
                next(iter(enum_cls._member_map_.values())), "_sort_order_"
            ):
                member._sort_order_ = len(enum_cls._member_names_)
            enum_cls._member_map_[member_name] = member
            enum_cls._value2member_map_[name] = member
            enum_cls._member_names_.append(member_name)
            # EnumType.__setattr__ refuses to rebind member names; type.__setattr__ does not.
            type.__setattr__(enum_cls, member_name, member)
        if any(enum_cls(name).value != name for name in OPTIMIZERS):
            error = _error("extending OptimizerNames did not take effect", module)
            _status["names"] = str(error)
            if strict:
                raise error
            return False
        _status["names"] = "ok"
        return True


def register_handlers(module: ModuleType, *, strict: bool = True) -> bool:
    """Add one handler per hf-optim name to ``module._OPTIMIZER_HANDLERS``."""
    from ._build import stock_trainer_handler

    with _lock:
        handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
        missing = [
            attr
            for attr in ("OptimizerContext", "is_optimizer_factory")
            if not hasattr(module, attr)
        ]
        if not isinstance(handlers, dict) or missing:
            what = (
                "_OPTIMIZER_HANDLERS is not a dict"
                if not isinstance(handlers, dict)
                else f"missing {', '.join(missing)}"
            )
            error = _error(what, module)
            _status["handlers"] = str(error)
            if strict:
                raise error
            return False
        enum_cls = getattr(module, "OptimizerNames", None)
        for name in OPTIMIZERS:
            # Key by the Enum member when it exists: it is a str, so it hashes like the plain
            # name and both `optim="casmo"` spellings find the handler.
            key: Any = name
            if enum_cls is not None and name in getattr(enum_cls, "_value2member_map_", {}):
                key = enum_cls(name)
            handlers[key] = stock_trainer_handler
        _status["handlers"] = "ok"
        return True


def register_trainer(module: ModuleType, *, strict: bool = True) -> bool:
    """Wrap ``module.Trainer.create_optimizer`` (see the module docstring)."""
    with _lock:
        trainer_cls = getattr(module, "Trainer", None)
        original = getattr(trainer_cls, "create_optimizer", None)
        if original is None:
            error = _error("Trainer.create_optimizer is missing", module)
            _status["trainer"] = str(error)
            if strict:
                raise error
            return False
        if getattr(original, "_hf_optim_wrapped", False):
            _status["trainer"] = "ok"
            return True

        @functools.wraps(original)
        def create_optimizer(self: Any, model: Any = None) -> Any:
            from ._build import current_trainer, optimizer_name
            from ._schema import parse_optim_args
            from .trainer import attach

            name = optimizer_name(self.args)
            if name is not None and self.optimizer is None:
                # Before transformers' own optim_args splitting, which fails with a bare
                # "not enough values to unpack".
                parse_optim_args(name, self.args.optim_args)
            token = current_trainer.set(self)
            try:
                optimizer = original(self, model)
            finally:
                current_trainer.reset(token)
            attach(self)
            return optimizer

        create_optimizer._hf_optim_wrapped = True  # type: ignore[attr-defined]
        trainer_cls.create_optimizer = create_optimizer
        _status["trainer"] = "ok"
        return True


def register_hf_optimizers() -> None:
    """Register the names and handlers with transformers now, raising on failure. Idempotent.

    ``import hf_optim`` already arranges this automatically; call it explicitly to get an
    exception (instead of a warning) when the installed transformers is not supported.
    """
    training_args = importlib.import_module("transformers.training_args")
    register_names(training_args, strict=True)
    trainer_optimizer = importlib.import_module("transformers.trainer_optimizer")
    register_handlers(trainer_optimizer, strict=True)
    register_trainer(importlib.import_module("transformers.trainer"), strict=True)


def registration_status() -> dict[str, str | None]:
    """``{"names": ..., "handlers": ..., "trainer": ...}``: ``"ok"``, an error message, or
    ``None`` (not yet)."""
    return dict(_status)
