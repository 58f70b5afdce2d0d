"""Per-tensor kernels: each algorithm's math written once, run eagerly or compiled.

A kernel is a plain function of tensors (and of a few Python values fixed for the whole run).
Run eagerly it is the readable reference; compiled, the same function goes through
``torch.compile(dynamic=True, fullgraph=True)`` (inductor: C++ on CPU, Triton on CUDA), which
fuses its elementwise work into one pass over memory.

Two ways to call one:

* ``k(*args, compiled=...)``: one tensor's worth of arguments.
* ``k.map(items, compiled=...)``: a list of argument tuples, one per tensor, with the same
  Python values. Compiled, the items run ``CHUNK`` at a time in one compiled call (the last
  chunk padded with small scratch tensors), because a compiled call costs far more
  Python overhead than a fused kernel spends on a small tensor: one call per tensor would
  cost more than the whole step of torch's fused AdamW on a model with many small tensors.

Compiled objects are cached per kernel, device type, dtype and Python values, each with its
own dynamo cache (dynamo's recompile limit counts per code object), and shared by every
optimizer instance. Tensors reach the compiled code as base-less aliases of their memory,
1-D ones with ``flatten=True``: an ``nn.Parameter`` would add a type guard and static shapes,
and a view is guarded on its base's shape, both of which recompile. So a kernel compiles once
per dtype, device and configuration, never per shape. Values that change during a run must
arrive as 0-d tensors: a Python float is a constant to the compiler.

Per-step scalar math (bias corrections ``1 - beta**t``, step sizes) belongs in a kernel's
``scalars`` function, not in its body: ``@kernel(scalars=f)`` calls ``f(*args)`` first and
the body as ``fn(*args, *f(*args))``. Compiled, ``f``'s 0-d results are also returned by the
compiled call, which makes inductor compute each of them once into a buffer; written in the
body, inductor inlines them into the elementwise loop, where the C++ compiler cannot hoist
them (the loop's output pointer might alias their inputs), and a ``pow`` per vector of eight
elements made CASMO's update pass 3.3x slower than fused AdamW's whole step on one tensor.

Sums over a tensor go through :func:`wide_sum` (float64 accumulation on CPU): inductor's C++
float32 sums switch to a cascade summation above 4096 elements and guard each tensor's size
against that threshold, which would compile once per mix of small and large tensors in a chunk (and the
cascade costs more than the float64 accumulation it replaces).

Rules for kernel authors: never write into a 0-d tensor argument (inductor in torch 2.13
drops writes to 0-d float64 CPU inputs: return the new value instead), and never pass the
same tensor twice in one call (a duplicate-input guard recompiles; :meth:`Kernel.map` aliases
the 0-d tensors that items of one chunk share).

Calls run eagerly instead when compiling cannot help: a tensor with fewer than two elements
(the compiler specialises sizes 0 and 1), a non-contiguous tensor, or a call made while an
outer ``torch.compile`` is already tracing (it inlines the eager function into its own graph).
If compiling fails on a device (no C++ compiler, an unsupported op) the kernel warns once and
stays eager there.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx.experimental._config as _fx_config
from torch import Tensor

__all__ = ["Kernel", "kernel", "wide_sum", "compiler_available", "COMPILE_FAILURES", "CHUNK"]

#: (kernel name, device type, error) for every compile that failed and fell back to eager
COMPILE_FAILURES: list[tuple[str, str, str]] = []

#: tensors per compiled call in :meth:`Kernel.map`
CHUNK = 8


def wide_sum(values: Tensor) -> Tensor:
    """The sum of ``values`` in ``values``' dtype, accumulated in float64 on CPU: compiled, it
    then needs no guard on the tensor's size (module docstring). Other devices keep their own
    accumulation (no such guard there, and float64 is slow or missing on some of them)."""
    if values.device.type != "cpu":
        return values.sum()
    return values.sum(dtype=torch.float64).to(values.dtype)


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


def key_device(key: tuple[Any, ...]) -> str:
    return next(kind[2] for kind in key if kind[0] == "T")


def _key_width(key: tuple[Any, ...]) -> int:
    return sum(kind[0] in ("T", "V") for kind in key)


def _alias(tensor: Tensor, flatten: bool) -> Tensor:
    """A plain tensor on ``tensor``'s memory (1-D with ``flatten``) that is not a view."""
    if tensor.dim() == 0:
        shape, stride = (), ()
    elif flatten:
        shape, stride = (tensor.numel(),), (1,)
    else:
        shape, stride = tensor.shape, tensor.stride()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), shape, stride)


#: id(tensor) -> (a weak reference to it, its alias, what the alias was made from), per
#: ``flatten``: the tensors a step passes are the same objects step after step, and making an
#: alias costs more than a small tensor's kernel. An entry is dropped with its tensor.
_ALIASES: dict[tuple[int, bool, int], tuple[weakref.ref, Tensor, tuple[Any, ...]]] = {}


