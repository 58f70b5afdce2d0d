r"""AMaC: Adam with warm-up and cosine annealing, gradient centralization, annealed noise
injection, update clipping, dynamic weight decay, heavy-ball momentum, Lookahead and SWA.

Original code: ``godsonj64/AMaC-Optimizer`` (``AMaC_optimizer.py`` and ``AMaC_v.2.py``, 2024),
described only by its README (the seed document). There is no paper; the components are
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

Noise
-----
Noise is counter-based: the noise of parameter ``i`` of group ``j`` at the group's step ``t``
is drawn from a generator freshly seeded with a 64-bit mix of ``(seed, j, i, t)``. So the noise
is a pure function of state that is already saved (``seed`` and ``step`` are Python ints in the
group), a resumed run continues the same noise sequence, replicas with the same seed draw the
same noise, and ``state_dict()`` holds no generator state at all (weights_only loads and CUDA
need nothing special). Seeding a generator is a host-side operation (no synchronisation). The
generators themselves are a per-device, per-thread cache, not state.

torch.compile cannot trace a seeded generator, so under compilation the draw is one opaque
custom op (``hf_optim::amac_scale_and_add_noise_``) and a step traces without a graph break.
The step count and seeds are Python ints, so a compiled step specialises on them: compiling
``step()`` across steps is not a supported mode (see docs/amac.md); the step runs eagerly.

Noise is added to the normalised update, so in parameter space it scales with
:math:`\gamma_t` and vanishes with ``lr=0``: a step with ``lr=0`` from a fresh state (what
torch.distributed.checkpoint runs to initialise state) leaves the parameters unchanged. (A
velocity built up earlier still coasts at ``lr=0``, and a Lookahead synchronisation still
moves the fast weights to the slow ones.)

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
  two or more dimensions, on a copy. Upstream removes the whole-tensor mean from every tensor,
  so one-element parameters never learn, and it overwrites ``p.grad``. The mean is a
  per-tensor reduction (accumulated in float32 or wider); under sharding (FSDP flat shards,
  DTensors) a per-channel mean would need its partial sums finished through
  ``hf_optim/_reduce.py`` and is not done here: 1-D shards are not centralized.
* SWA honours ``swa_start`` (``None`` means the end of warm-up, which is what upstream
  effectively does) and is a uniform running average of every parameter of every group, one
  count per group, updated every ``lookahead_k`` steps. Upstream counts once per parameter,
  so its average is not uniform, crashes with two groups of different shapes, and keeps the
  average outside ``state_dict()``. A parameter without a gradient at an SWA event is skipped
  (left untouched); one that joins late starts its average from its weights at its first event.
* Counters are per group, not per parameter: warm-up, cosine, bias correction, Lookahead and
  SWA stay in phase for parameters that miss gradients. A parameter that joins late therefore
  gets the group's bias correction, as if it had seen zero gradients before.
* ``lr`` and ``weight_decay`` are group keys read every step (upstream caches ``lr/W`` at the
  first step, which freezes training when an external warm-up starts at 0, and reads ``wd``).
* ``warmup_steps=0`` works (upstream divides by zero).
* Everything a resume needs (moments, velocity, slow weights, SWA average and count, mode,
  fast weights in eval mode) is in ``state_dict()``; upstream loses SWA.
* Upstream names are accepted: ``beta1``/``beta2`` (for ``betas``), ``mu`` (``momentum``),
  ``wd`` (``weight_decay``), ``k`` (``lookahead_k``) and ``alpha``, upstream's weight of the
  *slow* weights: ``lookahead_alpha = 1 - alpha`` (Lookahead's step towards the fast weights,
  as in the paper; both are 0.5 by default). The second positional argument is
  ``total_steps``, as in upstream v2. Giving an upstream name and its readable name together is
  an error.
* ``zero_grad`` is torch's (upstream overrides it without ``set_to_none``); sparse gradients
  raise a clear error.

What the training loop must provide
-----------------------------------
``total_steps`` and ``warmup_steps`` count optimizer steps (after gradient accumulation). An
external learning-rate scheduler multiplies onto the internal schedule: use a constant
scheduler, or ``schedule=False`` to let the external one rule alone. Gradient clipping by norm
is compatible (AMaC additionally clamps its normalised update elementwise). Call ``eval()``
before evaluating and ``train()`` before the next training step (the HF Trainer does both).
Batch-norm statistics need recomputing after SWA weights are written
(``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_betas, check_choice, check_range
from ._reduce import accumulation_dtype

__all__ = ["AMaC"]


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


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_clip(name: str, value: Any) -> None:
    if value is not None:
        check_range(name, value, 0.0, math.inf, low_open=True)


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "lr": lambda n, v: check_range(n, v, 0.0),
    "betas": lambda n, v: check_betas(n, v),
    "eps": lambda n, v: check_range(n, v, 0.0, low_open=True),
    "weight_decay": lambda n, v: check_range(n, v, 0.0),
    "momentum": lambda n, v: check_range(n, v, 0.0, 1.0, high_open=True),
    "noise_factor": lambda n, v: check_range(n, v, 0.0),
    "clip_value": _check_clip,
    "warmup_steps": lambda n, v: _check_int(n, v, 0),
    "total_steps": lambda n, v: _check_int(n, v, 1, allow_none=True),
    "min_lr_ratio": lambda n, v: check_range(n, v, 0.0, 1.0),
    "lookahead_k": lambda n, v: _check_int(n, v, 1),
    "lookahead_alpha": lambda n, v: check_range(n, v, 0.0, 1.0, low_open=True),
    "swa_start": lambda n, v: _check_int(n, v, 0, allow_none=True),
    "seed": lambda n, v: _check_int(n, v, 0),
    "eval_weights": lambda n, v: check_choice(n, v, ("averaged", "fast")),
    "schedule": _check_flag,
    "cosine": _check_flag,
    "centralize_gradients": _check_flag,
    "bias_correction": _check_flag,
    "dynamic_weight_decay": _check_flag,
    "lookahead": _check_flag,
    "swa": _check_flag,
}

# upstream name -> readable name (beta1/beta2 fold into betas; alpha is converted)
_ALIASES = {"mu": "momentum", "wd": "weight_decay", "k": "lookahead_k", "alpha": "lookahead_alpha"}


def _resolve_aliases(options: dict[str, Any], given: set[str], aliases: dict[str, Any]) -> None:
    """Fold upstream names (``aliases``, only those given) into ``options`` in place."""
    for alias, value in aliases.items():
        readable = "betas" if alias in ("beta1", "beta2") else _ALIASES[alias]
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


# -- the schedule (pure functions of the group's step count) ------------------------------
def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int | None,
    cosine: bool = True,
    min_lr_ratio: float = 0.0,
    schedule: bool = True,
) -> float:
    """Multiplier of ``lr`` at ``step`` (1-based): linear warm-up, then a cosine from 1 to
    ``min_lr_ratio`` reached at ``total_steps`` and held afterwards."""
    if not schedule:
        return 1.0
    if step < warmup_steps:
        return step / warmup_steps
    if not cosine or total_steps is None:
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def anneal_factor(step: int, total_steps: int | None) -> float:
    """Linear annealing of noise and weight decay, from 1 to 0 at ``total_steps``."""
    if total_steps is None:
        return 1.0
    return max(0.0, 1.0 - step / total_steps)


# -- counter-based noise seeds --------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, group_index: int, param_index: int, step: int) -> int:
    """The 63-bit seed of one parameter's noise at one step (a pure function)."""
    mixed = _splitmix64(seed)
    for value in (group_index, param_index, step):
        mixed = _splitmix64(mixed ^ value)
    return mixed >> 1


