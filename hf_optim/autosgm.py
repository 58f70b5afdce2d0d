r"""AutoSGM: a first-order low-pass filter on the gradient with an iteration-dependent
learning rate.

Paper and code: O. Somefun et al., "AutoSGM: a unifying framework for accelerated learning"
(https://somefunagba.github.io/asgm), upstream ``somefunAgba/autosgm`` file ``asgm.py``. This
module implements the seed-era algorithm (upstream commit ``07b5e79``, whose README is the seed
document) from its described behaviour, accepting both its configuration tuples and readable
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
  ``cfact`` in {0, 1, 2} (``cfact>2`` stacked sub-window staircases, undocumented in the seed).
* ``polynomial`` (``rcm=4``) is :math:`(1-f^n)^2`, as the seed code computes it.
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

Three paths compute the same update (the tests hold them equal in float64):
``_single_tensor_autosgm``, the readable reference (``foreach=False``);
``_multi_tensor_autosgm``, ``torch._foreach_*`` ops, used off CPU, under ``torch.compile`` and
for small tensors on CPU; ``_blocked_autosgm``, the CPU default for larger tensors, which sweeps
each tensor in cache-sized blocks with
preallocated scratch buffers (the numerators of ``num_lrc`` 3 and 4 take ~30 elementwise
operations; in cache and without temporaries they cost about a third of what they cost as whole-
tensor passes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_choice, check_range
from ._reduce import accumulation_dtype, finish_sums, tensor_sums

__all__ = ["AutoSGM", "WINDOWS", "window_factor"]

#: Window shapes, in the order of upstream's ``rc_cfg[0]`` codes (``rcm``).
WINDOWS = ("none", "cosine", "linear", "beta_exp", "polynomial", "logistic", "logistic_late")

#: The per-element state of each numerator estimate.
_NUMERATOR_KEYS = {
    2: ("corr",),
    3: ("corr", "weight_sq", "corr_scale"),
    4: ("corr", "weight_sq", "corr_scale", "corr_var"),
}

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


# -- the optimizer -----------------------------------------------------------------------------
class AutoSGM(HFOptimizer):
    r"""AutoSGM: low-pass-filter momentum, a moment-estimator denominator and an
    iteration-dependent learning-rate numerator, with an optional window schedule.

    Give the configuration either as readable keywords or as upstream's tuples (``lr_cfg``,
    ``beta_cfg``, ``rc_cfg``, ``wd_cfg``, ``eps_cfg``, ``miscs``); a tuple and a keyword that
    disagree are an error. Unset keywords take the defaults of upstream.

    Args:
        params: parameters or param-group dicts (groups may use the same keywords or tuples).
        lr: :math:`\mu`, the learning rate (``lr_cfg[1]``). Read from the group every step.
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
        foreach: use the multi-tensor path (default) or the single-tensor reference loop.
        lr_cfg, beta_cfg, rc_cfg, wd_cfg, eps_cfg, miscs: upstream's tuples (see above).
        debug: accepted for upstream compatibility; only ``False``.
    """

    statistic_keys = ("lr_effective", "window_factor")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
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
        foreach: bool | None = None,
        lr_cfg: tuple | None = None,
        beta_cfg: tuple | None = None,
        rc_cfg: tuple | None = None,
        wd_cfg: tuple | None = None,
        eps_cfg: tuple | None = None,
        miscs: tuple | None = None,
        debug: bool = False,
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
        defaults["foreach"] = foreach
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
        super().add_param_group(param_group)
        # the group now holds every default; store the canonical values
        self.param_groups[-1].update(normalized)

    def init(self) -> None:
        """Accepted for code written for upstream, whose ``init()`` pre-created the state.
        State here is created lazily at a parameter's first step, so this does nothing."""

    # -- the step ----------------------------------------------------------------------
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        dtype = accumulation_dtype(p.dtype)

        def buffer(key: str) -> None:
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        buffer("momentum")
        if group["adaptive"]:
            buffer("exp_avg_sq")
            num_lrc = group["num_lrc"]
            for key in _NUMERATOR_KEYS.get(num_lrc, ()):
                buffer(key)
            if num_lrc >= 2 and "numerator" not in state:
                if group["per_tensor"]:
                    state["numerator"] = torch.zeros((), dtype=dtype, device=p.device)
                else:
                    buffer("numerator")
        return state

    def _step(self, loss: Any) -> None:
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            states: list[dict[str, Tensor]] = []
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AutoSGM does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                states.append(self._init_state(p, group))
            if not params:
                continue
            device = params[0].device
            if "step" not in group:
                group["step"] = torch.zeros((), dtype=torch.float32, device=device)
            elif group["step"].device != device:
                group["step"] = group["step"].to(device)
            group["step"] += 1
            factor = window_factor(group["step"], group)
            if not self._use_foreach(group):
                numerators = _single_tensor_autosgm(params, grads, states, group, factor)
            elif _use_blocks(params):
                # large tensors in cache-sized blocks, small ones together with foreach ops
                numerators = torch.cat(
                    [
                        path([params[i] for i in part], [grads[i] for i in part],
                             [states[i] for i in part], group, factor)
                        for path, part in _split_by_size(params)
                    ]
                )  # fmt: skip
            else:
                numerators = _multi_tensor_autosgm(params, grads, states, group, factor)
            group["window_factor"] = factor
            group["lr_effective"] = numerators.mean()