def _layout(tensor: Tensor) -> tuple[Any, ...]:
    return (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride(),
            tensor.storage_offset())  # fmt: skip


def _cached_alias(tensor: Tensor, flatten: bool, copy: int = 0) -> Tensor:
    """:func:`_alias`, reused while ``tensor`` lives on the same memory in the same layout
    (``p.data = ...``, a storage resized or swapped, a new shape: a fresh alias). ``copy``
    numbers distinct aliases of one tensor (a call passes each object once)."""
    key = (id(tensor), flatten, copy)
    entry = _ALIASES.get(key)
    layout = _layout(tensor)
    if entry is not None and entry[0]() is tensor and entry[2] == layout:
        return entry[1]
    alias = _alias(tensor, flatten)
    _ALIASES[key] = (weakref.ref(tensor, lambda _, key=key: _ALIASES.pop(key, None)), alias,
                     layout)  # fmt: skip
    return alias


def _needs_alias(arg: Any) -> bool:
    return isinstance(arg, Tensor) and (arg.dim() >= 1 or arg._base is not None)


def _distinct(args: list[Any], flatten: bool) -> list[Any]:
    """``args`` with every repeated tensor replaced by an alias. Items of one chunk share 0-d
    tensors (a group's learning rate): dynamo would guard that two inputs are the same object
    and recompile when a later chunk pairs other groups."""
    seen: dict[int, int] = {}
    for position, arg in enumerate(args):
        if isinstance(arg, Tensor):
            copies = seen.get(id(arg), 0)
            if copies:
                args[position] = _cached_alias(arg, flatten, copies)
            seen[id(arg)] = copies + 1
    return args


def _compilable(args: Sequence[Any]) -> bool:
    for arg in args:
        if isinstance(arg, Tensor) and arg.dim() > 0:
            if arg.numel() < 2 or not arg.is_contiguous():
                return False
    return True


def _static_key(args: Sequence[Any]) -> tuple[Any, ...]:
    """What a compiled object is specialised on: where the tensors are and the Python values."""
    return tuple(
        ("T", a.dtype, a.device.type, a.dim() == 0) if isinstance(a, Tensor) else ("V", a)
        for a in args
    )


_copies = itertools.count()


def _fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The same function with a code object of its own, so a dynamo cache of its own (dynamo
    keys its caches and its recompile limit on code objects)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_copies)}")
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


