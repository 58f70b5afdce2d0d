"""Per-tensor kernels: each algorithm's math written once, run eagerly or compiled.

A kernel is a plain function of tensors (and of a few Python values fixed for the whole run).
Run eagerly it is the readable reference; with ``compiled=True`` the same function goes through
``torch.compile(dynamic=True, fullgraph=True)`` (inductor: C++ on CPU, Triton on CUDA), which
fuses its elementwise work into one pass over memory.

One compiled object exists per kernel per process, shared by every optimizer instance. Tensors
are handed over as views, 1-D ones with ``flatten=True``, so a kernel compiles once per dtype and
device rather than once per shape (or per ``nn.Parameter``). Values that change during a run must arrive as 0-d tensors: a
Python float is a constant to the compiler and each new value would recompile.

Calls run eagerly instead when compiling cannot help or would recompile: a tensor with fewer
than two elements (the compiler specialises sizes 0 and 1), a non-contiguous tensor, or a call
made while an outer ``torch.compile`` is already tracing (it inlines the eager function into
its own graph). If compiling fails on a device (no C++ compiler, an unsupported op) the kernel
warns once and stays eager there.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Kernel", "kernel", "compiler_available", "COMPILE_FAILURES"]

#: (kernel name, device type, error) for every compile that failed and fell back to eager
COMPILE_FAILURES: list[tuple[str, str, str]] = []


@functools.cache
def compiler_available(device_type: str) -> bool:
    """Whether ``torch.compile`` can generate kernels for ``device_type`` here."""
    if device_type == "cpu":
        from torch._inductor import cpp_builder

        try:
            return bool(cpp_builder.get_cpp_compiler())
        except Exception:  # no C++ compiler on this machine
            return False
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton

            return has_triton()
        except Exception:
            return False
    return False


class Kernel:
    """A per-tensor function with an eager reference and a compiled twin."""

    def __init__(self, fn: Callable[..., Any], *, flatten: bool = True) -> None:
        functools.update_wrapper(self, fn)
        self.eager = fn
        self.flatten = flatten
        self._compiled: Callable[..., Any] | None = None
        self._failed_devices: set[str] = set()

    def __repr__(self) -> str:
        return f"Kernel({self.eager.__qualname__})"

    def _compiled_fn(self) -> Callable[..., Any]:
        if self._compiled is None:
            self._compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
        return self._compiled

    def _can_compile(self, args: tuple[Any, ...]) -> bool:
        if torch.compiler.is_compiling():
            return False
        for arg in args:
            if isinstance(arg, Tensor) and arg.dim() > 0:
                if arg.numel() < 2 or not arg.is_contiguous():
                    return False
        return True

    def __call__(self, *args: Any, compiled: bool = False, **kwargs: Any) -> Any:
        if not compiled or not self._can_compile(args):
            return self.eager(*args, **kwargs)
        device_type = next(a.device.type for a in args if isinstance(a, Tensor))
        if device_type in self._failed_devices:
            return self.eager(*args, **kwargs)
        args = tuple(
            _alias(a, self.flatten) if isinstance(a, Tensor) and a.dim() >= 1 else a for a in args
        )
        try:
            return self._compiled_fn()(*args, **kwargs)
        except Exception as error:  # compilation failure: stay correct, say so once
            if not _is_compile_failure(error):
                raise
            self._failed_devices.add(device_type)
            COMPILE_FAILURES.append((self.eager.__qualname__, device_type, repr(error)))
            warnings.warn(
                f"hf_optim: compiling {self.eager.__qualname__} for {device_type} failed "
                f"({type(error).__name__}: {error}); running it eagerly from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.eager(*args, **kwargs)


def _alias(tensor: Tensor, flatten: bool) -> Tensor:
    """A plain tensor on ``tensor``'s memory (1-D with ``flatten``), which is not a view.

    What dynamo would otherwise see costs recompiles: an ``nn.Parameter`` adds a type guard and
    static shapes, and a view is guarded on its base's shape (one compile per base rank).
    """
    shape = (tensor.numel(),) if flatten else tensor.shape
    stride = (1,) if flatten else tensor.stride()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), shape, stride)


def _is_compile_failure(error: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError, Unsupported

    return isinstance(error, (BackendCompilerFailed, Unsupported, TorchRuntimeError)) or (
        type(error).__module__.startswith(("torch._inductor", "torch._dynamo"))
    )


def kernel(fn: Callable[..., Any] | None = None, *, flatten: bool = True) -> Any:
    """Decorator: ``@kernel`` or ``@kernel(flatten=False)`` for math that needs the shape."""
    if fn is None:
        return functools.partial(Kernel, flatten=flatten)
    return Kernel(fn, flatten=flatten)
