r"""AutoSGM: a first-order low-pass filter on the gradient with an iteration-dependent
learning rate.

Paper and code: O. Somefun et al., "AutoSGM: a unifying framework for accelerated learning"
(https://somefunagba.github.io/asgm), upstream ``somefunAgba/autosgm`` file ``asgm.py``. This
module implements the algorithm of upstream commit ``07b5e79`` (the version its README
describes) from its described behaviour, accepting both its configuration tuples and readable
keyword arguments.

The update, for one parameter tensor :math:`w` with gradient :math:`g_t` at its
:math:`t`-th update (:math:`\lambda` = ``weight_decay``, :math:`\mu` = ``lr``, :math:`F_k` the
window factor at the group's step :math:`k`):

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1} \quad\text{(coupled decay only)}\\
    b_t &= \beta_a b_{t-1} + \eta_a g_t^2, \qquad
    \hat v_t = b_t \cdot \tfrac{(1-\beta_a)/\eta_a}{1-\beta_a^t}\ \text{(debias)}\\
    d_t &= \sqrt{\hat v_t + \epsilon_{in}} + \epsilon \qquad (d_t = 1 \text{ if not adaptive})\\
    m_t &= \beta_i m_{t-1} + \eta_i g_t, \qquad s_t = m_t - \gamma m_{t-1}\\
    u_t &= \frac{s_t}{1-\gamma} \cdot \tfrac{(1-\beta_i)/\eta_i}{1-\beta_i^t} \Big/ d_t
          \;+\; \tfrac{1-\beta_i}{1-\gamma} \lambda w_{t-1} \quad\text{(decoupled decay only)}\\
    w_t &= w_{t-1} - F_k \, a_t \, u_t

:math:`s_t` is the output of the low-pass filter :math:`\eta_i (1-\gamma z^{-1})/(1-\beta_i
z^{-1})`: Polyak's heavy ball at :math:`\gamma=0`, Nesterov's momentum at
:math:`\gamma=\beta_i/(1+\beta_i)`. :math:`\eta = 0` selects :math:`\eta = 1-\beta`
(``eta_i`` sets the input gain of both filters, as upstream). :math:`\epsilon_{in}` is
:math:`\epsilon` when ``eps_inside_sqrt`` and 0 otherwise.

The learning-rate numerator :math:`a_t` (``num_lrc``; :math:`a_t=\mu` when not adaptive):

* 0: :math:`a_t=\mu` (with :math:`\gamma=0` and no window this is Adam).
* 2, max-bound: :math:`p_t = \beta_n p_{t-1} + (1-\beta_n)\mu(w^2 + \tilde g^2)`,
  :math:`r_t = \operatorname{mean}\min(p_t, \mu)`, with :math:`\tilde g = g_t/d_t` and
  :math:`w = w_{t-1}`.
* 3, Markov-robust correlation: :math:`q_t = \beta_n q_{t-1} + (1-\beta_n) w^2`,
  :math:`W = \beta_n q_t`; :math:`x = w \tilde g`,
  :math:`\bar x_t = \beta_n \bar x_{t-1} + (1-\beta_n)(|x|+\epsilon)`,
  :math:`h = \frac{x}{|x|+\epsilon}\min(|x|+\epsilon, c_f \bar x_t)`;
  :math:`p_t = \beta_n p_{t-1} + \frac{\mu}{1+W} h` (unnormalised);
  :math:`r_t = \operatorname{mean}\operatorname{clip}(|p_t|,\ \operatorname{tukey}(d_t)
  \frac{\mu}{1+W},\ \mu(1+W))` with :math:`\operatorname{tukey}(d) = (1-\min(d,1)^2)^2
  \min(d,1)`.
* 4, Chebyshev-robust correlation: as 3 with :math:`W = q_t`,
  :math:`\bar x_t = \beta_n \bar x_{t-1} + (1-\beta_n) x`, :math:`r = |x-\bar x_t|+\epsilon`,
  :math:`\sigma_t = \sqrt{\beta_n\sigma^2_{t-1} + (1-\beta_n) r^2} + \epsilon` (the EMA is
  stored), :math:`h = \frac{x}{r}\min(r, \sigma_t)`.
* For 2, 3 and 4: :math:`a_t = 0.1\,a_{t-1} + 0.9\,r_t` (:math:`a_0 = 0`). The means are per
  tensor (``per_tensor=True``, upstream ``miscs=(1,)``) or, with ``per_tensor=False``, the
  numerator is kept per element. Every EMA includes the current sample.

The window factor :math:`F_k` is a pure function of the group's step count :math:`k` (see
:func:`window_factor`): phase :math:`f = \min((k-1)/L, 1)` (or :math:`((k-1) \bmod L)/L` with
``restart``), quantised to ``window_unit_steps``; a full window uses :math:`|2f-1|`; a flat top
keeps 1 while :math:`f<e` and rescales :math:`f \to (f-e)/(1-e)`; the value is
:math:`x + (1-x)\,\mathrm{shape}(f)`.

Differences from the upstream code, and why:

* No master copy of the weights: ``p`` is updated in place. Upstream keeps ``w`` and ends every
  step with ``p.copy_(w)``, which undoes weight loading, EMA swaps and re-initialisation, costs a
  parameter's worth of memory and, in bf16, loses small updates. Upstream also nudges every
  ``|w| < eps`` entry of its copy by ``eps`` at initialisation; that nudge is not reproduced (it
  changes the weights the user gave, by at most ``eps``).
* ``lr`` and ``weight_decay`` are param-group keys read at every step (upstream has no ``lr`` key,
  so torch and Hugging Face schedulers raised ``KeyError``; it froze both in tuples).
* The window is a function of a per-group step tensor kept in the param group, not a Python
  object per parameter: checkpoints load with ``weights_only=True`` and parameters that miss
  steps stay in phase. After the window the factor holds its final value; upstream silently
  restarts the window (``restart=True`` restores that). With ``rc_cfg`` epoch units
  (``cfact=0``) the epoch advances every ``spe`` steps; upstream advanced it every ``tau`` steps
  (a bug). Only the rectangular input sequence is implemented (``inseq=0``; the Kronecker
  sequence precomputed a sorted Python list of the whole window per parameter) and
  ``cfact`` in {0, 1, 2} (``cfact>2`` stacked sub-window staircases, undocumented upstream).
* ``polynomial`` (``rcm=4``) is :math:`(1-f^n)^2`, as upstream's code at ``07b5e79`` computes it.
  ``logistic_late`` (``rcm=6``) is normalised to run from exactly 1 to exactly the floor;
  upstream normalised it with the bounds of the mid-point logistic, so it started above 1 and
  ended above the floor.
* ``num_lrc=1`` was unreachable upstream (it behaved as 0); here it is an alias of 0 that warns.
* ``maximize`` negates the gradient on entry (as torch does), so weight decay still shrinks the
  weights; upstream negated the final update, decay included. The numerators are unchanged by
  the sign of the gradient, so without decay the two agree.
* ``per_tensor=False`` clips the max-bound numerator (2) at ``lr`` like the per-tensor form;
  upstream left it unclipped only in that mode.
* Debiasing counts each parameter's own updates (like ``torch.optim.Adam``), while the window
  counts the group's steps. Upstream counted both per parameter.
* The filter states are kept in their canonical (not transposed) form; the update is the same.
* Optimizer state is float32 (or float64 for float64 parameters) whatever the parameter dtype,
  because the unnormalised correlation accumulator of ``num_lrc`` 3 and 4 (gain
  :math:`1/(1-\beta_n)`) cannot accumulate in bf16. ``load_state_dict`` keeps those dtypes.
* No host synchronisation and no Python objects in state; ``step`` honours ``closure`` and runs
  under ``torch.no_grad``. ``debug`` and ``history`` tracing are not provided; live statistics
  come through :meth:`~hf_optim.HFOptimizer.statistics`.

How it runs. The update is written once, as two per-tensor kernels (:mod:`hf_optim._kernels`):
``_statistics`` (phase 1, only for per-tensor numerators or ``skip_nonfinite``) returns a
tensor's partial sums, the sum of its numerator estimate and its count of non-finite gradient
entries, and writes the new second moment and numerator EMAs; ``_update`` (phase 2) filters the
gradient and updates the weights in place. ``implementation="compiled"`` (the default
``"auto"`` where a compiler works for the device) runs the same functions through
``torch.compile``, fusing each into one pass over memory; ``"eager"`` is the reference. Between
the phases the partial sums of every tensor of every group are stacked and reduced once
(:func:`hf_optim._reduce.finish_sums`), so under FSDP2 (DTensor parameters) each rank works on
its local shard and the per-tensor means are those of the whole tensor: one collective per step
(two with elementwise numerators, whose per-tensor means feed only the ``lr_effective``
statistic). With ``skip_nonfinite=True`` phase 1 writes nothing, phase 2 recomputes the
statistics, and on a step whose gradients (or loss) are not all finite every write keeps the old
value (decided on the device: no host synchronisation); such steps are counted in the group entry
``skipped_steps``. The per-tensor numerators and the step counters (0-d tensors) are updated
outside the kernels, for all tensors of a group at once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_choice, check_range
from ._kernels import kernel, wide_sum
from ._reduce import accumulation_dtype, counts, finish_sums, local, reduction_group, valid_numel

__all__ = ["AutoSGM", "WINDOWS", "window_factor"]

#: Window shapes, in the order of upstream's ``rc_cfg[0]`` codes (``rcm``).
WINDOWS = ("none", "cosine", "linear", "beta_exp", "polynomial", "logistic", "logistic_late")

#: The per-element state of each numerator estimate.
_NUMERATOR_KEYS = {
    2: ("corr",),
    3: ("corr", "weight_sq", "corr_scale"),
    4: ("corr", "weight_sq", "corr_scale", "corr_var"),
}

#: Param-group entries that are state: the window's step counter and the statistics.
_GROUP_STATE = ("step", "lr_effective", "window_factor", "skipped_steps")

#: The numerator smoothing of upstream (pole 0.1).
_NUMERATOR_POLE = 0.1

_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "num_lrc": 0,
    "adaptive": True,
    "beta_n": 0.9999,
    "beta_a": 0.999,
    "beta_i": 0.9,
    "gamma": 0.0,
    "eta_i": 0.0,
    "debias": True,
    "weight_decay": 0.0,
    "decoupled": False,
    "eps": 1e-10,
    "eps_inside_sqrt": True,
    "window": "none",
    "window_steps": None,
    "window_shape": 2.0,
    "window_floor": 0.0,
    "window_half": True,
    "window_flat": 0.0,
    "window_unit_steps": 1,
    "restart": False,
    "per_tensor": True,
    "cf": 4.0,
    "maximize": False,
}

# tuple name -> the readable key of each field (None: a field with no readable key)
_TUPLE_FIELDS: dict[str, tuple[str | None, ...]] = {
    "lr_cfg": ("adaptive", "lr", "num_lrc"),
    "beta_cfg": ("beta_n", "beta_a", "beta_i", "gamma", "eta_i", "debias"),
    "wd_cfg": ("weight_decay", "decoupled"),
    "eps_cfg": ("eps", "eps_inside_sqrt"),
    "miscs": ("per_tensor",),
    "rc_cfg": (
        "window",
        None,
        "window_floor",
        "window_shape",
        "window_half",
        None,
        None,
        None,
        "window_flat",
    ),
}
_RC_FIELDS = ("rcm", "inseq", "x", "n", "m", "tau", "spe", "cfact", "e")


def _flag(name: str, value: Any) -> bool:
    """Booleans; upstream's tuples also use the integers 0 and 1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be True or False (or 0/1 in a tuple), got {value!r}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _translate(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Turn upstream's configuration tuples into readable keys.

    Returns the readable options and, for each key taken from a tuple, where it came from (for
    error messages). A tuple field that disagrees with a readable keyword given alongside it is
    an error.
    """
    readable = {k: v for k, v in given.items() if k not in _TUPLE_FIELDS}
    origin: dict[str, str] = {}
    from_tuples: dict[str, Any] = {}
    for tuple_name, fields in _TUPLE_FIELDS.items():
        if tuple_name not in given:
            continue
        values = given[tuple_name]
        if not isinstance(values, (tuple, list)) or len(values) != len(fields):
            names = _RC_FIELDS if tuple_name == "rc_cfg" else fields
            raise ValueError(
                f"{tuple_name} must be a tuple of {len(fields)} values "
                f"({', '.join(str(n) for n in names)}), got {values!r}"
            )
        if tuple_name == "rc_cfg":
            items = _translate_window(values)
        else:
            items = {key: value for key, value in zip(fields, values, strict=True) if key}
        for index, key in enumerate(fields):
            if key is not None:
                origin[key] = f"{tuple_name}[{index}]"
        if tuple_name == "rc_cfg":
            origin.update(
                window_steps="rc_cfg[5:8]", window_unit_steps="rc_cfg[5:8]", restart="rc_cfg[7]"
            )
        from_tuples.update(items)
    for key, value in from_tuples.items():
        if key in readable and readable[key] != value:
            # an invalid keyword gets the message it gets anywhere else (add_param_group)
            _normalize({**_DEFAULTS, key: readable[key]}, {})
            raise ValueError(
                f"{key}={readable[key]!r} conflicts with {origin[key]}={value!r}: give the "
                f"setting once, either as a keyword or inside the tuple"
            )
    return {**readable, **from_tuples}, origin


def _translate_window(rc_cfg: tuple | list) -> dict[str, Any]:
    rcm, inseq, x, n, m, tau, spe, cfact, e = rc_cfg
    check_choice("rc_cfg[0] (rcm, the window shape)", rcm, range(len(WINDOWS)))
    check_choice("rc_cfg[1] (inseq; the Kronecker sequence is not supported)", inseq, (0,))
    check_choice("rc_cfg[4] (m: 1 half window, 0 full window)", m, (0, 1))
    tau = _positive_int("rc_cfg[5] (tau, epochs)", tau)
    spe = _positive_int("rc_cfg[6] (spe, steps per epoch)", spe)
    check_choice(
        "rc_cfg[7] (cfact: 0 epoch units, 1 steps, 2 restart every epoch)", cfact, (0, 1, 2)
    )
    options: dict[str, Any] = {
        "window": WINDOWS[rcm],
        "window_floor": x,
        "window_shape": n,
        "window_half": m == 1,
        "window_flat": e,
        "window_steps": spe if cfact == 2 else tau * spe,
        "window_unit_steps": spe if cfact == 0 else 1,
    }
    if cfact == 2:
        options["restart"] = True
    return options


def _normalize(options: dict[str, Any], origin: dict[str, str]) -> dict[str, Any]:
    """Check every option of a (complete) param group and return the canonical values."""

    def name(key: str) -> str:
        return f"{key} ({origin[key]})" if key in origin else key

    out = dict(options)
    check_range(name("lr"), out["lr"], 0.0)
    check_choice(name("num_lrc"), out["num_lrc"], (0, 1, 2, 3, 4))
    if out["num_lrc"] == 1:
        warnings.warn(
            "AutoSGM num_lrc=1 is an alias of num_lrc=0 (the upstream branch for 1 was "
            "unreachable); use 0, or 2, 3, 4 for an iteration-dependent numerator",
            UserWarning,
            stacklevel=4,
        )
        out["num_lrc"] = 0
    for key in ("beta_n", "beta_a", "beta_i"):
        check_range(name(key), out[key], 0.0, 1.0, high_open=True)
    check_range(name("gamma"), out["gamma"], -math.inf, out["beta_i"])
    if out["beta_i"] == 0.0 and out["gamma"] != 0.0:
        raise ValueError(
            f"{name('gamma')} must be 0 when beta_i is 0 (a filter zero needs a pole), "
            f"got {out['gamma']!r}"
        )
    check_range(name("eta_i"), out["eta_i"], 0.0)
    check_range(name("weight_decay"), out["weight_decay"], 0.0)
    check_range(name("eps"), out["eps"], 0.0)
    check_range(name("cf"), out["cf"], 0.0, low_open=True)
    for key in ("adaptive", "debias", "decoupled", "eps_inside_sqrt", "window_half", "restart"):
        out[key] = _flag(name(key), out[key])
    for key in ("per_tensor", "maximize"):
        out[key] = _flag(name(key), out[key])
    check_choice(name("window"), out["window"], WINDOWS)
    check_range(name("window_floor"), out["window_floor"], 0.0, 1.0)
    check_range(name("window_flat"), out["window_flat"], 0.0, 1.0, high_open=True)
    check_range(name("window_shape"), out["window_shape"], 0.0, low_open=True)
    if out["window"] == "beta_exp" and out["window_shape"] == 1:
        raise ValueError(f"{name('window_shape')} must not be 1 for the beta_exp window")
    out["window_unit_steps"] = _positive_int(name("window_unit_steps"), out["window_unit_steps"])
    if out["window"] != "none":
        if out["window_steps"] is None:
            raise ValueError(
                "window_steps (the window length in optimizer steps) must be given when window "
                f"is {out['window']!r}"
            )
        out["window_steps"] = _positive_int(name("window_steps"), out["window_steps"])
    elif out["window_steps"] is not None:
        out["window_steps"] = _positive_int(name("window_steps"), out["window_steps"])
    return out


# -- the window --------------------------------------------------------------------------------
def _window_shape(kind: str, f: Tensor, n: float) -> Tensor:
    """The window's shape on the phase f in [0, 1]: 1 at f=0, 0 at f=1."""
    if kind == "cosine":
        return torch.cos(f * (math.pi / 2)).clamp(min=0.0).pow(n)
    if kind == "linear":
        return (1.0 - f).pow(n)
    if kind == "beta_exp":
        return (torch.pow(n, f) - n) / (1.0 - n)
    if kind == "polynomial":
        return (1.0 - f.pow(n)).pow(2)
    inflection = 0.5 if kind == "logistic" else 0.875

    def logistic(phase: Tensor | float) -> Tensor | float:
        # base-2 logistic with growth rate 2n, falling through 1/2 at the inflection
        if isinstance(phase, Tensor):
            return torch.sigmoid(-math.log(2.0) * 2.0 * n * (phase - inflection))
        return 1.0 / (1.0 + 2.0 ** (2.0 * n * (phase - inflection)))

    top, bottom = logistic(0.0), logistic(1.0)
    return (logistic(f) - bottom) / (top - bottom)