class Kernel:
    """A per-tensor function with an eager reference and compiled twins."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        flatten: bool = True,
        scalars: Callable[..., tuple[Tensor, ...]] | None = None,
        cpu_options: dict[str, Any] | None = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self.body = fn
        self.scalars = scalars
        self.flatten = flatten
        self.cpu_options = dict(cpu_options or {})
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._failed_devices: set[str] = set()
        self._scratch: dict[tuple[Any, ...], Tensor] = {}
        self._signature = inspect.signature(fn)

    def __repr__(self) -> str:
        return f"Kernel({self.body.__qualname__})"

    def eager(self, *args: Any) -> Any:
        """The reference: the scalars, then the body, op by op."""
        if self.scalars is None:
            return self.body(*args)
        return self.body(*args, *self.scalars(*args))

    # -- compiled objects ----------------------------------------------------------------
    def _compiled_for(self, key: tuple[Any, ...], count: int) -> Callable[..., Any]:
        compiled = self._compiled.get((key, count))
        if compiled is None:
            width = _key_width(key)
            body, scalars = self.body, self.scalars

            def chunk(*flat: Any) -> tuple[tuple[Any, ...], tuple[Tensor, ...]]:
                """The items' results, and every scalar (returned: computed once each)."""
                results, hoisted = [], []
                for index in range(count):
                    args = flat[index * width : (index + 1) * width]
                    extra = scalars(*args) if scalars is not None else ()
                    hoisted.extend(extra)
                    results.append(body(*args, *extra))
                return tuple(results), tuple(hoisted)

            target = _fresh_copy(chunk)

            # CPU: no split reductions, whose size-dependent choice would guard each tensor's
            # size against a threshold (a compile per combination of small and large tensors)
            options = (
                {"split_reductions": False, **self.cpu_options} if key_device(key) == "cpu" else {}
            )
            compiled = torch.compile(target, dynamic=True, fullgraph=True, options=options)
            self._compiled[(key, count)] = compiled
        return compiled

    def _fail(self, device_type: str, error: Exception) -> None:
        self._failed_devices.add(device_type)
        COMPILE_FAILURES.append((self.body.__qualname__, device_type, repr(error)))
        warnings.warn(
            f"hf_optim: compiling {self.body.__qualname__} for {device_type} failed "
            f"({type(error).__name__}: {error}); running it eagerly from now on",
            RuntimeWarning,
            stacklevel=3,
        )

    def _run_compiled(self, key, count, flat_args, device_type) -> Any:
        try:
            # No duck sizing: tensors of a chunk that happen to have equal sizes must not be
            # guarded equal (the next step's chunk may pair other sizes).
            with _fx_config.patch(use_duck_shape=False):
                return self._compiled_for(key, count)(*flat_args)[0]
        except Exception as error:  # compilation failure: stay correct, say so once
            if not _is_compile_failure(error):
                raise
            self._fail(device_type, error)
            return None

    def _aliases(self, args: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(_cached_alias(a, self.flatten) if _needs_alias(a) else a for a in args)

    # -- calls ---------------------------------------------------------------------------
    def __call__(self, *args: Any, compiled: bool = False, **kwargs: Any) -> Any:
        if kwargs:  # the compiled objects are keyed on positions
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        if not compiled or torch.compiler.is_compiling() or not _compilable(args):
            return self.eager(*args)
        device_type = next(a.device.type for a in args if isinstance(a, Tensor))
        if device_type in self._failed_devices:
            return self.eager(*args)
        flat = _distinct(list(self._aliases(args)), self.flatten)
        results = self._run_compiled(_static_key(args), 1, flat, device_type)
        if results is None:  # compiling failed just now
            return self.eager(*args)
        return results[0]

    def map(self, items: Sequence[Sequence[Any]], *, compiled: bool = False) -> list[Any]:
        """``[kernel(*item) for item in items]``, compiled ``CHUNK`` items per call."""
        if not compiled or torch.compiler.is_compiling():
            return [self.eager(*item) for item in items]
        results: list[Any] = [None] * len(items)
        batches: dict[tuple[Any, ...], list[int]] = {}
        for index, item in enumerate(items):
            if _compilable(item):
                batches.setdefault(_static_key(item), []).append(index)
            else:
                results[index] = self.eager(*item)
        for key, indices in batches.items():
            device_type = key_device(key)
            for start in range(0, len(indices), CHUNK):
                chunk = indices[start : start + CHUNK]
                if device_type in self._failed_devices:
                    for index in chunk:
                        results[index] = self.eager(*items[index])
                    continue
                padded = [self._aliases(items[index]) for index in chunk]
                padded += [
                    self._padding(items[chunk[0]], key, slot)
                    for slot in range(len(chunk), CHUNK)
                ]
                flat = _distinct([arg for item in padded for arg in item], self.flatten)
                outputs = self._run_compiled(key, CHUNK, flat, device_type)
                if outputs is None:  # compiling failed just now
                    for index in chunk:
                        results[index] = self.eager(*items[index])
                    continue
                for index, output in zip(chunk, outputs, strict=False):
                    results[index] = output
        return results

    def _padding(self, item: Sequence[Any], key: tuple[Any, ...], slot: int) -> tuple[Any, ...]:
        """Arguments for an unused slot of a chunk: small scratch tensors (of the chunk's size
        class) in place of per-element tensors, one per slot and position so that no two
        inputs alias, and the 0-d tensors and Python values of a real item."""
        padded = []
        for position, arg in enumerate(item):
            if isinstance(arg, Tensor) and arg.dim() >= 1:
                shape = (2,) if self.flatten else (2,) + (1,) * (arg.dim() - 1)
                scratch_key = (key, slot, position)
                scratch = self._scratch.get(scratch_key)
                if scratch is None:
                    scratch = torch.zeros(shape, dtype=arg.dtype, device=arg.device)
                    self._scratch[scratch_key] = scratch
                padded.append(scratch)
            elif isinstance(arg, Tensor):
                padded.append(_alias(arg, self.flatten))
            else:
                padded.append(arg)
        return tuple(padded)


def _is_compile_failure(error: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError, Unsupported

    return isinstance(error, (BackendCompilerFailed, Unsupported, TorchRuntimeError)) or (
        type(error).__module__.startswith(("torch._inductor", "torch._dynamo"))
    )


def kernel(
    fn: Callable[..., Any] | None = None,
    *,
    flatten: bool = True,
    scalars: Callable[..., tuple[Tensor, ...]] | None = None,
    cpu_options: dict[str, Any] | None = None,
) -> Any:
    """Decorator: ``@kernel``, ``@kernel(flatten=False)`` for math that needs the shape,
    ``@kernel(scalars=f)`` for a body that takes ``f``'s 0-d results as its last arguments,
    ``@kernel(cpu_options={...})`` for inductor settings of its CPU compilation."""
    if fn is None:
        return functools.partial(Kernel, flatten=flatten, scalars=scalars, cpu_options=cpu_options)
    return Kernel(fn, flatten=flatten, scalars=scalars, cpu_options=cpu_options)