def _filter_gains(group: dict[str, Any]) -> tuple[float, float]:
    """Input gains of the momentum and second-moment filters (0 selects 1 - pole)."""
    eta = group["eta_i"]
    return (eta or 1.0 - group["beta_i"]), (eta or 1.0 - group["beta_a"])


def _debias(step: Tensor, beta: float, eta: float) -> Tensor:
    return ((1.0 - beta) / eta) / (1.0 - torch.pow(beta, step))


def _tukey(d: Tensor) -> Tensor:
    d = d.clamp(max=1.0)
    return (1.0 - d * d).square() * d


def _per_tensor_mean(tensor: Tensor) -> Tensor:
    # a per-tensor reduction: under sharding the partial sums are finished across shards
    return finish_sums(tensor_sums([tensor]))[0] / tensor.numel()


# -- the single-tensor reference ---------------------------------------------------------------
def _single_tensor_autosgm(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    factor: Tensor,
) -> Tensor:
    """The readable reference: one tensor at a time, the math as in the module docstring."""
    lr, num_lrc, adaptive = group["lr"], group["num_lrc"], group["adaptive"]
    beta_n, beta_a, beta_i, gamma = (group[k] for k in ("beta_n", "beta_a", "beta_i", "gamma"))
    weight_decay, eps = group["weight_decay"], group["eps"]
    eta_m, eta_a = _filter_gains(group)
    numerators: list[Tensor] = []
    for param, grad, state in zip(params, grads, states, strict=True):
        dtype = accumulation_dtype(param.dtype)
        w = param.to(dtype)
        g = grad.to(dtype)
        g = -g if group["maximize"] else g
        if weight_decay != 0.0 and not group["decoupled"]:
            g = g + weight_decay * w
        step = state["step"]
        step += 1
        t = step.to(dtype)

        if adaptive:
            second = state["exp_avg_sq"]
            second.mul_(beta_a).addcmul_(g, g, value=eta_a)
            v_hat = second * _debias(t, beta_a, eta_a) if group["debias"] else second
            if group["eps_inside_sqrt"]:
                v_hat = v_hat + eps
            d = v_hat.sqrt() + eps
        else:
            d = torch.ones_like(g)

        momentum = state["momentum"]
        previous = momentum.clone()
        momentum.mul_(beta_i).add_(g, alpha=eta_m)
        filtered = (momentum - gamma * previous) / (1.0 - gamma)
        if group["debias"]:
            filtered = filtered * _debias(t, beta_i, eta_m)
        update = filtered / d

        if adaptive and num_lrc >= 2:
            numerator = _reference_numerator(w, g / d, d, state, group)
        else:
            numerator = torch.full((), lr, dtype=dtype, device=param.device)
        numerators.append(numerator.mean() if numerator.ndim else numerator)

        if weight_decay != 0.0 and group["decoupled"]:
            update = update + (1.0 - beta_i) / (1.0 - gamma) * weight_decay * w
        param.copy_(w - factor.to(dtype) * numerator * update)
    return factor * torch.stack(numerators)