def window_factor(step: Tensor, group: dict[str, Any]) -> Tensor:
    """The window factor F at the group's ``step`` (a 0-d tensor counting from 1).

    A pure function of the step and the group's window options, computed with tensor ops so
    that it needs no host synchronisation.
    """
    kind = group["window"]
    if kind == "none":
        return torch.ones_like(step)
    length = group["window_steps"]
    unit = group["window_unit_steps"]
    elapsed = step - 1.0
    if group["restart"]:
        elapsed = torch.remainder(elapsed, length)
    if unit > 1:
        elapsed = torch.floor(elapsed / unit) * unit
    f = (elapsed / length).clamp(0.0, 1.0)
    if not group["window_half"]:
        f = (2.0 * f - 1.0).abs()
    flat = group["window_flat"]
    if flat > 0.0:
        on_top = f < flat
        f = ((f - flat) / (1.0 - flat)).clamp(0.0, 1.0)
    floor = group["window_floor"]
    value = floor + (1.0 - floor) * _window_shape(kind, f, group["window_shape"])
    if flat > 0.0:
        value = torch.where(on_top, torch.ones_like(value), value)
    return value


# -- the per-tensor math ----------------------------------------------------------------------
# The kernels take the group's hyperparameters and then the tensor's own scalars (its debias
# factors, its numerator) as trailing 0-d tensors, named on entry (``_unpack``): values that
# change during a run never reach the compiler as Python numbers, and the bias corrections (a
# power of the step) are computed once per tensor outside the kernel, not once per vector of
# elements inside it. The leading Python arguments (num_lrc, per_tensor, ...) select the
# structure of the update; each combination compiles once per dtype and device.
_HYPERPARAMETERS = (
    "lr", "factor", "coupled_decay", "decoupled_decay", "beta_n", "beta_a", "beta_i", "gamma",
    "eta_m", "eta_a", "eps", "eps_in", "cf", "sign",
)  # fmt: skip
#: a tensor's own scalars: the momentum's scale (debias / (1 - gamma)), the second moment's
#: debias factor, and (phase 2, except for elementwise numerators) the numerator a_t
_TENSOR_SCALARS = ("momentum_scale", "second_scale", "numerator")


