"""Register the ``optim=`` names whichever order the user imports ``hf_optim`` and transformers in.

``import hf_optim`` must stay fast and torch-only, so it cannot import transformers. Instead:

* if ``transformers.training_args``, ``transformers.trainer_optimizer`` and
  ``transformers.trainer`` are already imported, the names, handlers and the Trainer wrapper
  are registered at once;
* otherwise a small ``sys.meta_path`` finder waits for those three modules and registers right
  after each finishes executing, before the user's ``TrainingArguments(optim="casmo")``,
  ``HfArgumentParser`` or unpickling of a ``training_args.bin`` can run.

The finder only wraps the loaders of those three module names; it removes itself once all have
been seen. A failure to register is turned into a warning here (an import hook must never break
``import transformers``); :func:`hf_optim.hf.register_hf_optimizers` raises it.

This module imports only the standard library.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["install"]

TRAINING_ARGS_MODULE = "transformers.training_args"
TRAINER_OPTIMIZER_MODULE = "transformers.trainer_optimizer"
TRAINER_MODULE = "transformers.trainer"

_lock = threading.RLock()


def _on_training_args(module: ModuleType) -> None:
    from ._register import register_names

    register_names(module, strict=False)


def _on_trainer_optimizer(module: ModuleType) -> None:
    from ._register import register_handlers

    register_handlers(module, strict=False)


def _on_trainer(module: ModuleType) -> None:
    from ._register import register_trainer

    register_trainer(module, strict=False)


_CALLBACKS: dict[str, Callable[[ModuleType], None]] = {
    TRAINING_ARGS_MODULE: _on_training_args,
    TRAINER_OPTIMIZER_MODULE: _on_trainer_optimizer,
    TRAINER_MODULE: _on_trainer,
}


def _run(name: str, module: ModuleType) -> None:
    try:
        _CALLBACKS[name](module)
    except Exception as error:  # noqa: BLE001 - never break the user's transformers import
        warnings.warn(
            f"hf-optim could not register its optim= names with transformers: {error}",
            RuntimeWarning,
            stacklevel=3,
        )


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, name: str, finder: _RegisteringFinder) -> None:
        self._loader = loader
        self._name = name
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # Only now is the module really imported (a bare find_spec() must not use us up).
        self._finder.pending.discard(self._name)
        if not self._finder.pending:
            _remove_finder(self._finder)
        _run(self._name, module)

    def __getattr__(self, attribute: str) -> Any:  # get_source, get_code, is_package, ...
        return getattr(self._loader, attribute)


class _RegisteringFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending = set(_CALLBACKS)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, fullname, self)
                return spec
        return None


def _remove_finder(finder: _RegisteringFinder) -> None:
    try:
        sys.meta_path.remove(finder)
    except ValueError:
        pass


def install() -> None:
    """Register now for the modules already imported and wait for the others. Idempotent."""
    with _lock:
        for finder in sys.meta_path:
            if isinstance(finder, _RegisteringFinder):
                return
        waiting = _RegisteringFinder()
        for name in list(_CALLBACKS):
            module = sys.modules.get(name)
            if module is not None:
                waiting.pending.discard(name)
                _run(name, module)
        if waiting.pending:
            sys.meta_path.insert(0, waiting)