def _reference_numerator(
    w: Tensor, g_normalized: Tensor, d: Tensor, state: dict[str, Tensor], group: dict[str, Any]
) -> Tensor:
    lr, num_lrc, beta_n, eps = group["lr"], group["num_lrc"], group["beta_n"], group["eps"]
    corr = state["corr"]
    if num_lrc == 2:
        corr.mul_(beta_n).add_(lr * (w * w + g_normalized * g_normalized), alpha=1.0 - beta_n)
        estimate = corr.clamp(max=lr)
    else:
        weight_sq = state["weight_sq"]
        weight_sq.mul_(beta_n).add_(w * w, alpha=1.0 - beta_n)
        weight_power = beta_n * weight_sq if num_lrc == 3 else weight_sq
        lr_scaled = lr / (1.0 + weight_power)
        x = w * g_normalized
        if num_lrc == 3:
            magnitude = x.abs() + eps
            state["corr_scale"].mul_(beta_n).add_(magnitude, alpha=1.0 - beta_n)
            cap = group["cf"] * state["corr_scale"]
        else:
            state["corr_scale"].mul_(beta_n).add_(x, alpha=1.0 - beta_n)
            magnitude = (x - state["corr_scale"]).abs() + eps
            state["corr_var"].mul_(beta_n).add_(magnitude * magnitude, alpha=1.0 - beta_n)
            cap = state["corr_var"].sqrt() + eps
        robust = x / magnitude * torch.minimum(magnitude, cap)
        corr.mul_(beta_n).add_(lr_scaled * robust)
        low = _tukey(d) * lr_scaled
        high = lr_scaled * (1.0 + weight_power).square()
        estimate = torch.minimum(torch.maximum(corr.abs(), low), high)
    raw = _per_tensor_mean(estimate) if group["per_tensor"] else estimate
    numerator = state["numerator"]
    numerator.mul_(_NUMERATOR_POLE).add_(raw, alpha=1.0 - _NUMERATOR_POLE)
    return numerator


# -- the multi-tensor path ---------------------------------------------------------------------
def _prepare(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:
    """Advance the per-parameter counters; return the per-tensor scale F c1 / (1 - gamma)
    (without F) and the second moment's debias factors (None without debiasing)."""
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, 1.0)
    t = torch.stack(steps).to(accumulation_dtype(params[0].dtype))
    eta_m, eta_a = _filter_gains(group)
    if not group["debias"]:
        return torch.full_like(t, 1.0 / (1.0 - group["gamma"])), None
    scale = _debias(t, group["beta_i"], eta_m) / (1.0 - group["gamma"])
    return scale, _debias(t, group["beta_a"], eta_a)