def _unpack(scalars: tuple[Tensor, ...]) -> dict[str, Tensor]:
    return dict(zip(_HYPERPARAMETERS + _TENSOR_SCALARS, scalars, strict=False))


def _gradient(param: Tensor, grad: Tensor, h: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The weights and the gradient in the accumulation dtype, with the sign of ``maximize``
    and the coupled (L2) weight decay."""
    w = param.to(h["lr"].dtype)
    return w, h["sign"] * grad.to(w.dtype) + h["coupled_decay"] * w


def _denominator(b: Tensor, h: dict[str, Tensor]) -> Tensor:
    """d = sqrt(c2 b + eps_in) + eps, with c2 the second moment's debias factor."""
    return torch.sqrt(b * h["second_scale"] + h["eps_in"]) + h["eps"]


def _tukey(d: Tensor) -> Tensor:
    d = d.clamp(max=1.0)
    return (1.0 - d * d).square() * d


def _numerator_estimate(
    w: Tensor,
    g: Tensor,
    d: Tensor,
    corr: Tensor,
    weight_sq: Tensor | None,
    corr_scale: Tensor | None,
    corr_var: Tensor | None,
    h: dict[str, Tensor],
    num_lrc: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped numerator estimate of num_lrc 2, 3, 4 and the new values of its EMAs."""
    lr, beta_n, eps = h["lr"], h["beta_n"], h["eps"]
    normalized = g / d
    if num_lrc == 2:
        corr = beta_n * corr + (1.0 - beta_n) * lr * (w * w + normalized * normalized)
        return torch.clamp(corr, max=lr), {"corr": corr}
    weight_sq = beta_n * weight_sq + (1.0 - beta_n) * w * w
    weight_power = beta_n * weight_sq if num_lrc == 3 else weight_sq
    lr_scaled = lr / (1.0 + weight_power)
    x = w * normalized
    new = {"weight_sq": weight_sq}
    if num_lrc == 3:
        magnitude = x.abs() + eps
        corr_scale = beta_n * corr_scale + (1.0 - beta_n) * magnitude
        cap = h["cf"] * corr_scale
    else:
        corr_scale = beta_n * corr_scale + (1.0 - beta_n) * x
        magnitude = (x - corr_scale).abs() + eps
        corr_var = beta_n * corr_var + (1.0 - beta_n) * magnitude * magnitude
        cap = torch.sqrt(corr_var) + eps
        new["corr_var"] = corr_var
    new["corr_scale"] = corr_scale
    robust = x / magnitude * torch.minimum(magnitude, cap)
    corr = beta_n * corr + lr_scaled * robust
    new["corr"] = corr
    low = _tukey(d) * lr_scaled
    high = lr_scaled * (1.0 + weight_power).square()
    return torch.minimum(torch.maximum(corr.abs(), low), high), new


def _smoothed_numerator(previous: Tensor, raw: Tensor) -> Tensor:
    """a_t = 0.1 a_{t-1} + 0.9 r_t, upstream's light smoothing of the numerator."""
    return _NUMERATOR_POLE * previous + (1.0 - _NUMERATOR_POLE) * raw


def _store(target: Tensor, value: Tensor, apply: Tensor | None) -> None:
    """Write ``value`` into ``target``; keep ``target`` where ``apply`` is False (a step that
    ``skip_nonfinite`` skips; compiled, the select costs no traffic: ``target`` is read anyway)."""
    target.copy_(value if apply is None else torch.where(apply, value, target))


def _store_numerator_state(
    new: dict[str, Tensor],
    corr: Tensor,
    weight_sq: Tensor | None,
    corr_scale: Tensor | None,
    corr_var: Tensor | None,
    apply: Tensor | None,
) -> None:
    targets = {"corr": corr, "weight_sq": weight_sq, "corr_scale": corr_scale, "corr_var": corr_var}
    for key, value in new.items():
        _store(targets[key], value, apply)


@kernel
def _statistics(
    num_lrc: int,
    skip_nonfinite: bool,
    param: Tensor,
    grad: Tensor,
    exp_avg_sq: Tensor | None,
    corr: Tensor | None,
    weight_sq: Tensor | None,
    corr_scale: Tensor | None,
    corr_var: Tensor | None,
    *scalars: Tensor,
) -> Tensor:
    """Phase 1, for a per-tensor numerator (num_lrc 2, 3, 4) or a finite check: this tensor's
    partial sums (sum of the numerator estimate, count of non-finite gradient entries).

    Without ``skip_nonfinite`` the new second moment and numerator EMAs are written here and
    phase 2 reads them; with it nothing is written (the step may yet be skipped) and phase 2
    computes them again.
    """
    h = _unpack(scalars)
    w, g = _gradient(param, grad, h)
    estimate_sum = torch.zeros((), dtype=w.dtype, device=w.device)
    if num_lrc >= 2:
        b = h["beta_a"] * exp_avg_sq + h["eta_a"] * g * g
        estimate, new = _numerator_estimate(
            w, g, _denominator(b, h), corr, weight_sq, corr_scale, corr_var, h, num_lrc
        )
        estimate_sum = wide_sum(estimate)
        if not skip_nonfinite:
            exp_avg_sq.copy_(b)
            _store_numerator_state(new, corr, weight_sq, corr_scale, corr_var, None)
    nonfinite = torch.zeros_like(estimate_sum)
    if skip_nonfinite:
        nonfinite = torch.logical_not(torch.isfinite(grad)).sum().to(w.dtype)
    return torch.stack([estimate_sum, nonfinite])


@kernel
def _update(
    num_lrc: int,
    per_tensor: bool,
    adaptive: bool,
    statistics_written: bool,
    param: Tensor,
    grad: Tensor,
    momentum: Tensor,
    exp_avg_sq: Tensor | None,
    corr: Tensor | None,
    weight_sq: Tensor | None,
    corr_scale: Tensor | None,
    corr_var: Tensor | None,
    numerator: Tensor | None,
    apply: Tensor | None,
    *scalars: Tensor,
) -> Tensor | None:
    """Phase 2: filter the gradient, form the numerator and update the weights in place.

    ``scalars`` are the hyperparameters, the tensor's debias factors and its numerator a_t
    (``lr``, or the per-tensor numerator); an elementwise numerator's state comes as ``numerator`` and is
    updated here. ``statistics_written``: phase 1 already wrote the second moment and the
    numerator EMAs. ``apply`` (``skip_nonfinite``) is False on a step to skip: every write
    then keeps the old value. Returns the sum of an elementwise numerator (for the statistic).
    """
    h = _unpack(scalars)
    w, g = _gradient(param, grad, h)

    d = torch.ones((), dtype=w.dtype, device=w.device)
    if adaptive and statistics_written:
        d = _denominator(exp_avg_sq, h)
    elif adaptive:
        b = h["beta_a"] * exp_avg_sq + h["eta_a"] * g * g
        d = _denominator(b, h)
        _store(exp_avg_sq, b, apply)

    # the low-pass filter eta (1 - gamma z^-1) / (1 - beta_i z^-1); momentum_scale holds its
    # debias factor and the 1 / (1 - gamma) that gives it unit gain at DC
    m = h["beta_i"] * momentum + h["eta_m"] * g
    filtered = (m - h["gamma"] * momentum) * h["momentum_scale"]
    _store(momentum, m, apply)

    a = h["numerator"]
    elementwise_sum = None
    if adaptive and num_lrc >= 2 and not statistics_written:
        estimate, new = _numerator_estimate(
            w, g, d, corr, weight_sq, corr_scale, corr_var, h, num_lrc
        )
        _store_numerator_state(new, corr, weight_sq, corr_scale, corr_var, apply)
        if not per_tensor:
            a = _smoothed_numerator(numerator, estimate)
            _store(numerator, a, apply)
            elementwise_sum = wide_sum(a)

    update = filtered / d + h["decoupled_decay"] * w
    _store(param, w - h["factor"] * a * update, apply)
    return elementwise_sum


# -- the optimizer -----------------------------------------------------------------------------
class AutoSGM(HFOptimizer):
    r"""AutoSGM: low-pass-filter momentum, a moment-estimator denominator and an
    iteration-dependent learning-rate numerator, with an optional window schedule.

    Give the configuration either as readable keywords or as upstream's tuples (``lr_cfg``,
    ``beta_cfg``, ``rc_cfg``, ``wd_cfg``, ``eps_cfg``, ``miscs``); a tuple and a keyword that
    disagree are an error. Unset keywords take the defaults of upstream.

    Args:
        params: parameters or param-group dicts (groups may use the same keywords or tuples).
        lr: :math:`\mu`, the learning rate (``lr_cfg[1]``); a float or a 0-d tensor, read from
            the group every step.
        num_lrc: the numerator: 0 constant, 2 max-bound, 3 Markov-robust, 4 Chebyshev-robust
            correlation estimate; 1 is an alias of 0 (``lr_cfg[2]``).
        adaptive: divide by the moment estimator and use the numerator (``lr_cfg[0]``); with
            ``False`` the step is ``lr`` times the filtered gradient.
        beta_n: pole of the numerator's EMAs (``beta_cfg[0]``).
        beta_a: pole of the second-moment EMA (``beta_cfg[1]``).
        beta_i: pole of the gradient's low-pass filter (``beta_cfg[2]``).
        gamma: zero of the low-pass filter, ``gamma <= beta_i``: 0 heavy ball,
            ``beta_i/(1+beta_i)`` Nesterov (``beta_cfg[3]``).
        eta_i: input gain of both filters; 0 selects ``1 - beta`` (``beta_cfg[4]``).
        debias: debias the filter outputs (``beta_cfg[5]``).
        weight_decay: :math:`\lambda` (``wd_cfg[0]``); read from the group every step.
        decoupled: decay at the parameter-change level (``wd_cfg[1] = 1``) instead of adding
            :math:`\lambda w` to the gradient. ``AdamW(weight_decay=λ)`` is
            ``weight_decay = λ (1-γ)/(1-beta_i)``, ``decoupled=True``.
        eps: :math:`\epsilon` added to the root of the second moment (``eps_cfg[0]``).
        eps_inside_sqrt: also add ``eps`` inside the root (``eps_cfg[1]``).
        window: the window shape: ``'none'``, ``'cosine'``, ``'linear'``, ``'beta_exp'``,
            ``'polynomial'``, ``'logistic'``, ``'logistic_late'`` (``rc_cfg[0]``).
        window_steps: the window length in optimizer steps (``rc_cfg`` tau*spe, or spe).
        window_shape: the shape parameter n (``rc_cfg[3]``).
        window_floor: the factor's lowest value x (``rc_cfg[2]``).
        window_half: anneal only (True) or warm up then anneal (False) (``rc_cfg[4]``).
        window_flat: fraction of the (half) window held at 1, the flat top (``rc_cfg[8]``).
        window_unit_steps: the window advances in units of this many steps (epochs of
            ``rc_cfg`` with ``cfact=0``).
        restart: start the window again after it ends (``rc_cfg`` ``cfact=2`` restarts every
            epoch); by default the factor holds its final value.
        per_tensor: one numerator per tensor, the mean of the estimate (``miscs[0]``).
        cf: the Markov bound factor of ``num_lrc=3``.
        maximize: maximise the objective.
        lr_cfg, beta_cfg, rc_cfg, wd_cfg, eps_cfg, miscs: upstream's tuples (see above).
        debug: accepted for upstream compatibility; only ``False``.
        implementation: ``"auto"`` (compiled kernels where a compiler works for the device),
            ``"compiled"`` or ``"eager"`` (the reference).
        skip_nonfinite: leave parameters and state exactly as they are on a step whose
            gradients (or loss) are not all finite, counting it in ``skipped_steps``.
    """

    statistic_keys = ("lr_effective", "window_factor", "skipped_steps")
    #: upstream arguments that set a readable one a framework also passes (the Trainer's lr and
    #: weight_decay): a user's tuple in ``optim_args`` wins over the framework's value
    argument_aliases = {"lr_cfg": "lr", "wd_cfg": "weight_decay", "eps_cfg": "eps"}
    wide_state_keys = frozenset(
        {"momentum", "exp_avg_sq", "corr", "weight_sq", "corr_scale", "corr_var", "numerator"}
    )
    counter_state_keys = frozenset({"step"})
    group_state_keys = _GROUP_STATE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor | None = None,
        num_lrc: int | None = None,
        *,
        adaptive: bool | None = None,
        beta_n: float | None = None,
        beta_a: float | None = None,
        beta_i: float | None = None,
        gamma: float | None = None,
        eta_i: float | None = None,
        debias: bool | None = None,
        weight_decay: float | None = None,
        decoupled: bool | None = None,
        eps: float | None = None,
        eps_inside_sqrt: bool | None = None,
        window: str | None = None,
        window_steps: int | None = None,
        window_shape: float | None = None,
        window_floor: float | None = None,
        window_half: bool | None = None,
        window_flat: float | None = None,
        window_unit_steps: int | None = None,
        restart: bool | None = None,
        per_tensor: bool | None = None,
        cf: float | None = None,
        maximize: bool | None = None,
        lr_cfg: tuple | None = None,
        beta_cfg: tuple | None = None,
        rc_cfg: tuple | None = None,
        wd_cfg: tuple | None = None,
        eps_cfg: tuple | None = None,
        miscs: tuple | None = None,
        debug: bool = False,
        implementation: str = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        if debug is not False:
            raise ValueError(
                "debug must be False: hf-optim's AutoSGM keeps no debug tensors; read live "
                "statistics with optimizer.statistics()"
            )
        given = {
            key: value
            for key, value in dict(
                lr=lr,
                num_lrc=num_lrc,
                adaptive=adaptive,
                beta_n=beta_n,
                beta_a=beta_a,
                beta_i=beta_i,
                gamma=gamma,
                eta_i=eta_i,
                debias=debias,
                weight_decay=weight_decay,
                decoupled=decoupled,
                eps=eps,
                eps_inside_sqrt=eps_inside_sqrt,
                window=window,
                window_steps=window_steps,
                window_shape=window_shape,
                window_floor=window_floor,
                window_half=window_half,
                window_flat=window_flat,
                window_unit_steps=window_unit_steps,
                restart=restart,
                per_tensor=per_tensor,
                cf=cf,
                maximize=maximize,
                lr_cfg=lr_cfg,
                beta_cfg=beta_cfg,
                rc_cfg=rc_cfg,
                wd_cfg=wd_cfg,
                eps_cfg=eps_cfg,
                miscs=miscs,
            ).items()
            if value is not None
        }
        options, origin = _translate(given)
        defaults = _normalize({**_DEFAULTS, **options}, origin)
        defaults.update(implementation=implementation, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it may override any option, as keywords or as upstream's tuples."""
        settings = {k: v for k, v in param_group.items() if k != "params"}
        options, origin = _translate({k: v for k, v in settings.items() if v is not None})
        for key in list(settings):
            if key in _TUPLE_FIELDS:
                del param_group[key]
        param_group.update(options)
        merged = {**self.defaults, **param_group}
        normalized = _normalize({k: merged[k] for k in _DEFAULTS}, origin)
        param_group.update({k: v for k, v in normalized.items() if k in param_group})
        super().add_param_group(param_group)  # runs _check_group on the completed group
        self._init_group_state(self.param_groups[-1])

    @staticmethod
    def _init_group_state(group: dict[str, Any]) -> None:
        """The group's state entries, present from the start so that a checkpoint template
        (torch.distributed.checkpoint loads only the keys a fresh optimizer has) holds them."""
        like = local(group["params"][0]) if group["params"] else torch.zeros(())
        wide = accumulation_dtype(like.dtype) if like.is_floating_point() else torch.float32
        initial = {"step": 0.0, "skipped_steps": 0.0, "window_factor": 1.0, "lr_effective": 0.0}
        for key, value in initial.items():
            if key not in group:
                dtype = wide if key == "lr_effective" else torch.float32
                group[key] = torch.full((), value, dtype=dtype, device=like.device)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Check every option and store its canonical value (flags as bools, num_lrc 1 as 0)."""
        group.update(_normalize({k: group[k] for k in _DEFAULTS}, {}))

    def init(self) -> None:
        """Accepted for code written for upstream, whose ``init()`` pre-created the state.
        State here is created at a parameter's first step, so this does nothing."""

    # -- state -------------------------------------------------------------------------
    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> None:
        """The state of ``p`` before its first update: zero filters and a zero numerator."""
        state = self.state[p]
        dtype = accumulation_dtype(p.dtype)

        def zeros_like_p() -> Tensor:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

        state["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
        state["momentum"] = zeros_like_p()
        if group["adaptive"]:
            state["exp_avg_sq"] = zeros_like_p()
            for key in _NUMERATOR_KEYS.get(group["num_lrc"], ()):
                state[key] = zeros_like_p()
            if group["num_lrc"] >= 2:
                state["numerator"] = (
                    torch.zeros((), dtype=dtype, device=local(p).device)
                    if group["per_tensor"]
                    else zeros_like_p()
                )

    def _hyperparameters(self, group: dict[str, Any], like: Tensor, factor: Tensor) -> Tensor:
        """The group's hyperparameters as one 1-D tensor (in the order of
        ``_HYPERPARAMETERS``), for tensors like ``like``.

        ``lr`` and ``weight_decay`` come from the base's cached 0-d tensors (a scheduler that
        changes them every step costs no host-device copy); the others change only when the
        user edits the group, and are copied to the device again only then.
        """
        dtype = accumulation_dtype(like.dtype)
        beta_i, gamma, eta = group["beta_i"], group["gamma"], group["eta_i"]
        fixed = (
            group["beta_n"],
            group["beta_a"],
            beta_i,
            gamma,
            eta or 1.0 - beta_i,
            eta or 1.0 - group["beta_a"],
            group["eps"],
            group["eps"] if group["eps_inside_sqrt"] else 0.0,
            group["cf"],
            -1.0 if group["maximize"] else 1.0,
        )
        cache = self.__dict__.setdefault("_fixed_hyperparameters", {})
        key = (id(group), dtype, like.device)
        cached = cache.get(key)
        if cached is None or cached[0] != fixed:
            cached = cache[key] = (fixed, torch.tensor(fixed, dtype=dtype).to(like.device))
        weight_decay = self._scalar(group, "weight_decay", like)
        if group["decoupled"]:
            decays = [weight_decay * 0.0, weight_decay * ((1.0 - beta_i) / (1.0 - gamma))]
        else:
            decays = [weight_decay, weight_decay * 0.0]
        changing = torch.stack([self._scalar(group, "lr", like), factor.to(dtype), *decays])
        return torch.cat([changing, cached[1]])

    @staticmethod
    def _tensor_scalars(group: dict[str, Any], steps: Tensor) -> list[Tensor]:
        """Per tensor: the momentum's scale and the second moment's debias factor at the
        update after ``steps`` (the tensors' update counts, a 1-D tensor)."""
        beta_i, beta_a, eta = group["beta_i"], group["beta_a"], group["eta_i"]
        eta_m, eta_a = eta or 1.0 - beta_i, eta or 1.0 - beta_a
        t = steps + 1.0
        ones = torch.ones_like(t)
        if not group["debias"]:
            return [ones / (1.0 - group["gamma"]), ones]
        momentum_scale = ((1.0 - beta_i) / eta_m / (1.0 - group["gamma"])) / (1.0 - beta_i**t)
        return [momentum_scale, ((1.0 - beta_a) / eta_a) / (1.0 - beta_a**t)]

    # -- the step ----------------------------------------------------------------------
    def _step(self, loss: Any) -> None:
        skip = self.defaults["skip_nonfinite"]  # optimizer-wide: one bad tensor skips the step
        # (group, params with a gradient, hyperparameters by dtype, window factor, scalars)
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AutoSGM does not support sparse gradients")
                if p not in self.state:
                    self._init_param_state(group, p)
            params = [p for p in params if p.numel() > 0]
            if not params:
                continue
            self._init_group_state(group)  # a group of an older checkpoint may lack some
            device = local(params[0]).device
            for key in _GROUP_STATE:
                if group[key].device != device:
                    group[key] = group[key].to(device)
            factor = window_factor(group["step"] + 1.0, group)
            hypers = {}
            for p in params:
                if p.dtype not in hypers:
                    hypers[p.dtype] = self._hyperparameters(group, local(p), factor).unbind()
            wide = any(p.dtype == torch.float64 for p in params)
            steps = torch.stack([self.state[p]["step"] for p in params])
            steps = steps.to(torch.float64 if wide else torch.float32)
            scalars = self._tensor_scalars(group, steps)
            work.append((group, params, hypers, factor, scalars))
        if not work:
            return
        process_group = reduction_group([p for _, params, *_ in work for p in params])

        def statistic_tensors(p: Tensor) -> list[Tensor | None]:
            state = self.state[p]
            names = ("exp_avg_sq", "corr", "weight_sq", "corr_scale", "corr_var")
            return [local(state[key]) if key in state else None for key in names]

        # phase 1: partial sums of the per-tensor numerator estimates and of non-finite
        # gradient entries, reduced in one collective
        compiled = self._compiled(local(work[0][1][0]))
        items, counted = [], []
        for group, params, hypers, _, scalars in work:
            if not (_mean_needed(group) or skip):
                continue
            for p, own in zip(params, _per_tensor(scalars), strict=True):
                items.append(
                    (
                        group["num_lrc"] if _mean_needed(group) else 0,
                        skip,
                        local(p),
                        local(p.grad),
                        *statistic_tensors(p),
                        *hypers[p.dtype],
                        *_in_dtype(own, p),
                    )
                )
                counted.append((valid_numel(p), counts(p, process_group)))
        apply = None
        if items:
            rows = _statistics.map(items, compiled=compiled)
            sums = self._finish_sums(rows, counted, process_group)
            means = iter((sums[:, 0] / sums[:, 2]).unbind())
            if skip:
                apply = sums[:, 1].sum() == 0
                if loss is not None:
                    apply = apply & torch.isfinite(self._loss_tensor(loss, sums))
        if apply is not None:
            skipped = torch.logical_not(apply).to(torch.float32)
            for group in self.param_groups:
                if "skipped_steps" not in group:
                    group["skipped_steps"] = torch.zeros_like(skipped)
                group["skipped_steps"].add_(skipped)

        # phase 2: the update
        elementwise = []
        for group, params, hypers, factor, scalars in work:
            keep = apply
            numerator_states: list[Tensor | None] = [None] * len(params)
            if _mean_needed(group) or skip:
                group_means = [next(means) for _ in params]
            if _mean_needed(group):
                states = [self.state[p]["numerator"] for p in params]
                previous = torch.stack(states)
                numerators = _smoothed_numerator(previous, torch.stack(group_means).to(previous))
                _keep_list(states, numerators, previous, keep)
            elif group["adaptive"] and group["num_lrc"] >= 2:  # elementwise numerators
                numerator_states = [local(self.state[p]["numerator"]) for p in params]
                numerators = torch.zeros_like(scalars[0])
            else:
                numerators = self._scalar(group, "lr", scalars[0]).expand_as(scalars[0])
            own_scalars = _per_tensor([*scalars, numerators.to(scalars[0])])
            items = [
                (
                    group["num_lrc"] if group["adaptive"] else 0,
                    group["per_tensor"] or group["num_lrc"] < 2,
                    group["adaptive"],
                    _mean_needed(group) and not skip,
                    local(p),
                    local(p.grad),
                    local(self.state[p]["momentum"]),
                    *statistic_tensors(p),
                    numerator_state,
                    keep,  # None without skip_nonfinite: no select per element
                    *hypers[p.dtype],
                    *_in_dtype(own, p),
                )
                for p, own, numerator_state in zip(
                    params, own_scalars, numerator_states, strict=True
                )
            ]
            results = _update.map(items, compiled=compiled)
            sums_of_group = [r for r in results if r is not None]
            advance = 1.0 if keep is None else keep.to(torch.float32)
            torch._foreach_add_([self.state[p]["step"] for p in params], advance)
            group["step"].add_(advance)
            _keep(group, "window_factor", factor, keep)
            if sums_of_group:
                elementwise.append((group, params, sums_of_group, factor, keep))
            else:
                _keep(group, "lr_effective", factor * numerators.mean(), keep)
        if elementwise:
            # the statistic of elementwise numerators: per-tensor means, one more collective
            rows = [torch.stack([s, torch.zeros_like(s)]) for *_, sums, _, _ in elementwise
                    for s in sums]  # fmt: skip
            counted = [(valid_numel(p), counts(p, process_group))
                       for _, params, *_ in elementwise for p in params]  # fmt: skip
            sums = self._finish_sums(rows, counted, process_group)
            tensor_means = (sums[:, 0] / sums[:, 2]).split([len(e[1]) for e in elementwise])
            for (group, _, _, factor, keep), mean in zip(elementwise, tensor_means, strict=True):
                _keep(group, "lr_effective", factor * mean.mean(), keep)

    def _finish_sums(
        self, rows: list[Tensor], counted: list[tuple[int, bool]], process_group: Any
    ) -> Tensor:
        """Stack per-tensor partial sums (value, non-finite count) and element counts, zero
        the rows of replicas another rank counts, and sum them across ranks (one collective).
        Returns rows of (value, non-finite count, element count)."""
        dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
        layout = self._layout(counted, dtype, rows[0].device)
        partials = torch.cat([torch.stack(rows).to(dtype), layout[:, :1]], dim=1)
        partials = torch.where(layout[:, 1:] > 0, partials, 0.0)
        return finish_sums(partials, process_group)

    def _layout(self, counted: list[tuple[int, bool]], dtype: torch.dtype, device: Any) -> Tensor:
        """(element count, counted here) per row, from Python numbers: cached, so that it is
        copied to the device only when the set of stepped tensors changes."""
        cache = self.__dict__.setdefault("_row_layouts", {})
        key = (tuple(counted), dtype, device)
        if key not in cache:
            if len(cache) >= 8:
                cache.clear()
            values = [[float(n), float(owned)] for n, owned in counted]
            cache[key] = torch.tensor(values, dtype=dtype).to(device)
        return cache[key]


def _per_tensor(columns: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """Per-tensor 0-d scalars from vectors with one entry per tensor."""
    return list(zip(*(column.unbind() for column in columns), strict=True))


def _in_dtype(scalars: tuple[Tensor, ...], p: Tensor) -> tuple[Tensor, ...]:
    dtype = accumulation_dtype(p.dtype)
    return tuple(s if s.dtype == dtype else s.to(dtype) for s in scalars)


def _mean_needed(group: dict[str, Any]) -> bool:
    """Whether the group's numerator is a per-tensor mean (a reduction before the update)."""
    return group["adaptive"] and group["num_lrc"] >= 2 and group["per_tensor"]


def _keep(group: dict[str, Any], key: str, value: Tensor, keep: Tensor | None) -> None:
    """Set a group statistic (in its dtype); on a skipped step (``keep`` False) the old value
    stays."""
    value = value.to(group[key].dtype)
    group[key] = value if keep is None else torch.where(keep, value, group[key])


def _keep_list(
    targets: list[Tensor], values: Tensor, previous: Tensor, keep: Tensor | None
) -> None:
    """Write the entries of ``values`` into the 0-d ``targets`` (the old ones when skipped)."""
    if keep is not None:
        values = torch.where(keep, values, previous)
    torch._foreach_copy_(targets, list(values.unbind()))