# Large CPU tensors get their noise drawn and used block by block, so that the noise never
# leaves the cache. torch's CPU normal_ draws in runs of 16, so blocks that are multiples of 16
# (and a last block of at least 16) give exactly the values of one draw over the whole tensor.
_NOISE_BLOCK = 1 << 16


def _noise_blocks(numel: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while start < numel:
        stop = min(start + _NOISE_BLOCK, numel)
        if numel - stop < 16:
            stop = numel
        bounds.append((start, stop))
        start = stop
    return bounds


# One generator per device and thread, reseeded before every draw: a cache that carries no
# state (the noise is a function of the seeds alone), private to each thread so that optimizers
# stepping in parallel threads cannot interleave a seeding and a draw.
_CACHE = threading.local()


def _scale_and_add_noise(
    targets: list[Tensor],
    seeds: list[int],
    std: float,
    scale: float,
    numerators: list[Tensor],
    bound: float = math.inf,
) -> None:
    generators: dict[torch.device, torch.Generator] | None = getattr(_CACHE, "generators", None)
    if generators is None:
        generators = _CACHE.generators = {}
    # one scratch buffer per step instead of a fresh noise tensor per parameter: on CPU every
    # freshly allocated page costs a fault, which is as expensive as several passes
    scratch: dict[tuple, Tensor] = {}
    blocked = [
        bool(numerators)
        and target.device.type == "cpu"
        and target.numel() > _NOISE_BLOCK
        and target.is_contiguous()
        and numerators[index].is_contiguous()
        for index, target in enumerate(targets)
    ]
    for index, (target, seed) in enumerate(zip(targets, seeds, strict=True)):
        generator = generators.get(target.device)
        if generator is None:
            generator = generators[target.device] = torch.Generator(device=target.device)
        generator.manual_seed(seed)
        if blocked[index]:
            flat_target, flat_numerator = target.view(-1), numerators[index].view(-1)
            block_key = ("block", target.device, target.dtype)
            if block_key not in scratch:
                scratch[block_key] = torch.empty(
                    _NOISE_BLOCK + 16, dtype=target.dtype, device=target.device
                )
            for start, stop in _noise_blocks(target.numel()):
                noise = scratch[block_key][: stop - start]
                noise.normal_(0.0, std, generator=generator)
                out = flat_target[start:stop]
                torch.addcdiv(noise, flat_numerator[start:stop], out, value=scale, out=out)
                if bound != math.inf:
                    out.clamp_(-bound, bound)  # while the block is still in cache
            continue
        key = (target.device, target.dtype)
        if key not in scratch:
            # sized for the tensors drawn whole; the blocked ones never touch it
            size = max(
                t.numel()
                for t, is_blocked in zip(targets, blocked, strict=True)
                if not is_blocked and (t.device, t.dtype) == key
            )
            scratch[key] = torch.empty(size, dtype=target.dtype, device=target.device)
        noise = scratch[key][: target.numel()].view(target.shape)
        noise.normal_(0.0, std, generator=generator)  # logical order, whatever the strides
        if not numerators:
            torch.add(noise, target, alpha=scale, out=target)
        else:
            # the ratio, its scaling and the noise in one pass over memory
            torch.addcdiv(noise, numerators[index], target, value=scale, out=target)
        if bound != math.inf:
            target.clamp_(-bound, bound)


# torch.compile cannot trace a seeded torch.Generator, so under compilation the draw is one
# opaque custom op (no graph break, no host synchronisation); eager calls skip its dispatch.
@torch.library.custom_op("hf_optim::amac_scale_and_add_noise_", mutates_args=("targets",))
def _scale_and_add_noise_op(
    targets: list[Tensor],
    seeds: list[int],
    std: float,
    scale: float,
    numerators: list[Tensor],
    bound: float,
) -> None:
    _scale_and_add_noise(targets, seeds, std, scale, numerators, bound)


@_scale_and_add_noise_op.register_fake
def _(
    targets: list[Tensor],
    seeds: list[int],
    std: float,
    scale: float,
    numerators: list[Tensor],
    bound: float,
) -> None:
    return None


def scale_and_add_noise_(
    targets: list[Tensor],
    seeds: list[int],
    std: float,
    scale: float,
    numerators: list[Tensor] | None = None,
    bound: float = math.inf,
) -> None:
    """``target = scale * target + N(0, std^2)`` for each target, in place, or with
    ``numerators`` ``target = scale * numerator / target + N(0, std^2)``, then clamped to
    ``[-bound, bound]``; the noise of each target is a pure function of its seed."""
    numerators = [] if numerators is None else numerators
    if torch.compiler.is_compiling():
        _scale_and_add_noise_op(targets, seeds, std, scale, numerators, bound)
    else:
        _scale_and_add_noise(targets, seeds, std, scale, numerators, bound)


# -- the optimizer -----------------------------------------------------------------------
class AMaC(HFOptimizer):
    """AMaC (see the module docstring for the update and the differences from upstream).

    Args:
        params: parameters or parameter groups. Groups may use upstream's keys (``wd``, ``mu``,
            ``beta1``, ...) as well as the readable ones.
        total_steps: run length in optimizer steps: the cosine reaches its floor and noise and
            weight decay reach zero here. ``None``: no cosine and no annealing until
            :meth:`set_total_steps` is called. Second positional argument, as in upstream v2.
        lr: base learning rate (group key ``lr``, read every step).
        betas: Adam's moment coefficients (upstream ``beta1``, ``beta2``).
        eps: Adam's denominator term.
        weight_decay: decoupled weight decay (upstream ``wd``), scaled by the scheduled lr.
        momentum: heavy-ball coefficient on the Adam direction (upstream ``mu``); 0 is AdamW.
        noise_factor: standard deviation of the noise added to the normalised update.
        clip_value: elementwise clamp of the normalised update; ``None`` disables it.
        warmup_steps: linear warm-up length in optimizer steps; 0 disables warm-up.
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
        foreach: ``None``/``True`` use the multi-tensor path, ``False`` the reference loop.
        beta1, beta2, mu, wd, alpha, k: upstream AMaC's names of the arguments above.
    """

    statistic_keys = ("effective_lr", "noise_std", "weight_decay_coefficient", "swa_count")

    def __init__(
        self,
        params: Any,
        total_steps: int | None = None,
        *,
        lr: float = 1e-3,
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
        foreach: bool | None = None,
        beta1: float | None = None,
        beta2: float | None = None,
        mu: float | None = None,
        wd: float | None = None,
        alpha: float | None = None,
        k: int | None = None,
    ) -> None:
        if isinstance(total_steps, float):
            raise ValueError(
                f"total_steps must be an integer >= 1 or None, got {total_steps!r} (the second "
                "positional argument is total_steps, as in upstream AMaC v2; give lr=... by "
                "keyword)"
            )
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
        for name, value in options.items():
            _CHECKS[name](name, value)
        options["foreach"] = foreach
        super().__init__(params, options)

    # -- groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        aliases = {name: group.pop(name) for name in (*_ALIASES, "beta1", "beta2") if name in group}
        given = set(group)
        for name in _CHECKS:
            if name not in group and name in self.defaults:
                group[name] = self.defaults[name]
        _resolve_aliases(group, given, aliases)
        for name in _CHECKS:
            if name in given:
                _CHECKS[name](name, group[name])
        # group-level state, saved with the group: counters and the eval/train mode
        group.setdefault("step", 0)
        group.setdefault("swa_count", 0)
        group.setdefault("averaged_in_model", False)
        super().add_param_group(group)

    def set_total_steps(self, total_steps: int) -> None:
        """Set the run length (optimizer steps) of every group, e.g. from the Trainer's
        ``max_steps`` once it is known."""
        _CHECKS["total_steps"]("total_steps", total_steps)
        self.defaults["total_steps"] = total_steps
        for group in self.param_groups:
            group["total_steps"] = total_steps

    # -- the step -------------------------------------------------------------------------
    def _step(self, loss: Any) -> None:
        if any(group["averaged_in_model"] for group in self.param_groups):
            raise RuntimeError(
                "AMaC.step() was called in eval mode: the model holds the averaged weights. "
                "Call optimizer.train() before the forward pass of a training step."
            )
        for group_index, group in enumerate(self.param_groups):
            self._step_group(group_index, group)

    def _step_group(self, group_index: int, group: dict[str, Any]) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        indices: list[int] = []
        for index, p in enumerate(group["params"]):
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AMaC does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            indices.append(index)
        if not params:
            return

        group["step"] += 1
        step = group["step"]
        total_steps = group["total_steps"]
        momentum = group["momentum"]
        needs_total_steps = (
            (group["schedule"] and group["cosine"])
            or group["noise_factor"] > 0
            or (group["dynamic_weight_decay"] and group["weight_decay"] > 0)
        )
        if step == 1 and total_steps is None and needs_total_steps:
            warnings.warn(
                "AMaC has no total_steps: the learning rate stays at lr after warm-up and "
                "noise and weight decay do not anneal. Pass total_steps=... or call "
                "set_total_steps(n) (hf_optim.Trainer does).",
                stacklevel=4,
            )

        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if momentum > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["lookahead"] and "slow_weights" not in state:
                state["slow_weights"] = p.detach().clone(memory_format=torch.preserve_format)

        beta1, beta2 = group["betas"]
        annealing = anneal_factor(step, total_steps)
        lr = group["lr"] * lr_factor(
            step,
            warmup_steps=group["warmup_steps"],
            total_steps=total_steps,
            cosine=group["cosine"],
            min_lr_ratio=group["min_lr_ratio"],
            schedule=group["schedule"],
        )
        weight_decay = group["weight_decay"] * (annealing if group["dynamic_weight_decay"] else 1.0)
        noise_std = group["noise_factor"] * annealing
        k = group["lookahead_k"]
        swa_start = group["swa_start"] if group["swa_start"] is not None else group["warmup_steps"]

        swa_weights: list[float] | None = None
        if group["swa"] and step >= swa_start and step % k == 0:
            swa_weights = []
            for p, state in zip(params, states, strict=True):
                if "swa_average" in state:
                    swa_weights.append(1.0 / (group["swa_count"] + 1))
                else:  # first sample: lerp from zeros with weight 1 is an exact copy
                    state["swa_average"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    swa_weights.append(1.0)
            group["swa_count"] += 1

        seed = group["seed"]
        functional = _multi_tensor_amac if self._use_foreach(group) else _single_tensor_amac
        functional(
            params,
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [state["momentum_buffer"] for state in states] if momentum > 0 else None,
            [state["slow_weights"] for state in states] if group["lookahead"] else None,
            [state["swa_average"] for state in states] if swa_weights is not None else None,
            noise_seeds=[noise_seed(seed, group_index, i, step) for i in indices],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            bias_correction1=1.0 - beta1**step if group["bias_correction"] else 1.0,
            bias_correction2=1.0 - beta2**step if group["bias_correction"] else 1.0,
            momentum=momentum,
            decay=1.0 - lr * weight_decay,
            noise_std=noise_std,
            clip_value=group["clip_value"],
            centralize=group["centralize_gradients"],
            lookahead_alpha=group["lookahead_alpha"] if step % k == 0 else None,
            swa_weights=swa_weights,
        )

        group["effective_lr"] = lr
        group["noise_std"] = noise_std
        group["weight_decay_coefficient"] = weight_decay

    # -- averaged weights -------------------------------------------------------------------
    @staticmethod
    def _averaged(group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        if group["swa"] and "swa_average" in state:
            return state["swa_average"]
        if group["lookahead"] and "slow_weights" in state:
            return state["slow_weights"]
        return None

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
                averaged = self._averaged(group, state) if state else None
                if averaged is not None:
                    state["fast_weights"] = p.detach().clone(memory_format=torch.preserve_format)
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
                averaged = self._averaged(group, state)
                if averaged is not None:
                    p.copy_(averaged)
            group["averaged_in_model"] = False

    def swap_swa_weights(self) -> None:
        """Upstream's name of :meth:`write_averaged_weights`."""
        self.write_averaged_weights()


# -- the update: readable reference loop --------------------------------------------------
def _centralized(grad: Tensor) -> Tensor:
    """The gradient minus its mean over every dimension but the first (a new tensor), or the
    gradient itself for tensors with fewer than two dimensions."""
    if grad.dim() < 2:
        return grad
    dims = tuple(range(1, grad.dim()))
    mean = grad.mean(dim=dims, keepdim=True, dtype=accumulation_dtype(grad.dtype))
    return grad - mean.to(grad.dtype)


def _single_tensor_amac(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    slow_weights: list[Tensor] | None,
    swa_averages: list[Tensor] | None,
    *,
    noise_seeds: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    momentum: float,
    decay: float,
    noise_std: float,
    clip_value: float | None,
    centralize: bool,
    lookahead_alpha: float | None,
    swa_weights: list[float] | None,
) -> None:
    for i, param in enumerate(params):
        grad = _centralized(grads[i]) if centralize else grads[i]
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

        denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
        direction = (exp_avg / bias_correction1) / denom
        if noise_std > 0:
            scale_and_add_noise_([direction], [noise_seeds[i]], noise_std, 1.0)
        if clip_value is not None:
            direction = direction.clamp(-clip_value, clip_value)

        if decay != 1.0:
            param.mul_(decay)
        if momentum_buffers is None:
            param.sub_(direction, alpha=lr)
        else:
            velocity = momentum_buffers[i]
            velocity.mul_(momentum).add_(direction, alpha=lr)
            param.sub_(velocity)

        if lookahead_alpha is not None and slow_weights is not None:
            slow_weights[i].lerp_(param, lookahead_alpha)
            param.copy_(slow_weights[i])
        if swa_averages is not None and swa_weights is not None:
            swa_averages[i].lerp_(param, swa_weights[i])


# -- the update: multi-tensor path --------------------------------------------------------
def _multi_tensor_amac(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    slow_weights: list[Tensor] | None,
    swa_averages: list[Tensor] | None,
    *,
    noise_seeds: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    momentum: float,
    decay: float,
    noise_std: float,
    clip_value: float | None,
    centralize: bool,
    lookahead_alpha: float | None,
    swa_weights: list[float] | None,
) -> None:
    # Centralized gradients are fresh buffers; they are reused for the denominators, and
    # those for the steps (each saves allocating, and on CPU first touching, a full copy).
    centred = [_centralized(grad) for grad in grads] if centralize else grads
    torch._foreach_lerp_(exp_avgs, centred, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, centred, centred, 1.0 - beta2)
    denoms = [
        torch.sqrt(exp_avg_sq, out=buffer) if buffer is not grad else torch.sqrt(exp_avg_sq)
        for exp_avg_sq, buffer, grad in zip(exp_avg_sqs, centred, grads, strict=True)
    ]
    del centred
    # sqrt(v / bc2) + eps = (sqrt(v) + eps sqrt(bc2)) / sqrt(bc2): bc2 folds into the step size
    correction2 = math.sqrt(bias_correction2)
    torch._foreach_add_(denoms, eps * correction2)
    step_size = lr * correction2 / bias_correction1
    if decay != 1.0:
        torch._foreach_mul_(params, decay)

    if noise_std == 0 and clip_value is None:
        # nothing acts on the step itself: update straight from the moments (AdamW's passes)
        if momentum_buffers is None:
            torch._foreach_addcdiv_(params, exp_avgs, denoms, -step_size)
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_addcdiv_(momentum_buffers, exp_avgs, denoms, step_size)
            torch._foreach_sub_(params, momentum_buffers)
    else:
        # Steps are built already scaled by lr / (1 - momentum), so that the velocity update
        # u = momentum u + lr delta is a single lerp.
        scale = lr / (1.0 - momentum)
        steps = denoms  # fresh buffers: overwrite them with the steps
        bound = math.inf if clip_value is None else clip_value * scale
        if noise_std > 0:
            scale_and_add_noise_(
                steps, noise_seeds, noise_std * scale, step_size / (1 - momentum), exp_avgs, bound
            )
        else:
            for exp_avg, buffer in zip(exp_avgs, steps, strict=True):
                torch.div(exp_avg, buffer, out=buffer)
            torch._foreach_mul_(steps, step_size / (1.0 - momentum))
            if clip_value is not None:
                for step in steps:
                    step.clamp_(-bound, bound)
        if momentum_buffers is None:
            torch._foreach_sub_(params, steps)
        else:
            torch._foreach_lerp_(momentum_buffers, steps, 1.0 - momentum)
            torch._foreach_sub_(params, momentum_buffers)
        del steps
    del denoms

    if lookahead_alpha is not None and slow_weights is not None:
        torch._foreach_lerp_(slow_weights, params, lookahead_alpha)
        torch._foreach_copy_(params, slow_weights)
    if swa_averages is not None and swa_weights is not None:
        for weight in sorted(set(swa_weights)):
            chosen = [i for i, w in enumerate(swa_weights) if w == weight]
            torch._foreach_lerp_(
                [swa_averages[i] for i in chosen], [params[i] for i in chosen], weight
            )