def _multi_tensor_autosgm(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    factor: Tensor,
) -> Tensor:
    """The same update with ``torch._foreach_*`` ops, folding scalars to save passes."""
    lr, num_lrc, adaptive = group["lr"], group["num_lrc"], group["adaptive"]
    beta_a, beta_i, gamma = group["beta_a"], group["beta_i"], group["gamma"]
    weight_decay, eps = group["weight_decay"], group["eps"]
    eps_in = eps if group["eps_inside_sqrt"] else 0.0
    eta_m, eta_a = _filter_gains(group)
    device = params[0].device
    dtype = accumulation_dtype(params[0].dtype)
    count = len(params)
    low_precision = [p.dtype != accumulation_dtype(p.dtype) for p in params]
    ws = [p.to(accumulation_dtype(p.dtype)) for p in params]
    gs = [g.to(accumulation_dtype(g.dtype)) for g in grads]
    if group["maximize"]:
        gs = torch._foreach_neg(gs)
    if weight_decay != 0.0 and not group["decoupled"]:
        gs = torch._foreach_add(gs, ws, alpha=weight_decay)
    scale, c2 = _prepare(params, grads, states, group)
    scale = scale * factor.to(dtype)

    momenta = [state["momentum"] for state in states]
    if gamma != 0.0:
        # s_t / (1 - gamma) = a m_t + b g_t, since m_{t-1} = (m_t - eta g_t) / beta_i
        torch._foreach_mul_(momenta, beta_i)
        torch._foreach_add_(momenta, gs, alpha=eta_m)
        filtered = torch._foreach_mul(momenta, (beta_i - gamma) / beta_i)
        torch._foreach_add_(filtered, gs, alpha=gamma * eta_m / beta_i)
    else:
        if eta_m == 1.0 - beta_i:
            torch._foreach_lerp_(momenta, gs, eta_m)
        else:
            torch._foreach_mul_(momenta, beta_i)
            torch._foreach_add_(momenta, gs, alpha=eta_m)
        filtered = momenta

    elementwise = num_lrc >= 2 and not group["per_tensor"]
    per_tensor_numerator = torch.full((count,), lr, dtype=dtype, device=device)
    denoms = None
    if adaptive:
        seconds = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(seconds, beta_a)
        torch._foreach_addcmul_(seconds, gs, gs, value=eta_a)
        if num_lrc >= 2:
            # the numerator needs the true denominator d
            if c2 is not None:
                denoms = torch._foreach_mul(seconds, list(c2.unbind()))
                if eps_in:
                    torch._foreach_add_(denoms, eps_in)
            else:
                denoms = torch._foreach_add(seconds, eps_in)
            torch._foreach_sqrt_(denoms)
            torch._foreach_add_(denoms, eps)
            pieces = {key: [state[key] for state in states] for key in _NUMERATOR_KEYS[num_lrc]}
            estimates = _numerator_estimates(ws, gs, denoms, pieces, group)
            numerators = [state["numerator"] for state in states]
            if elementwise:
                torch._foreach_mul_(numerators, _NUMERATOR_POLE)
                torch._foreach_add_(numerators, estimates, alpha=1.0 - _NUMERATOR_POLE)
                estimates = numerators
            sums = finish_sums(tensor_sums(estimates, dtype))
            means = sums / torch.tensor([p.numel() for p in params], dtype=dtype, device=device)
            if elementwise:
                per_tensor_numerator = means  # for the statistic only
            else:
                torch._foreach_mul_(numerators, _NUMERATOR_POLE)
                torch._foreach_add_(numerators, list(means.unbind()), alpha=1.0 - _NUMERATOR_POLE)
                per_tensor_numerator = torch.stack(numerators)
        else:
            # d = sqrt(c2) (sqrt(b + eps_in / c2) + eps / sqrt(c2)): sqrt(c2) joins the scale
            if c2 is not None:
                denoms = torch._foreach_add(seconds, list((eps_in / c2).unbind()))
                torch._foreach_sqrt_(denoms)
                root_c2 = c2.sqrt()
                torch._foreach_add_(denoms, list((eps / root_c2).unbind()))
                scale = scale / root_c2
            else:
                denoms = torch._foreach_add(seconds, eps_in)
                torch._foreach_sqrt_(denoms)
                torch._foreach_add_(denoms, eps)

    if weight_decay != 0.0 and group["decoupled"]:
        decay = (1.0 - beta_i) / (1.0 - gamma) * weight_decay
        if elementwise:
            shrinks = [1.0 - factor.to(dtype) * decay * state["numerator"] for state in states]
        else:
            shrinks = list((1.0 - factor.to(dtype) * per_tensor_numerator * decay).unbind())
        torch._foreach_mul_(ws, shrinks)

    if elementwise:
        step_sizes = list(scale.unbind())
        torch._foreach_div_(denoms, [state["numerator"] for state in states])
    else:
        step_sizes = list((scale * per_tensor_numerator).unbind())
    if denoms is None:
        torch._foreach_addcmul_(ws, filtered, torch._foreach_neg(step_sizes))
    else:
        torch._foreach_div_(denoms, step_sizes)
        torch._foreach_addcdiv_(ws, filtered, denoms, value=-1.0)
    copies = [(p, w) for p, w, low in zip(params, ws, low_precision, strict=True) if low]
    if copies:
        torch._foreach_copy_([p for p, _ in copies], [w for _, w in copies])
    return factor.to(dtype) * per_tensor_numerator


