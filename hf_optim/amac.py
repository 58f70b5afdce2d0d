r"""AMaC: Adam with warm-up and cosine annealing, gradient centralization, annealed noise
injection, update clipping, dynamic weight decay, heavy-ball momentum, Lookahead and SWA.

Original code: ``godsonj64/AMaC-Optimizer`` (``AMaC_optimizer.py`` and ``AMaC_v.2.py``, 2024),
described only by its README. There is no paper; the components are
Adam (Kingma & Ba, 2015) with AdamW's decoupled decay (Loshchilov & Hutter, 2019), SGDR's
cosine (Loshchilov & Hutter, 2017), gradient centralization (Yong et al., 2020), gradient
noise (Neelakantan et al., 2015), Lookahead (Zhang et al., 2019) and stochastic weight
averaging (Izmailov et al., 2018).

The update
----------
Per parameter group, with the group's optimizer-step count :math:`t` (one count per group, so
a parameter that misses a gradient never falls out of phase), base learning rate
:math:`\gamma` (``lr``, read every step), warm-up length :math:`W`, total length :math:`T`:

.. math::

    s_t &= \begin{cases} t/W & t < W \\
           r + (1-r)\,\tfrac12\bigl(1+\cos(\pi\,\min(1, \tfrac{t-W}{\max(T-W,1)}))\bigr)
           & t \ge W \end{cases}
           \qquad \gamma_t = \gamma\, s_t \\
    a_t &= \max(0,\ 1 - t/T) \qquad \text{(annealing of noise and weight decay)} \\
    g_t &= \nabla f(\theta_{t-1}) - \operatorname{mean}_{\text{per output channel}}
           \nabla f(\theta_{t-1}) \qquad \text{(only for tensors with 2 or more dimensions)} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \delta_t &= \operatorname{clip}_{[-c,\,c]}\Bigl(\frac{m_t/(1-\beta_1^t)}
                {\sqrt{v_t/(1-\beta_2^t)}+\epsilon} + \sigma a_t\,\xi_t\Bigr),
                \qquad \xi_t \sim \mathcal N(0, I) \\
    \theta &\leftarrow \theta\,(1 - \gamma_t \lambda a_t) \\
    u_t &= \mu\, u_{t-1} + \gamma_t \delta_t \qquad \theta_t = \theta - u_t \\
    \text{every } k \text{ steps:}\quad
    \phi &\leftarrow \phi + \alpha(\theta_t - \phi),\quad \theta_t \leftarrow \phi
          \qquad \text{(Lookahead)} \\
    \text{every } k \text{ steps from } t_{\text{swa}}:\quad
    \bar\theta &\leftarrow \bar\theta + (\theta_t - \bar\theta)/(n+1),\quad n \leftarrow n+1
          \qquad \text{(SWA)}

:math:`u` is the usual heavy-ball velocity written as the step that is *subtracted*
(upstream's :math:`u_{up} = \mu u_{up} - \gamma_t\delta_t;\ \theta \mathrel{+}= u_{up}` is the
same recurrence with :math:`u = -u_{up}`). With every extra feature off (no schedule,
centralization, noise, clipping, dynamic decay, Lookahead, SWA) this is AdamW plus heavy-ball
momentum on the Adam direction; with ``momentum=0`` as well it is exactly AdamW.

Every feature switches off on its own: ``schedule=False`` (use ``lr`` as given), or
``warmup_steps=0`` / ``cosine=False`` for one half of it; ``centralize_gradients=False``;
``bias_correction=False``; ``noise_factor=0``; ``clip_value=None``;
``dynamic_weight_decay=False`` (constant decoupled decay) or ``weight_decay=0``;
``momentum=0``; ``lookahead=False``; ``swa=False``.

Averaged weights
----------------
:meth:`AMaC.eval` swaps the averaged weights (the SWA average where the group has one, else
the Lookahead slow weights) into the model and keeps the fast weights in the state
(``fast_weights``); :meth:`AMaC.train` swaps them back. Both are idempotent, and ``train()`` in
train mode only reads one flag per group (the HF Trainer calls it every training step).
:meth:`AMaC.write_averaged_weights` (alias :meth:`AMaC.swap_swa_weights`, upstream's name)
writes the averaged weights into the model for export and drops the fast ones. The mode is the
group entry ``averaged_in_model``; a state dict saved in eval mode holds the fast weights, so a
checkpoint taken in eval mode resumes exactly once ``train()`` is called (``step()`` refuses to
run in eval mode, because the gradient would have been taken at the averaged weights).

Implementation
--------------
The update of one tensor is written once, as the kernels ``_update`` (a tensor as one
contiguous run) and ``_update_rows`` (a tensor as a block of rows: centralization, and noise
positions of row or column shards); both share ``_adam_noise_update``, which also applies
Lookahead and SWA. They run as written (``implementation="eager"``, the reference) or compiled
with inductor (``"auto"`` where a compiler works, ``"compiled"``), one fused pass over each
tensor. Every per-step value (scheduled lr, bias corrections, annealed noise and decay, whether
this step synchronises) is computed on the device from the group's step count, a 0-d tensor, and
reaches the kernels as one coefficient vector: no recompiles, no host synchronisation, and
``torch.compile(optimizer.step)`` traces the whole step. The only phase before the update is
the per-channel gradient sums of centralization (inductor cannot yet fuse that reduction into
the update); it needs a collective only where a channel is split across ranks.

Lookahead and SWA read and write the slow weights and the average only on steps where they act
when the step count is also known on the host (a Python value kept beside the tensor, trusted
only while the tensor is unmodified since it was recorded): the steps in between then cost no
more than the other features. Under ``torch.compile(optimizer.step)`` and with
``skip_nonfinite`` the step count is not known on the host, and every step reads them and
selects on the device (correct, a little slower).

Noise
-----
Noise is counter-based and drawn inside the kernel: the value added at an element is a pure
function of (``seed``, group index, the parameter's index in its group, the group's step, the
element's position in the whole tensor), computed with int32 tensor operations: two rounds of a
32-bit integer hash (xor-shift-multiply, keyed by the other four values) give four 16-bit
uniforms; their standardised sum (Irwin-Hall, n=4) goes through an odd polynomial fitted so
that its distribution is within 2.7e-4 of the normal one (largest CDF difference), with unit
variance exactly and tails to 4.3 standard deviations. So a resumed run continues the same noise
(``seed`` and ``step`` are saved), replicas with the same seed draw the same noise, a sharded
run draws what a single process draws (positions are global), nothing else needs saving, and
neither the global RNG nor a generator's state is involved. Positions wrap modulo 2**32:
tensors of more than 2**32 elements repeat their noise pattern past that. Upstream draws
``torch.randn_like``; a seeded torch generator cannot be used inside a compiled kernel.

Noise is added to the normalised update, so in parameter space it scales with
:math:`\gamma_t` and vanishes with ``lr=0``. (A velocity built up earlier still coasts at
``lr=0``, and a Lookahead synchronisation still moves the fast weights to the slow ones.)

Sharding
--------
Under FSDP2 (DTensor parameters) all work is on local shards, and the result equals a single
process on the whole batch. Noise positions are global; a row's mean is local when rows are
whole on each rank (``Shard(0)``, FSDP2's default: no collective at all), and is summed across
ranks, in one collective per step, when rows are split (``Shard(1)`` of a matrix). Layouts
whose local piece is not a block of rows are refused with an error when centralization or noise
needs positions. With ``skip_nonfinite`` the count of non-finite gradient elements joins that
collective (or is its only content).

Differences from upstream (and why)
-----------------------------------
* Weight decay and noise anneal with :math:`a_t = \max(0, 1-t/T)` from their full value to 0
  at ``total_steps``. Upstream uses :math:`1-t/(2W)`, which turns negative after twice the
  warm-up, so weights grow exponentially and the noise grows without bound (a bug).
* The cosine goes from ``lr`` at the end of warm-up to ``min_lr_ratio * lr`` at
  ``total_steps`` and stays there. Upstream v1 has period :math:`4W` and ignores the run
  length; v2 rises again after ``total_steps`` (bugs). Without ``total_steps`` (``None``, e.g.
  before the HF Trainer calls :meth:`AMaC.set_total_steps`) the learning rate stays at ``lr``
  after warm-up and nothing anneals; the first step warns about it.
* Gradient centralization is the published technique: the mean over all dimensions but the
  first (the output channel in torch's Linear/Conv layout) is removed, only for tensors with
  two or more dimensions whose channels have more than one element, on a copy. Upstream
  removes the whole-tensor mean from every tensor, so one-element parameters never learn, and
  it overwrites ``p.grad``. The mean accumulates in float32 or wider.
* SWA honours ``swa_start`` (``None`` means the end of warm-up, which is what upstream
  effectively does) and is a uniform running average of every parameter of every group, one
  count per group, updated every ``lookahead_k`` steps. Upstream counts once per parameter,
  so its average is not uniform, crashes with two groups of different shapes, and keeps the
  average outside ``state_dict()``. A parameter without a gradient at an SWA event is skipped
  (left untouched); one that joins late starts its average from its weights at its first event
  (each parameter counts its own samples, ``swa_samples``).
* Counters are per group, not per parameter: warm-up, cosine, bias correction, Lookahead and
  SWA stay in phase for parameters that miss gradients. A parameter that joins late therefore
  gets the group's bias correction, as if it had seen zero gradients before.
* ``lr`` and ``weight_decay`` are group keys read every step (upstream caches ``lr/W`` at the
  first step, which freezes training when an external warm-up starts at 0, and reads ``wd``).
* ``warmup_steps=0`` works (upstream divides by zero); ``warmup_steps > total_steps`` is
  refused (with the internal schedule on), since the warm-up would outlast the run.
* The noise is approximately Gaussian (above), counter-based instead of the global RNG.
* Everything a resume needs (moments, velocity, slow weights, SWA average and counts, mode,
  fast weights in eval mode, step counts) is in ``state_dict()``; upstream loses SWA.
* Moments and averages follow the parameter dtype (as torch's Adam); the arithmetic runs in
  float32 (float64 for float64 parameters) and is rounded once when stored.
* Upstream names are accepted: ``beta1``/``beta2`` (for ``betas``), ``mu`` (``momentum``),
  ``wd`` (``weight_decay``), ``k`` (``lookahead_k``) and ``alpha``, upstream's weight of the
  *slow* weights: ``lookahead_alpha = 1 - alpha`` (Lookahead's step towards the fast weights,
  as in the paper; both are 0.5 by default). The second positional argument is
  ``total_steps``, as in upstream v2. Giving an upstream name and its readable name together is
  an error.
* ``zero_grad`` is torch's (upstream overrides it without ``set_to_none``); sparse gradients
  and complex parameters raise a clear error.

What the training loop must provide
-----------------------------------
``total_steps`` and ``warmup_steps`` count optimizer steps (after gradient accumulation). An
external learning-rate scheduler multiplies onto the internal schedule: use a constant
scheduler, or ``schedule=False`` to let the external one rule alone (a scheduler that changes
``lr`` while the internal schedule is on gets one warning). Gradient clipping by norm
is compatible (AMaC additionally clamps its normalised update elementwise). Call ``eval()``
before evaluating and ``train()`` before the next training step (the HF Trainer does both).
Batch-norm statistics need recomputing after SWA weights are written
(``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_betas, check_choice, check_flag, check_range
from ._kernels import kernel
from ._reduce import (
    accumulation_dtype,
    counts,
    finish_sums,
    is_sharded,
    local,
    reduction_group,
)

__all__ = ["AMaC", "lr_factor", "anneal_factor"]


# -- defaults that remember they were not given (so an alias beside them is detected) ------
class _DefaultFloat(float):
    pass


class _DefaultInt(int):
    pass


class _DefaultTuple(tuple):
    pass


def _given(value: Any) -> bool:
    return not isinstance(value, (_DefaultFloat, _DefaultInt, _DefaultTuple))


def _plain(value: Any) -> Any:
    """Strip the default marker: state_dict() must hold plain Python types."""
    if isinstance(value, _DefaultTuple):
        return tuple(value)
    if isinstance(value, _DefaultFloat):
        return float(value)
    if isinstance(value, _DefaultInt):
        return int(value)
    return value


# -- argument checks ---------------------------------------------------------------------
def _check_int(name: str, value: Any, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {low}{none}, got {value!r}")


def _check_total_steps(name: str, value: Any) -> None:
    if isinstance(value, float):
        raise ValueError(
            f"{name} must be an integer >= 1 or None, got {value!r} (the second positional "
            "argument is total_steps, as in upstream AMaC v2; give lr=... by keyword)"
        )
    _check_int(name, value, 1, allow_none=True)


def _check_clip(name: str, value: Any) -> None:
    if value is not None:
        check_range(name, value, 0.0, low_open=True)


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "lr": lambda n, v: check_range(n, v, 0.0),
    "betas": lambda n, v: check_betas(n, v),
    "eps": lambda n, v: check_range(n, v, 0.0, low_open=True),
    "weight_decay": lambda n, v: check_range(n, v, 0.0),
    "momentum": lambda n, v: check_range(n, v, 0.0, 1.0, high_open=True),
    "noise_factor": lambda n, v: check_range(n, v, 0.0),
    "clip_value": _check_clip,
    "warmup_steps": lambda n, v: _check_int(n, v, 0),
    "total_steps": _check_total_steps,
    "min_lr_ratio": lambda n, v: check_range(n, v, 0.0, 1.0),
    "lookahead_k": lambda n, v: _check_int(n, v, 1),
    "lookahead_alpha": lambda n, v: check_range(n, v, 0.0, 1.0, low_open=True),
    "swa_start": lambda n, v: _check_int(n, v, 0, allow_none=True),
    "seed": lambda n, v: _check_int(n, v, 0),
    "eval_weights": lambda n, v: check_choice(n, v, ("averaged", "fast")),
    "schedule": check_flag,
    "cosine": check_flag,
    "centralize_gradients": check_flag,
    "bias_correction": check_flag,
    "dynamic_weight_decay": check_flag,
    "lookahead": check_flag,
    "swa": check_flag,
}

# upstream name -> readable name (beta1/beta2 fold into betas; alpha is converted)
_ALIASES = {
    "beta1": "betas",
    "beta2": "betas",
    "mu": "momentum",
    "wd": "weight_decay",
    "k": "lookahead_k",
    "alpha": "lookahead_alpha",
}


def _resolve_aliases(options: dict[str, Any], given: set[str], aliases: dict[str, Any]) -> None:
    """Fold upstream names (``aliases``, only those given) into ``options`` in place."""
    for alias, value in aliases.items():
        readable = _ALIASES[alias]
        if readable in given:
            raise ValueError(
                f"give either {alias!r} (upstream AMaC's name) or {readable!r}, not both"
            )
        if alias in ("beta1", "beta2"):
            check_range(alias, value, 0.0, 1.0, high_open=True)
            betas = list(options["betas"])
            betas[0 if alias == "beta1" else 1] = value
            options["betas"] = tuple(betas)
        elif alias == "alpha":
            # upstream's alpha weighs the slow weights; alpha = 1 would freeze them
            check_range(alias, value, 0.0, 1.0, high_open=True)
            options["lookahead_alpha"] = 1.0 - value
        else:
            _CHECKS[readable](alias, value)
            options[readable] = value


def _check_lengths(group: dict[str, Any], total_steps: int | None) -> None:
    """The internal warm-up must end within the run."""
    warmup_steps = group["warmup_steps"]
    if group["schedule"] and total_steps is not None and warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps}): the "
            "warm-up would still be raising the learning rate when the run ends. Give a "
            "shorter warmup_steps (e.g. a few percent of total_steps) or warmup_steps=0."
        )


# -- the schedule: a pure function of the group's step count -------------------------------
def _schedule(step: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(multiplier of ``lr``, annealing factor of noise and weight decay) at ``step``
    (1-based, a tensor): linear warm-up, then a cosine from 1 to ``min_lr_ratio`` reached at
    ``total_steps`` and held; the annealing goes linearly from 1 to 0 at ``total_steps``."""
    warmup, total = group["warmup_steps"], group["total_steps"]
    one = torch.ones_like(step)
    factor = one
    if group["schedule"]:
        if group["cosine"] and total is not None:
            progress = ((step - warmup) / max(total - warmup, 1)).clamp(0.0, 1.0)
            floor = group["min_lr_ratio"]
            factor = floor + (1.0 - floor) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        if warmup > 0:
            factor = torch.where(step < warmup, step / warmup, factor)
    anneal = one if total is None else (1.0 - step / total).clamp(min=0.0)
    return factor, anneal


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int | None,
    cosine: bool = True,
    min_lr_ratio: float = 0.0,
    schedule: bool = True,
) -> float:
    """Multiplier of ``lr`` at ``step`` (1-based), as the optimizer computes it."""
    group = {
        "warmup_steps": warmup_steps,
        "total_steps": total_steps,
        "cosine": cosine,
        "min_lr_ratio": min_lr_ratio,
        "schedule": schedule,
    }
    return float(_schedule(torch.tensor(float(step), dtype=torch.float64), group)[0])