# -- the cache-blocked CPU path ----------------------------------------------------------------
#: On CPU the fast path works through each tensor in blocks of this many elements with
#: preallocated scratch buffers, so that the numerator's ~30 elementwise operations run on data
#: that stays in cache and allocate nothing; torch's foreach kernels are no faster than a loop
#: on CPU. ``None`` selects the foreach path on CPU too.
_CPU_BLOCK: int | None = 1 << 16
#: Smaller tensors take the foreach path even on CPU.
_CPU_SMALL = 1 << 13


def _use_blocks(params: list[Tensor]) -> bool:
    # plain CPU tensors only: tensor subclasses (DTensor shards) keep the foreach path
    return (
        _CPU_BLOCK is not None
        and params[0].device.type == "cpu"
        and not torch.compiler.is_compiling()
        and all(type(p) in (Tensor, torch.nn.Parameter) for p in params)
    )


def _split_by_size(params: list[Tensor]) -> list[tuple[Any, list[int]]]:
    """(path, indices): the blocked path for tensors of at least ``_CPU_SMALL`` elements, the
    foreach path for the rest, whose per-tensor overhead it amortises."""
    large = [i for i, p in enumerate(params) if p.numel() >= _CPU_SMALL]
    small = [i for i, p in enumerate(params) if p.numel() < _CPU_SMALL]
    paths = [(_blocked_autosgm, large), (_multi_tensor_autosgm, small)]
    return [(path, part) for path, part in paths if part]


def _pieces(param: Tensor, grad: Tensor, block: int) -> list[slice | None]:
    """Flat slices of at most ``block`` elements, or the whole tensor (None)."""
    n = param.numel()
    if n <= block or not (param.is_contiguous() and grad.is_contiguous()):
        return [None]
    return [slice(s, min(s + block, n)) for s in range(0, n, block)]


def _blocked_autosgm(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    factor: Tensor,
) -> Tensor:
    """The same update, one cache-sized block at a time: a first sweep updates the second
    moment and the numerator's statistics, a second sweep filters and updates the weights."""
    lr, num_lrc, adaptive = group["lr"], group["num_lrc"], group["adaptive"]
    beta_a, beta_i, gamma = group["beta_a"], group["beta_i"], group["gamma"]
    weight_decay, eps = group["weight_decay"], group["eps"]
    eps_in = eps if group["eps_inside_sqrt"] else 0.0
    coupled = weight_decay != 0.0 and not group["decoupled"]
    eta_m, eta_a = _filter_gains(group)
    dtype = accumulation_dtype(params[0].dtype)
    device = params[0].device
    block = _CPU_BLOCK or 1
    pieces = [_pieces(p, g, block) for p, g in zip(params, grads, strict=True)]
    size = max(
        p.numel() if len(where) == 1 else block for p, where in zip(params, pieces, strict=True)
    )
    rows = torch.empty((8, size), dtype=dtype, device=device).unbind()
    scale, c2 = _prepare(params, grads, states, group)
    scale = scale * factor.to(dtype)
    c2_parts = c2.unbind() if c2 is not None else None
    two_sweeps = adaptive and num_lrc >= 2
    elementwise = two_sweeps and not group["per_tensor"]
    keys = ["exp_avg_sq", *_NUMERATOR_KEYS.get(num_lrc, ())]
    if elementwise:
        keys.append("numerator")

    def views(tensor: Tensor, wheres: list[slice | None]) -> list[Tensor]:
        if wheres == [None]:
            return [tensor]
        flat = tensor.view(-1)
        return [flat[where] for where in wheres]

    scratch: dict[tuple[int, ...], list[Tensor]] = {}

    def buffers(like: Tensor) -> list[Tensor]:
        # views of the scratch rows shaped like one piece, reused by pieces of that shape
        shape = tuple(like.shape)
        if shape not in scratch:
            scratch[shape] = [row[: like.numel()].view(shape) for row in rows]
        return scratch[shape]

    def gradient(g: Tensor, w: Tensor, out: Tensor) -> Tensor:
        if group["maximize"]:
            g = torch.neg(g, out=out)
        elif g.dtype != dtype:
            g = out.copy_(g)
        if coupled:
            g = torch.add(g, w, alpha=weight_decay, out=out)
        return g

    def denominator(second: Tensor, index: int, out: Tensor) -> Tensor:
        if c2_parts is not None:
            d = torch.mul(second, c2_parts[index], out=out)
            if eps_in:
                d.add_(eps_in)
        else:
            d = torch.add(second, eps_in, out=out)
        return d.sqrt_().add_(eps)

    # first sweep: second moment and numerator statistics (num_lrc 2, 3, 4)
    per_tensor_numerator = torch.full((len(params),), lr, dtype=dtype, device=device)
    if two_sweeps:
        sums = []
        for index, state in enumerate(states):
            where = pieces[index]
            state_views = {key: views(state[key], where) for key in keys}
            piece_sums = []
            for part, (p, g) in enumerate(
                zip(views(params[index], where), views(grads[index], where), strict=True)
            ):
                buf = buffers(p)
                w = p if p.dtype == dtype else buf[0].copy_(p)
                g = gradient(g, w, buf[1])
                piece = {key: state_views[key][part] for key in keys}
                second = piece["exp_avg_sq"]
                second.mul_(beta_a).addcmul_(g, g, value=eta_a)
                d = denominator(second, index, buf[2])
                estimate = _block_numerator_estimate(w, g, d, piece, buf[3:], group)
                if elementwise:
                    numerator = piece["numerator"]
                    numerator.mul_(_NUMERATOR_POLE).add_(estimate, alpha=1.0 - _NUMERATOR_POLE)
                    estimate = numerator
                piece_sums.append(estimate.sum(dtype=dtype))
            sums.append(piece_sums[0] if len(piece_sums) == 1 else torch.stack(piece_sums).sum())
        means = finish_sums(torch.stack(sums)) / torch.tensor(
            [p.numel() for p in params], dtype=dtype, device=device
        )
        if elementwise:
            per_tensor_numerator = means  # for the statistic only
        else:
            numerators = [state["numerator"] for state in states]
            torch._foreach_mul_(numerators, _NUMERATOR_POLE)
            torch._foreach_add_(numerators, list(means.unbind()), alpha=1.0 - _NUMERATOR_POLE)
            per_tensor_numerator = torch.stack(numerators)

    # second sweep: filter, (second moment), decay and update
    decay = (1.0 - beta_i) / (1.0 - gamma) * weight_decay if group["decoupled"] else 0.0
    step_sizes = (scale if elementwise else scale * per_tensor_numerator).unbind()
    shrinks = (1.0 - factor.to(dtype) * decay * per_tensor_numerator).unbind()
    for index, state in enumerate(states):
        where = pieces[index]
        momenta = views(state["momentum"], where)
        seconds = views(state["exp_avg_sq"], where) if adaptive else momenta
        numerators = views(state["numerator"], where) if elementwise else momenta
        for part, (p, g) in enumerate(
            zip(views(params[index], where), views(grads[index], where), strict=True)
        ):
            buf = buffers(p)
            w = p if p.dtype == dtype else buf[0].copy_(p)
            g = gradient(g, w, buf[1])
            momentum = momenta[part]
            if gamma != 0.0:
                momentum.mul_(beta_i).add_(g, alpha=eta_m)
                filtered = torch.mul(momentum, (beta_i - gamma) / beta_i, out=buf[3])
                filtered.add_(g, alpha=gamma * eta_m / beta_i)
            elif eta_m == 1.0 - beta_i:
                filtered = momentum.lerp_(g, eta_m)
            else:
                filtered = momentum.mul_(beta_i).add_(g, alpha=eta_m)
            if decay:
                if elementwise:
                    shrink = torch.mul(numerators[part], factor.to(dtype) * -decay, out=buf[4])
                    w.mul_(shrink.add_(1.0))
                else:
                    w.mul_(shrinks[index])
            if adaptive:
                second = seconds[part]
                if not two_sweeps:
                    second.mul_(beta_a).addcmul_(g, g, value=eta_a)
                d = denominator(second, index, buf[2])
                if elementwise:
                    d.div_(numerators[part])
                w.addcdiv_(filtered, d.div_(step_sizes[index]), value=-1.0)
            else:
                w.addcmul_(filtered, step_sizes[index], value=-1.0)
            if w is not p:
                p.copy_(w)
    return factor.to(dtype) * per_tensor_numerator