def anneal_factor(step: int, total_steps: int | None) -> float:
    """Linear annealing of noise and weight decay, from 1 to 0 at ``total_steps``."""
    group = {"warmup_steps": 0, "total_steps": total_steps, "cosine": False, "schedule": False}
    return float(_schedule(torch.tensor(float(step), dtype=torch.float64), group)[1])


# -- noise: a counter-based generator written with int32 tensor ops -------------------------
# Every value is a pure function of (seed, group index, parameter index, step, the element's
# position in the whole tensor), computed inside the kernel: nothing to save, the same on every
# replica and under any sharding. int32 lanes wrap on multiplication (two's complement), as
# inductor's C++ and Triton code and torch's CPU and CUDA kernels all do.
def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int32 lanes (``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (C. Wellons' "lowbias32": xor-shift-multiply)."""
    x = x ^ _shift_right(x, 16)
    x = x * 0x7FEB352D
    x = x ^ _shift_right(x, 15)
    x = x * (0x846CA68B - (1 << 32))  # the 32-bit constant as a signed int32
    return x ^ _shift_right(x, 16)


# z (c0 + c1 z^2 + c2 z^4) maps the standardised sum of four uniforms (Irwin-Hall, n=4) to
# within 2.7e-4 of the normal distribution function (the largest difference between the two
# CDFs), with unit variance kept exactly; fitted numerically (see docs/amac.md).
_NORMAL_FIT = (0.963794726776335, 0.008282182438647746, 0.0012166848928791465)

# columns of the per-tensor noise key: two round keys, an odd multiplier, the global position
# of the piece's first element, and the global row length (for pieces that are 2-D boxes)
_KEY1, _KEY2, _MULTIPLIER, _OFFSET, _ROW_LENGTH = range(5)


def _standard_normal(positions: Tensor, key: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Approximately N(0, 1) noise at int32 ``positions``, keyed by ``key`` (one tensor's row
    of :func:`_noise_keys`): two hash rounds give four 16-bit uniforms, whose standardised sum
    goes through the fitted odd polynomial ``_NORMAL_FIT``."""
    first = _mix32((positions ^ key[_KEY1]) * key[_MULTIPLIER])
    second = _mix32(first ^ key[_KEY2])
    total = (first & 0xFFFF) + _shift_right(first, 16) + (second & 0xFFFF)
    total = total + _shift_right(second, 16)
    z = ((total.to(dtype) + 2.0) * 2.0**-16 - 2.0) * math.sqrt(3.0)
    z2 = z * z
    c0, c1, c2 = _NORMAL_FIT
    return z * (c0 + z2 * (c1 + z2 * c2))


def _noise_keys(
    seed: int,
    group_index: int,
    indices: list[int],
    layouts: list[tuple[int, int]],
    step: Tensor,
    device: torch.device,
) -> Tensor:
    """One int32 row per parameter (columns ``_KEY1`` ... ``_ROW_LENGTH``) for this step.

    ``indices`` are the parameters' positions in their group; ``layouts`` their (global offset
    of the local piece's first element, global row length)."""
    index = torch.tensor(indices, dtype=torch.int32, device=device)
    stream = _mix32(index ^ (seed & 0x7FFFFFFF))
    stream = _mix32(stream ^ ((seed >> 31) & 0x7FFFFFFF))
    stream = _mix32(stream ^ (group_index & 0x7FFFFFFF))
    step_key = _mix32(_mix32(step.to(torch.int32)) ^ 0x2545F491)
    key1 = _mix32(stream ^ step_key)
    key2 = _mix32(key1 ^ 0x5BD1E995)
    multiplier = _mix32(key2 ^ 0x68E31DA4) | 1
    placement = torch.tensor(
        [[_as_int32(offset), _as_int32(row)] for offset, row in layouts],
        dtype=torch.int32,
        device=device,
    ).reshape(-1, 2)
    return torch.cat([torch.stack([key1, key2, multiplier], dim=1), placement], dim=1)


def _as_int32(value: int) -> int:
    """``value`` modulo 2**32 as a signed int32 (positions past 2**31 wrap, as in the kernel)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# -- the kernels ------------------------------------------------------------------------------
# Entries of the per-group coefficient vector (one tensor, so each kernel call takes few
# arguments); computed on the device from the group's step count.
(
    _LR,
    _BETA1,
    _BETA2,
    _EPS,
    _INV_BIAS1,
    _INV_SQRT_BIAS2,
    _DECAY,
    _MOMENTUM,
    _NOISE_STD,
    _CLIP,
    _OK,
    _SYNC,
    _ALPHA,
    _SWA_EVENT,
) = range(14)


def _adam_noise_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    velocity: Tensor | None,
    slow_weights: Tensor | None,
    swa_average: Tensor | None,
    swa_samples: Tensor | None,
    positions: Tensor | None,
    c: tuple[Tensor, ...],
    key: tuple[Tensor, ...],
) -> None:
    """The update of one tensor from its (centralized) gradient ``grad``, computed in ``c``'s
    dtype: Adam's moments and normalised step, noise (at ``positions``; ``None``: no noise),
    clipping (to +-inf when off), decoupled decay, heavy-ball momentum, then Lookahead and SWA
    where their tensors are given (the caller adds ``c[_SWA_EVENT]`` to ``swa_samples``).
    Everything stays as it was unless ``c[_OK]`` (a step skipped by skip_nonfinite)."""
    dtype = c[_LR].dtype
    m = exp_avg.to(dtype)
    v = exp_avg_sq.to(dtype)
    m_new = m + (1.0 - c[_BETA1]) * (grad - m)
    v_new = c[_BETA2] * v + (1.0 - c[_BETA2]) * grad * grad
    direction = (m_new * c[_INV_BIAS1]) / (v_new.sqrt() * c[_INV_SQRT_BIAS2] + c[_EPS])
    if positions is not None:
        direction = direction + c[_NOISE_STD] * _standard_normal(positions, key, dtype)
    direction = torch.clamp(direction, -c[_CLIP], c[_CLIP])
    p = param.to(dtype)
    ok = c[_OK] > 0
    if velocity is None:
        p_new = p * c[_DECAY] - c[_LR] * direction
    else:
        u = velocity.to(dtype)
        u_new = c[_MOMENTUM] * u + c[_LR] * direction
        p_new = p * c[_DECAY] - u_new
        velocity.copy_(torch.where(ok, u_new, u))
    m_new, v_new = torch.where(ok, m_new, m), torch.where(ok, v_new, v)
    p_new = torch.where(ok, p_new, p)
    exp_avg.copy_(m_new)
    exp_avg_sq.copy_(v_new)
    # Lookahead, every k steps: the slow weights step towards the fast ones, which are reset to
    # them. Then SWA, every k steps from swa_start: a uniform running average. c[_SYNC] and
    # c[_SWA_EVENT] are 0 on other steps (and on skipped ones), where both leave all as it was.
    if slow_weights is not None:
        sync = c[_SYNC] > 0
        slow = slow_weights.to(dtype)
        slow_new = torch.where(sync, slow + c[_ALPHA] * (p_new - slow), slow)
        p_new = torch.where(sync, slow_new, p_new)
        slow_weights.copy_(slow_new)
    if swa_average is not None and swa_samples is not None:
        event = c[_SWA_EVENT] > 0
        average = swa_average.to(dtype)
        weight = 1.0 / (swa_samples.to(dtype) + 1.0)
        swa_average.copy_(torch.where(event, average + weight * (p_new - average), average))
    param.copy_(p_new)


@kernel
def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    velocity: Tensor | None,
    slow_weights: Tensor | None,
    swa_average: Tensor | None,
    swa_samples: Tensor | None,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    inv_bias1: Tensor,
    inv_sqrt_bias2: Tensor,
    decay: Tensor,
    momentum: Tensor,
    noise_std: Tensor,
    clip: Tensor,
    ok: Tensor,
    sync: Tensor,
    alpha: Tensor,
    swa_event: Tensor,
    key1: Tensor | None,
    key2: Tensor | None,
    multiplier: Tensor | None,
    offset: Tensor | None,
    row_length: Tensor | None,
    noise: bool,
) -> None:
    """A tensor that is not centralized and is one contiguous run of the global flattening.
    The scalars are this step's coefficients (``_coefficient_args``)."""
    c = (lr, beta1, beta2, eps, inv_bias1, inv_sqrt_bias2, decay, momentum, noise_std, clip, ok)
    c += (sync, alpha, swa_event)
    key = (key1, key2, multiplier, offset, row_length)
    positions = None
    if noise:
        local_index = torch.arange(param.numel(), dtype=torch.int32, device=param.device)
        positions = key[_OFFSET] + local_index
    _adam_noise_update(
        param,
        grad.to(lr.dtype),
        exp_avg,
        exp_avg_sq,
        velocity,
        slow_weights,
        swa_average,
        swa_samples,
        positions,
        c,
        key,
    )


@kernel(flatten=False)
def _update_rows(
    param: Tensor,
    grad: Tensor,
    row_mean: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    velocity: Tensor | None,
    slow_weights: Tensor | None,
    swa_average: Tensor | None,
    swa_samples: Tensor | None,
    lr: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    inv_bias1: Tensor,
    inv_sqrt_bias2: Tensor,
    decay: Tensor,
    momentum: Tensor,
    noise_std: Tensor,
    clip: Tensor,
    ok: Tensor,
    sync: Tensor,
    alpha: Tensor,
    swa_event: Tensor,
    key1: Tensor | None,
    key2: Tensor | None,
    multiplier: Tensor | None,
    offset: Tensor | None,
    row_length: Tensor | None,
    noise: bool,
) -> None:
    """A tensor seen as a 2-D box (rows: output channels) of the global (rows, row length)
    matrix: gradient centralization (``row_mean``, shape (rows, 1); ``None``: none), and the
    noise positions of a box whose rows may be pieces of the global rows."""
    c = (lr, beta1, beta2, eps, inv_bias1, inv_sqrt_bias2, decay, momentum, noise_std, clip, ok)
    c += (sync, alpha, swa_event)
    key = (key1, key2, multiplier, offset, row_length)
    grad = grad.to(lr.dtype)
    if row_mean is not None:
        grad = grad - row_mean
    positions = None
    if noise:
        rows = torch.arange(param.shape[0], dtype=torch.int32, device=param.device)
        columns = torch.arange(param.shape[1], dtype=torch.int32, device=param.device)
        positions = key[_OFFSET] + rows.unsqueeze(1) * key[_ROW_LENGTH] + columns
    _adam_noise_update(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        velocity,
        slow_weights,
        swa_average,
        swa_samples,
        positions,
        c,
        key,
    )


def _kernel_scalars(c: Tensor, key_row: Tensor | None) -> tuple[Tensor | None, ...]:
    """The kernels' 0-d arguments: the coefficient vector's entries and a noise key row's."""
    key = (None,) * 5 if key_row is None else tuple(key_row.unbind())
    return tuple(c.unbind()) + key


def _row_layout(p: Tensor) -> tuple[int, int, int, int, bool]:
    """For a parameter seen as a (rows, row length) matrix (dim 0 by the rest): (global rows,
    global row length, global row of the local piece's first row, global position of its first
    element, whether its rows are pieces of global rows). Raises for layouts whose local piece
    is not a 2-D box of that matrix."""
    shape = tuple(p.shape)
    rows = shape[0] if shape else 1
    row_length = math.prod(shape[1:])
    if not is_sharded(p):
        return rows, row_length, 0, 0, False
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offsets = compute_local_shape_and_global_offset(
        p.shape, p.device_mesh, p.placements
    )
    split = {
        placement.dim
        for placement, size in zip(p.placements, p.device_mesh.shape, strict=True)
        if isinstance(placement, Shard) and size > 1
    }
    if split <= {0}:
        return rows, row_length, offsets[0], offsets[0] * row_length, False
    if len(shape) == 2 and split <= {0, 1}:
        return rows, row_length, offsets[0], offsets[0] * row_length + offsets[1], True
    raise ValueError(
        f"AMaC cannot place a parameter of shape {shape} sharded as {p.placements}: its local "
        "piece is not a block of rows (needed for gradient centralization and for noise keyed "
        "on global positions). Shard such parameters on dimension 0 (FSDP2's default), or turn "
        "centralize_gradients and noise_factor off."
    )


# -- the optimizer -----------------------------------------------------------------------
class AMaC(HFOptimizer):
    """AMaC (see the module docstring for the update and the differences from upstream).

    Args:
        params: parameters or parameter groups. Groups may use upstream's keys (``wd``, ``mu``,
            ``beta1``, ...) as well as the readable ones.
        total_steps: run length in optimizer steps: the cosine reaches its floor and noise and
            weight decay reach zero here. ``None``: no cosine and no annealing until
            :meth:`set_total_steps` is called. Second positional argument, as in upstream v2.
        lr: base learning rate (group key ``lr``, read every step; may be a tensor).
        betas: Adam's moment coefficients (upstream ``beta1``, ``beta2``).
        eps: Adam's denominator term.
        weight_decay: decoupled weight decay (upstream ``wd``), scaled by the scheduled lr.
        momentum: heavy-ball coefficient on the Adam direction (upstream ``mu``); 0 is AdamW.
        noise_factor: standard deviation of the noise added to the normalised update.
        clip_value: elementwise clamp of the normalised update; ``None`` disables it.
        warmup_steps: linear warm-up length in optimizer steps (at most ``total_steps``); 0
            disables warm-up.
        cosine: cosine annealing after warm-up (needs ``total_steps``).
        min_lr_ratio: the cosine's floor as a fraction of ``lr``.
        schedule: apply the internal warm-up and cosine; ``False`` uses ``lr`` as given (for
            an external scheduler).
        centralize_gradients: per-output-channel gradient centralization (ndim >= 2).
        bias_correction: Adam's bias correction of both moments.
        dynamic_weight_decay: anneal weight decay to zero at ``total_steps``; ``False`` keeps
            it constant.
        lookahead: Lookahead on the fast weights.
        lookahead_k: synchronisation period of Lookahead and SWA (upstream ``k``).
        lookahead_alpha: Lookahead's step of the slow weights towards the fast ones
            (upstream ``alpha`` is the weight of the slow ones: ``lookahead_alpha = 1 - alpha``).
        swa: keep a stochastic weight average.
        swa_start: group step from which SWA averages; ``None`` is the end of warm-up.
        eval_weights: what :meth:`eval` puts into the model: ``"averaged"`` (SWA average,
            else Lookahead slow weights) or ``"fast"`` (nothing is swapped).
        seed: seed of the noise; replicas with the same seed make identical steps.
        implementation: ``"auto"`` (compiled kernels where a compiler works), ``"compiled"``
            or ``"eager"`` (the reference).
        skip_nonfinite: skip (leave parameters and state exactly as they are) a step whose
            gradients are not all finite; counted in ``statistics()["skipped_steps/..."]``.
        beta1, beta2, mu, wd, alpha, k: upstream AMaC's names of the arguments above.
    """

    statistic_keys = (
        "effective_lr",
        "noise_std",
        "weight_decay_coefficient",
        "swa_count",
        "skipped_steps",
    )
    group_state_keys = (
        "step",
        "swa_count",
        "skipped_steps",
        "averaged_in_model",
        "effective_lr",
        "noise_std",
        "weight_decay_coefficient",
    )
    counter_state_keys = frozenset({"swa_samples"})
    #: upstream AMaC's argument names and the readable names they stand for (read by the
    #: Hugging Face layer so that an upstream name in optim_args wins over the Trainer's value)
    argument_aliases = dict(_ALIASES)

    def __init__(
        self,
        params: Any,
        total_steps: int | None = None,
        *,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = _DefaultTuple((0.9, 0.999)),
        eps: float = 1e-8,
        weight_decay: float = _DefaultFloat(0.01),
        momentum: float = _DefaultFloat(0.9),
        noise_factor: float = 0.01,
        clip_value: float | None = 1.0,
        warmup_steps: int = 1000,
        cosine: bool = True,
        min_lr_ratio: float = 0.0,
        schedule: bool = True,
        centralize_gradients: bool = True,
        bias_correction: bool = True,
        dynamic_weight_decay: bool = True,
        lookahead: bool = True,
        lookahead_k: int = _DefaultInt(5),
        lookahead_alpha: float = _DefaultFloat(0.5),
        swa: bool = True,
        swa_start: int | None = None,
        eval_weights: str = "averaged",
        seed: int = 0,
        implementation: str = "auto",
        skip_nonfinite: bool = False,
        beta1: float | None = None,
        beta2: float | None = None,
        mu: float | None = None,
        wd: float | None = None,
        alpha: float | None = None,
        k: int | None = None,
    ) -> None:
        options: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "noise_factor": noise_factor,
            "clip_value": clip_value,
            "warmup_steps": warmup_steps,
            "total_steps": total_steps,
            "cosine": cosine,
            "min_lr_ratio": min_lr_ratio,
            "schedule": schedule,
            "centralize_gradients": centralize_gradients,
            "bias_correction": bias_correction,
            "dynamic_weight_decay": dynamic_weight_decay,
            "lookahead": lookahead,
            "lookahead_k": lookahead_k,
            "lookahead_alpha": lookahead_alpha,
            "swa": swa,
            "swa_start": swa_start,
            "eval_weights": eval_weights,
            "seed": seed,
        }
        upstream = {"beta1": beta1, "beta2": beta2, "mu": mu, "wd": wd, "alpha": alpha, "k": k}
        _resolve_aliases(
            options,
            {name for name, value in options.items() if _given(value)},
            {name: value for name, value in upstream.items() if value is not None},
        )
        options = {name: _plain(value) for name, value in options.items()}
        options["implementation"] = implementation
        options["skip_nonfinite"] = skip_nonfinite
        super().__init__(params, options)

    # -- groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        aliases = {name: group.pop(name) for name in _ALIASES if name in group}
        if aliases:
            given = set(group)
            if "betas" not in group and ("beta1" in aliases or "beta2" in aliases):
                group["betas"] = self.defaults["betas"]
            _resolve_aliases(group, given, aliases)
        super().add_param_group(group)
        group = self.param_groups[-1]
        # group-level state, saved with the group; created here (not at the first step) so that
        # torch.distributed.checkpoint's state-initialising step leaves the groups unchanged
        device = self._group_device(group)
        for key in ("step", "swa_count", "skipped_steps"):
            if not isinstance(group.get(key), Tensor):
                group[key] = torch.tensor(float(group.get(key, 0)), device=device)
        for key in ("effective_lr", "noise_std", "weight_decay_coefficient"):
            if not isinstance(group.get(key), Tensor):
                group[key] = torch.zeros((), device=device)
        group.setdefault("averaged_in_model", False)
        if not torch.compiler.is_compiling():
            self._remember_step(group, int(group["step"].item()))

    def _check_group(self, group: dict[str, Any]) -> None:
        for name, check in _CHECKS.items():
            check(name, group[name])
        _check_lengths(group, group["total_steps"])

    @staticmethod
    def _group_device(group: dict[str, Any]) -> torch.device:
        params = group["params"]
        return local(params[0]).device if params else torch.device("cpu")

    def set_total_steps(self, total_steps: int) -> None:
        """Set the run length (optimizer steps) of every group, e.g. from the Trainer's
        ``max_steps`` once it is known."""
        _CHECKS["total_steps"]("total_steps", total_steps)
        for group in self.param_groups:
            _check_lengths(group, total_steps)
        self.defaults["total_steps"] = total_steps
        for group in self.param_groups:
            group["total_steps"] = total_steps

    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        contiguous = torch.contiguous_format
        state["exp_avg"] = torch.zeros_like(p, memory_format=contiguous)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=contiguous)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=contiguous)
        if group["lookahead"]:
            state["slow_weights"] = p.detach().clone(memory_format=contiguous)
        if group["swa"]:
            state["swa_average"] = torch.zeros_like(p, memory_format=contiguous)
            state["swa_samples"] = torch.zeros((), dtype=torch.float32, device=local(p).device)

    # -- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base's, and checkpoints of earlier AMaC versions (Python-number counters,
        SWA averages created at the first SWA event) are brought to today's layout."""
        state_dict = self._upgrade_checkpoint(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            device = self._group_device(group)
            for key in self.group_state_keys:
                value = group.get(key)
                if isinstance(value, Tensor):
                    group[key] = value.to(device=device, dtype=torch.float32, copy=True)
                elif key != "averaged_in_model":
                    group[key] = torch.tensor(float(value or 0), device=device)
        self._remember_all_steps()

    def _check_state_keys(self, group: dict[str, Any], param: Tensor, saved: set[str]) -> None:
        # fast_weights exist only while the averaged weights are in the model (eval mode)
        super()._check_state_keys(group, param, saved - {"fast_weights"})

    def _upgrade_checkpoint(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        saved_groups = state_dict.get("param_groups", [])
        if not any(not isinstance(g.get("step", 0), Tensor) for g in saved_groups):
            return state_dict
        state = dict(state_dict["state"])
        for saved, group in zip(saved_groups, self.param_groups, strict=False):
            if not group["swa"]:
                continue
            for index, p in zip(saved["params"], group["params"], strict=False):
                entries = state.get(index)
                if not entries or "swa_samples" in entries:
                    continue
                entries = dict(entries)
                if "swa_average" in entries:  # one sample per group event, as then counted
                    entries["swa_samples"] = float(saved.get("swa_count", 0))
                else:
                    entries["swa_average"] = torch.zeros_like(p.detach())
                    entries["swa_samples"] = 0.0
                state[index] = entries
        return {**state_dict, "state": state}

    # -- the step -------------------------------------------------------------------------
    def _step(self, loss: Any) -> None:
        if any(group["averaged_in_model"] for group in self.param_groups):
            raise RuntimeError(
                "AMaC.step() was called in eval mode: the model holds the averaged weights. "
                "Call optimizer.train() before the forward pass of a training step."
            )
        work = []  # (group index, group, [(index in group, p)]) for groups with gradients
        for group_index, group in enumerate(self.param_groups):
            chosen = []
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AMaC does not support sparse gradients")
                # an empty entry is no state: DeepSpeed ZeRO reads optimizer.state[partition]
                # (a defaultdict) for every group after stepping the first one
                if not self.state.get(p):
                    self._init_param_state(group, p)
                chosen.append((index, p))
            if chosen:
                work.append((group_index, group, chosen))
                self._warn_about_schedules(group)
        if not work:
            return
        like = local(work[0][2][0][1])
        process_group = reduction_group([p for g in self.param_groups for p in g["params"]])
        skip = self.defaults["skip_nonfinite"]

        # Phase 1: per-channel gradient sums (for centralization) and, with skip_nonfinite, a
        # count of non-finite gradient elements. The sums of channels split across ranks and
        # the count are finished together, in one collective; nothing else needs one. What
        # goes into it depends only on global shapes and placements, never on what this rank's
        # shard holds: every rank issues the same collective (an empty shard adds zeros).
        row_means: dict[tuple[int, int], Tensor] = {}
        split: list[tuple[tuple[int, int], int, int, int, torch.dtype]] = []
        row_sums: list[Tensor] = []
        nonfinite = torch.zeros(1, dtype=torch.float64, device=like.device)
        for group_index, group, chosen in work:
            for index, p in chosen:
                grad = local(p.grad)
                dtype = accumulation_dtype(grad.dtype)
                if self._centralizes(group, p):
                    rows, row_length, first_row, _, rows_split = _row_layout(p)
                    sums = grad.flatten(1).sum(dim=1, dtype=dtype)
                    if rows_split:  # place the local rows' partial sums among the global rows
                        whole = sums.new_zeros(rows)
                        if counts(p, process_group):
                            whole[first_row : first_row + sums.numel()] = sums
                        entry = ((group_index, index), first_row, sums.numel(), row_length, dtype)
                        split.append(entry)
                        row_sums.append(whole.to(like.device, torch.float64))
                    else:
                        row_means[group_index, index] = (sums / row_length).unsqueeze(1)
                    checked = sums  # a non-finite element makes its channel's sum non-finite
                else:
                    checked = grad
                if skip:
                    count = (~torch.isfinite(checked)).sum(dtype=torch.float64)
                    nonfinite = nonfinite + count.to(like.device)
        if skip and loss is not None:
            count = (~torch.isfinite(self._loss_tensor(loss, like))).to(torch.float64)
            nonfinite = nonfinite + count
        ok = torch.ones((), dtype=torch.float32, device=like.device)
        if row_sums or skip:
            partials = torch.cat(row_sums + ([nonfinite] if skip else []))
            totals = finish_sums(partials, process_group)
            start = 0
            for (key, first_row, count, row_length, dtype), whole in zip(
                split, row_sums, strict=True
            ):
                local_sums = totals[start + first_row : start + first_row + count]
                row_means[key] = (local_sums / row_length).to(dtype).unsqueeze(1)
                start += whole.numel()
            if skip:
                ok = (totals[start] == 0).to(torch.float32)

        # Phase 2: the update, then Lookahead and SWA, tensor by tensor.
        for group_index, group, chosen in work:
            self._update_group(group_index, group, chosen, row_means, ok, skip)

    def _centralizes(self, group: dict[str, Any], p: Tensor) -> bool:
        """Gradient centralization applies to tensors of 2+ dimensions whose output channels
        have more than one element (centring a one-element channel would zero its gradient)."""
        # from the global shape: indexing a DTensor (p[0]) would be a collective, issued only by
        # the ranks that reach this line
        return group["centralize_gradients"] and p.dim() >= 2 and math.prod(p.shape[1:]) > 1

    def _warn_about_schedules(self, group: dict[str, Any]) -> None:
        if group["total_steps"] is None and (
            (group["schedule"] and group["cosine"])
            or group["noise_factor"] > 0
            or (group["dynamic_weight_decay"] and group["weight_decay"] > 0)
        ):
            self._warn_once(
                "total_steps",
                "AMaC has no total_steps: the learning rate stays at lr after warm-up and "
                "noise and weight decay do not anneal. Pass total_steps=... or call "
                "set_total_steps(n) (hf_optim.Trainer does).",
            )
        initial = group.get("initial_lr")
        lr = group["lr"]
        if (
            group["schedule"]
            and initial is not None
            and not isinstance(lr, Tensor)
            and not isinstance(initial, Tensor)
            and lr != initial
        ):
            self._warn_once(
                "scheduler",
                "AMaC runs its own warm-up and cosine schedule, and a learning-rate scheduler "
                "is changing lr as well: the two multiply. Use a constant scheduler, or "
                "AMaC(..., schedule=False) to let your scheduler alone drive the learning rate.",
            )

    def _coefficients(
        self, group: dict[str, Any], like: Tensor, ok: Tensor
    ) -> tuple[Tensor, Tensor]:
        """This step's coefficient vector (``_LR`` ... ``_SWA_EVENT``) in ``like``'s
        accumulation dtype, computed on the device from the group's step count, and the
        weight decay rate (for the statistics)."""
        dtype = accumulation_dtype(like.dtype)
        step = (group["step"].to(like.device) + 1).to(dtype)
        factor, anneal = _schedule(step, group)
        lr = self._scalar(group, "lr", like) * factor
        decay_rate = self._scalar(group, "weight_decay", like)
        if group["dynamic_weight_decay"]:
            decay_rate = decay_rate * anneal
        beta1, beta2 = group["betas"]
        if group["bias_correction"]:
            inv_bias1 = 1.0 / (1.0 - torch.pow(beta1, step))
            inv_sqrt_bias2 = torch.rsqrt(1.0 - torch.pow(beta2, step))
        else:
            inv_bias1 = inv_sqrt_bias2 = torch.ones_like(step)
        k = group["lookahead_k"]
        sync = (torch.remainder(step, k) == 0).to(dtype) * ok.to(dtype)
        swa_start = group["swa_start"]
        swa_start = group["warmup_steps"] if swa_start is None else swa_start
        swa_event = sync * (step >= swa_start).to(dtype) if group["swa"] else torch.zeros_like(sync)
        clip = group["clip_value"]
        values = [
            lr,
            step.new_full((), beta1),
            step.new_full((), beta2),
            self._scalar(group, "eps", like),
            inv_bias1,
            inv_sqrt_bias2,
            1.0 - lr * decay_rate,
            self._scalar(group, "momentum", like),
            self._scalar(group, "noise_factor", like) * anneal,
            step.new_full((), math.inf if clip is None else clip),
            ok.to(dtype),
            sync,
            self._scalar(group, "lookahead_alpha", like),
            swa_event,
        ]
        return torch.stack([v.to(dtype).reshape(()) for v in values]), decay_rate

    def _update_group(
        self,
        group_index: int,
        group: dict[str, Any],
        chosen: list[tuple[int, Tensor]],
        row_means: dict[tuple[int, int], Tensor],
        ok: Tensor,
        guarded: bool,
    ) -> None:
        like = local(chosen[0][1])
        known_step = self._known_step(group)
        if group["step"].device != like.device:
            for key in ("step", "swa_count", "skipped_steps"):
                group[key] = group[key].to(like.device)
            if known_step is not None:
                self._remember_step(group, known_step)
        # Lookahead and SWA act every k steps. Whether this step is one is decided on the device
        # (c[_SYNC]); when the step count is also known on the host, the steps in between skip
        # reading and writing the slow weights and the average altogether.
        averaging = (group["lookahead"] or group["swa"]) and (
            known_step is None or (known_step + 1) % group["lookahead_k"] == 0
        )
        noise = group["noise_factor"] > 0
        live = [(index, p) for index, p in chosen if local(p).numel() > 0]
        layouts = [
            _row_layout(p) if noise or (group_index, index) in row_means else None
            for index, p in live
        ]
        keys = None
        if noise and live:
            keys = _noise_keys(
                group["seed"],
                group_index,
                [index for index, _ in live],
                [(layout[3], layout[1]) for layout in layouts],
                group["step"] + 1,
                like.device,
            )
        coefficients: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        flat_items: list[tuple[Any, ...]] = []
        row_items: list[tuple[Any, ...]] = []
        copies_back: list[tuple[Tensor, Tensor]] = []
        counted: list[tuple[Tensor, Tensor]] = []
        compiled = self._compiled(like)
        for row, ((index, p), layout) in enumerate(zip(live, layouts, strict=True)):
            state = self.state[p]
            param = local(p)
            dtype = accumulation_dtype(param.dtype)
            if dtype not in coefficients:
                coefficients[dtype] = self._coefficients(group, param, ok)
            c = coefficients[dtype][0]
            scalars = _kernel_scalars(c, None if keys is None else keys[row])
            # kernels write through views: a non-contiguous parameter is updated in a copy
            target = param if param.is_contiguous() else param.contiguous()
            if target is not param:
                copies_back.append((param, target))
            grad = local(p.grad)
            velocity = state.get("momentum_buffer")
            slow = average = samples = None
            if averaging:  # else this step neither synchronises nor averages (known on the host)
                slow, average = state.get("slow_weights"), state.get("swa_average")
                samples = state.get("swa_samples")
                if samples is not None:
                    counted.append((samples, c[_SWA_EVENT]))
            tensors = (state["exp_avg"], state["exp_avg_sq"], velocity, slow, average)
            row_mean = row_means.get((group_index, index))
            if row_mean is not None or (noise and layout[4]):
                shape = (target.shape[0], -1)
                views = [None if t is None else local(t).view(shape) for t in tensors]
                row_items.append(
                    (target.view(shape), grad.reshape(shape), row_mean, *views, samples)
                    + scalars
                    + (noise,)
                )
            else:
                views = [None if t is None else local(t).view(-1) for t in tensors]
                flat_items.append(
                    (target.view(-1), grad.reshape(-1), *views, samples) + scalars + (noise,)
                )
        _update.map(flat_items, compiled=compiled)
        _update_rows.map(row_items, compiled=compiled)
        for param, target in copies_back:
            param.copy_(target)
        for samples, event in counted:
            samples.add_(event.to(samples.dtype))
        # the group's counters and statistics: 0-d tensors, updated in place
        if not coefficients:
            coefficients[torch.float32] = self._coefficients(group, like, ok)
        c, decay_rate = next(iter(coefficients.values()))
        group["step"].add_(ok)
        if known_step is not None and not guarded:  # (with skip_nonfinite ok is not known)
            self._remember_step(group, known_step + 1)
        group["swa_count"].add_(c[_SWA_EVENT].to(torch.float32))
        group["skipped_steps"].add_(1.0 - ok)
        # a skipped step leaves the statistics of the last step taken
        for key, value in (
            ("effective_lr", c[_LR]),
            ("noise_std", c[_NOISE_STD]),
            ("weight_decay_coefficient", decay_rate),
        ):
            group[key].copy_(torch.where(ok > 0, value, group[key]))

    # -- the step count as known on the host --------------------------------------------------
    def _reset_transient(self) -> None:
        super()._reset_transient()
        # id(group) -> (the group's step tensor, its version counter, its value): the value is
        # trusted only while the tensor is the same object, unmodified since (a compiled step,
        # a load or a user's edit changes the version); otherwise the device decides alone
        self._known_steps: dict[int, tuple[Tensor, int, int]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._remember_all_steps()

    def _remember_all_steps(self) -> None:
        """Read every group's step count (outside step(): after a load or a copy)."""
        for group in self.param_groups:
            if isinstance(group.get("step"), Tensor):
                self._remember_step(group, int(group["step"].item()))

    def _remember_step(self, group: dict[str, Any], value: int) -> None:
        step = group["step"]
        self._known_steps[id(group)] = (step, step._version, value)

    def _known_step(self, group: dict[str, Any]) -> int | None:
        if torch.compiler.is_compiling():
            return None
        entry = self._known_steps.get(id(group))
        if entry is None:
            return None
        tensor, version, value = entry
        step = group["step"]
        return value if tensor is step and step._version == version else None

    # -- averaged weights -------------------------------------------------------------------
    @staticmethod
    def _averaged(group: dict[str, Any], state: dict[str, Any], p: Tensor) -> Tensor | None:
        """The weights eval() shows: the SWA average once it has a sample, else the Lookahead
        slow weights (else the fast weights themselves); chosen on the device."""
        fallback = state.get("slow_weights") if group["lookahead"] else None
        if group["swa"] and "swa_average" in state:
            has_sample = state["swa_samples"] > 0
            other = p.detach() if fallback is None else fallback
            return torch.where(has_sample.to(local(p).device), state["swa_average"], other)
        return fallback

    @torch.no_grad()
    def eval(self) -> None:
        """Swap the averaged weights into the model, keeping the fast weights aside.

        Idempotent. Parameters without averaged weights yet keep their fast weights.
        """
        for group in self.param_groups:
            if group["averaged_in_model"]:
                continue
            group["averaged_in_model"] = True
            if group["eval_weights"] == "fast":
                continue
            for p in group["params"]:
                state = self.state.get(p)
                averaged = self._averaged(group, state, p) if state else None
                if averaged is not None:
                    state["fast_weights"] = p.detach().clone(memory_format=torch.contiguous_format)
                    p.copy_(averaged)

    @torch.no_grad()
    def train(self) -> None:
        """Swap the fast weights back into the model. Costs one flag read per group when the
        optimizer is already in train mode."""
        for group in self.param_groups:
            if not group["averaged_in_model"]:
                continue
            group["averaged_in_model"] = False
            for p in group["params"]:
                state = self.state.get(p)
                fast = state.pop("fast_weights", None) if state else None
                if fast is not None:
                    p.copy_(fast)

    @torch.no_grad()
    def write_averaged_weights(self) -> None:
        """Write the averaged weights (SWA average, else Lookahead slow weights) into the model
        for export, whatever the mode; the fast weights are dropped and the optimizer is left in
        train mode. Meant for the end of training. Recompute batch-norm statistics afterwards."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                state.pop("fast_weights", None)
                averaged = self._averaged(group, state, p)
                if averaged is not None:
                    p.copy_(averaged)
            group["averaged_in_model"] = False

    def swap_swa_weights(self) -> None:
        """Upstream's name of :meth:`write_averaged_weights`."""
        self.write_averaged_weights()