def _block_numerator_estimate(
    w: Tensor,
    g: Tensor,
    d: Tensor,
    state: dict[str, Tensor],
    scratch: list[Tensor],
    group: dict[str, Any],
) -> Tensor:
    """One block of the numerator's EMAs (num_lrc 2, 3, 4); returns the clipped estimate,
    written into the scratch buffers."""
    lr, num_lrc, beta_n, eps = group["lr"], group["num_lrc"], group["beta_n"], group["eps"]
    work, magnitude, robust, one_plus, low = scratch[:5]
    corr = state["corr"]
    torch.div(g, d, out=work)  # the normalised gradient
    if num_lrc == 2:
        work.square_().addcmul_(w, w)
        corr.mul_(beta_n).add_(work, alpha=(1.0 - beta_n) * lr)
        return torch.clamp(corr, max=lr, out=robust)
    weight_sq, scale = state["weight_sq"], state["corr_scale"]
    weight_sq.mul_(beta_n).addcmul_(w, w, value=1.0 - beta_n)
    work.mul_(w)  # x = w * g / d
    cf = group["cf"] if num_lrc == 3 else 1.0
    if num_lrc == 3:
        torch.abs(work, out=magnitude).add_(eps)
        scale.lerp_(magnitude, 1.0 - beta_n)
        torch.div(scale, magnitude, out=robust)
    else:
        scale.lerp_(work, 1.0 - beta_n)
        torch.sub(work, scale, out=magnitude).abs_().add_(eps)
        variance = state["corr_var"]
        variance.mul_(beta_n).addcmul_(magnitude, magnitude, value=1.0 - beta_n)
        torch.sqrt(variance, out=robust).add_(eps).div_(magnitude)
    robust.clamp_(max=1.0 / cf).mul_(work)  # h / cf
    one, zero = d.new_ones(()), d.new_zeros(())
    torch.add(one, weight_sq, alpha=beta_n if num_lrc == 3 else 1.0, out=one_plus)
    corr.mul_(beta_n).addcdiv_(robust, one_plus, value=lr * cf)
    clipped = torch.clamp(d, max=1.0, out=magnitude)
    torch.mul(clipped, clipped, out=low).sub_(1.0).square_().mul_(clipped)
    torch.addcdiv(zero, low, one_plus, value=lr, out=low)
    one_plus.mul_(lr)
    estimate = torch.abs(corr, out=robust)
    return torch.clamp(estimate, min=low, max=one_plus, out=estimate)


def _numerator_estimates(
    ws: list[Tensor],
    gs: list[Tensor],
    denom: list[Tensor],
    piece: dict[str, list[Tensor]],
    group: dict[str, Any],
) -> list[Tensor]:
    """Update the numerator's EMAs (num_lrc 2, 3, 4) and return the clipped estimates."""
    lr, num_lrc, beta_n, eps = group["lr"], group["num_lrc"], group["beta_n"], group["eps"]
    corrs = piece["corr"]
    work = torch._foreach_div(gs, denom)  # the normalised gradient
    if num_lrc == 2:
        torch._foreach_mul_(work, work)
        torch._foreach_addcmul_(work, ws, ws)
        torch._foreach_mul_(corrs, beta_n)
        torch._foreach_add_(corrs, work, alpha=(1.0 - beta_n) * lr)
        return torch._foreach_clamp_max(corrs, lr)
    weight_sqs, scales = piece["weight_sq"], piece["corr_scale"]
    torch._foreach_mul_(weight_sqs, beta_n)
    torch._foreach_addcmul_(weight_sqs, ws, ws, value=1.0 - beta_n)
    torch._foreach_mul_(work, ws)  # x = w * g / d
    cf = group["cf"] if num_lrc == 3 else 1.0
    if num_lrc == 3:
        magnitude = torch._foreach_abs(work)
        torch._foreach_add_(magnitude, eps)
        torch._foreach_lerp_(scales, magnitude, 1.0 - beta_n)
        robust = torch._foreach_div(scales, magnitude)
    else:
        variances = piece["corr_var"]
        torch._foreach_lerp_(scales, work, 1.0 - beta_n)
        magnitude = torch._foreach_sub(work, scales)
        torch._foreach_abs_(magnitude)
        torch._foreach_add_(magnitude, eps)
        torch._foreach_mul_(variances, beta_n)
        torch._foreach_addcmul_(variances, magnitude, magnitude, value=1.0 - beta_n)
        robust = torch._foreach_sqrt(variances)
        torch._foreach_add_(robust, eps)
        torch._foreach_div_(robust, magnitude)
    # h / cf = x min(1 / cf, scale / magnitude)
    torch._foreach_clamp_max_(robust, 1.0 / cf)
    torch._foreach_mul_(robust, work)
    # 1 + W, with W = beta_n q (num_lrc 3) or q (num_lrc 4)
    one_plus = torch._foreach_mul(weight_sqs, beta_n if num_lrc == 3 else 1.0)
    torch._foreach_add_(one_plus, 1.0)
    torch._foreach_mul_(corrs, beta_n)
    torch._foreach_addcdiv_(corrs, robust, one_plus, value=lr * cf)
    # clip |p| to [tukey(d) lr / (1 + W), lr (1 + W)], tukey(d) = (min(d, 1)^2 - 1)^2 min(d, 1)
    clipped = torch._foreach_clamp_max(denom, 1.0)
    low = torch._foreach_mul(clipped, clipped)
    torch._foreach_sub_(low, 1.0)
    torch._foreach_mul_(low, low)
    torch._foreach_mul_(low, clipped)
    torch._foreach_div_(low, one_plus)
    torch._foreach_mul_(low, lr)
    torch._foreach_mul_(one_plus, lr)
    estimates = torch._foreach_abs(corrs)
    torch._foreach_maximum_(estimates, low)
    torch._foreach_minimum_(estimates, one_plus)
    return estimates
