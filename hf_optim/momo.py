r"""Momo: SGD with momentum and a Polyak-type adaptive step size built from the loss.

Paper: Fabian Schaipp, Ruben Ohana, Michael Eickenberg, Aaron Defazio, Robert M. Gower,
"MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024, arXiv:2305.07583.
Original code: ``momo-opt`` 0.1.0, whose trajectories this module reproduces to float
tolerance.

The update (step :math:`k`, momentum :math:`\beta`, cap :math:`\alpha` = ``lr``, weight decay
:math:`\lambda`, lower bound :math:`\ell` = ``lb``, loss :math:`f_k`, gradient :math:`g_k`):

.. math::

    d_k &= \beta d_{k-1} + (1-\beta) g_k, \qquad
    \gamma_k = \beta \gamma_{k-1} + (1-\beta) \langle g_k, x_k \rangle, \qquad
    \bar f_k = \beta \bar f_{k-1} + (1-\beta) f_k \\
    \rho_k &= 1 - \beta^k \text{ (bias\_correction) else } 1, \qquad c = 1 + \alpha\lambda \\
    \tau_k &= \min\Big(\frac{\alpha}{\rho_k},
        \frac{\big(c(\bar f_k - \rho_k \ell) + \langle d_k, x_k\rangle - c\,\gamma_k\big)_+}
             {\lVert d_k \rVert^2}\Big) \\
    x_{k+1} &= \frac{x_k - \tau_k d_k}{c}

:math:`\langle d_k, x_k\rangle`, :math:`\gamma_k` and :math:`\lVert d_k\rVert^2` are sums over
*all* parameters of all groups; :math:`\alpha`, :math:`\lambda` and so :math:`\tau_k` are per
group. Without bias correction the averages start at the first values
(:math:`d_1 = g_1`, :math:`\gamma_1 = \langle g_1, x_1\rangle`, :math:`\bar f_1 = f_1`); with it
they start at zero. With ``use_fstar=True`` the lower bound is estimated online:
before the step, if :math:`h = c\bar f_k + \langle d_k, x_k\rangle - c\gamma_k < c\rho_k\ell`
then :math:`\ell \leftarrow \max(h / (2c\rho_k), \ell_0)`; after it,
:math:`\ell \leftarrow \max\big((\bar f_k + \langle d_k, x_k\rangle - \gamma_k
- \tfrac12\tau_k\lVert d_k\rVert^2)/\rho_k, \ell_0\big)`.

How it runs. Each step has two per-tensor kernels around one reduction:

1. :func:`_momo_moments` reads :math:`x`, :math:`g` and :math:`d`, forms the new :math:`d`,
   writes it (unless a step may still be skipped, below) and returns the tensor's
   :math:`[\langle x, g\rangle, \langle x, d\rangle, \lVert d\rVert^2]`;
2. the rows of all tensors are stacked and finished by one
   :func:`~hf_optim._reduce.finish_sums` call (one all-reduce under sharding); :math:`\gamma`,
   :math:`\bar f` and the per-group :math:`\tau` are computed on the device;
3. :func:`_momo_update` reads :math:`x` and :math:`d` and writes :math:`x`.

That is 28 bytes of memory traffic per float32 parameter per step in two passes, as fused
AdamW's 28 in one, but 20 of them reads against AdamW's 16 (on CPU, where a pass costs about
what it reads, 1.25x). A non-finite loss is known before phase 1, so its skip needs no other
shape. With ``skip_nonfinite=True`` whether the gradients are finite is known only after
phase 1, so that pass writes nothing and the update forms :math:`d` again from :math:`g` (32
bytes, 24 read). ``implementation="compiled"`` (the default where a compiler works) runs both
kernels through ``torch.compile``; ``"eager"`` runs the same functions as written. Compiled,
each phase runs 8 tensors per compiled call (:meth:`hf_optim._kernels.Kernel.map`): one call
costs more Python than a small tensor's arithmetic.

Deviations from momo-opt 0.1.0, and why:

* The step count, the loss average :math:`\bar f`, the lower-bound estimate, the last step
  sizes and the count of skipped steps live in the param-group dicts (``step``, ``loss_avg``,
  ``fstar``, ``tau``, ``skipped_steps``; the same values in every group, because they are
  global to the model) and so in ``state_dict()``. Upstream keeps them as attributes and a
  resumed run starts over at step 1, overwriting the loaded averages.
* ``beta``, ``lb``, ``bias_correction`` and ``use_fstar`` are param-group entries (upstream:
  optimizer attributes), so they are saved and can be read by schedulers and loggers. With
  equal values in every group (the only case upstream defines) the mathematics is upstream's.
  If groups differ: each parameter's averages use its group's ``beta``; the loss average
  uses the last group's ``beta`` and ``bias_correction`` (upstream MomoAdam's convention);
  the estimate ``fstar`` starts at the first group's ``lb`` and runs through the groups in
  order as upstream's attribute does; a group without ``use_fstar`` uses its own ``lb``.
* ``beta`` must be below 1 (upstream allows 1, which never moves the averages off their first
  value and so repeats the first step forever).
* The state of every parameter exists before its first gradient (torch.distributed.checkpoint
  creates it that way), so "start at the first value" is the weight 1 instead of
  :math:`1-\beta` in the first step of the run. Parameters without a gradient are skipped
  (upstream crashes on them); one whose first gradient comes later starts its averages from
  zero, like an average with bias correction.
* Each parameter's :math:`\langle g, x\rangle` is summed over the whole tensor before it enters
  :math:`\gamma` (under sharding: over all ranks), so :math:`\gamma` is the same on every rank
  and a sharded checkpoint holds the single-process value. Inner products and norms are
  summed in float32 (float64 for float64 parameters) whatever the parameter dtype, and each
  parameter's :math:`\langle d, x\rangle - \gamma` is formed before the sum over parameters,
  so the Polyak numerator (a small difference of large sums) keeps its precision. Upstream
  sums in the parameter dtype, which gives meaningless step sizes for bfloat16 parameters.
* The step size is computed on the device with ``torch.where``/``clamp``: no ``.item()``, no
  Python comparison of tensors, so ``step()`` never waits for the device and compiles
  without graph breaks. Upstream synchronises 1 to 5 times per group per step.
* A zero norm :math:`\lVert d_k\rVert = 0` gives :math:`\tau_k = 0` (upstream: 0/0, then
  ``min`` returns the cap). The parameters move identically (:math:`d_k = 0`); only the
  logged step size differs. A NaN numerator gives the cap :math:`\alpha/\rho_k`, as upstream.
* A non-finite loss skips the step whatever ``skip_nonfinite`` says: parameters, averages,
  :math:`\bar f`, counters and ``tau`` stay as they were and ``skipped_steps`` counts it.
  Upstream lets the NaN into :math:`\bar f` for good, after which every step is the cap,
  i.e. plain SGD with momentum at ``lr`` (a batch whose labels are all ignored gives such a
  loss with finite, zero gradients). With ``skip_nonfinite=True`` a step whose gradients
  are not all finite is skipped the same way (decided on the device from the step's sums,
  which are non-finite exactly when a gradient is, or when they overflow). The step is
  global, so one group asking for it skips the whole step.
* Complex parameters are optimised as their ``torch.view_as_real`` views (torch's convention).
* The loss may also come from a closure or :meth:`set_loss`, and may be a Python float.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_flag, check_range
from ._kernels import kernel, wide_sum
from ._reduce import accumulation_dtype, counts, finish_sums, local, reduction_group

__all__ = ["Momo"]

#: param-group entries that are Momo/MomoAdam state (equal in every group but ``tau``)
GROUP_STATE_KEYS = ("step", "loss_avg", "fstar", "tau", "skipped_steps")
STATISTIC_KEYS = ("tau", "loss_avg", "fstar", "skipped_steps")


# -- the per-tensor kernels --------------------------------------------------------------------
def _wide(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _momo_average(grad, grad_avg, weight):
    """:math:`d = \\mathrm{lerp}(d, g, w)`, formed in float32 (float64 for float64) and
    rounded to the state's dtype once."""
    wide = _wide(grad)
    return torch.lerp(grad_avg.to(wide), grad.to(wide), weight.to(wide)).to(grad_avg.dtype)


#: a value used by both a store and a sum becomes a buffer where it is computed, which lets
#: inductor's C++ backend do phase 1's store of ``d`` and its sums in one loop (two otherwise)
_ONE_LOOP = {"realize_reads_threshold": 0}


@kernel(cpu_options=_ONE_LOOP)
def _momo_moments(param, grad, grad_avg, weight, ok, store):
    """Phase 1 for one tensor: the tensor's :math:`[\\langle x, g\\rangle,
    \\langle x, d\\rangle, \\lVert d\\rVert^2]` with this step's :math:`d`, in float32
    (float64 for float64), each summed by :func:`wide_sum`. With ``store`` the new :math:`d`
    is also written (where ``ok``); otherwise nothing is."""
    wide = _wide(param)
    average = _momo_average(grad, grad_avg, weight)
    if store:
        grad_avg.copy_(torch.where(ok, average, grad_avg))
    x, g, d = param.to(wide), grad.to(wide), average.to(wide)
    return torch.stack([wide_sum(x * g), wide_sum(x * d), wide_sum(d * d)])


@kernel
def _momo_update(param, grad, grad_avg, weight, tau, shrink, ok, stored):
    """Phase 2 for one tensor: :math:`x \\leftarrow (x - \\tau d) / c`, with the :math:`d`
    phase 1 ``stored``, or else formed again here and written. Nothing changes where ``ok`` is
    false."""
    wide = _wide(param)
    if stored:
        average = grad_avg
    else:
        average = _momo_average(grad, grad_avg, weight)
        grad_avg.copy_(torch.where(ok, average, grad_avg))
    new = (param.to(wide) - tau.to(wide) * average.to(wide)) / shrink.to(wide)
    param.copy_(torch.where(ok, new.to(param.dtype), param))


# -- what Momo and MomoAdam share: gathering, the global statistics, the Polyak step ------------
def _real(t: Tensor) -> Tensor:
    """The local piece of ``t``, complex tensors as their real view."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def _real_dtype(p: Tensor) -> torch.dtype:
    return p.real.dtype if p.is_complex() else p.dtype


def _active_params(optimizer: HFOptimizer, name: str) -> list[list[Tensor]]:
    """Per group, the parameters with a gradient, each with its state created."""
    active = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if not optimizer.state.get(p):
                optimizer._init_param_state(group, p)
            params.append(p)
        active.append(params)
    return active


def _statistics_dtype(params: Iterable[Tensor]) -> torch.dtype:
    return torch.float64 if any(_real_dtype(p) == torch.float64 for p in params) else torch.float32


def _add_group_state(optimizer: HFOptimizer, group: dict[str, Any]) -> None:
    """The global entries of a run that has not started, in a new group: step 0, loss average
    0, no skipped step, and (with ``use_fstar``) the first group's ``lb`` as the estimate.
    Created with the group, not at the first step: torch.distributed.checkpoint restores only
    the entries present after its state-initialising step (which must leave groups unchanged),
    so entries made later would silently not be restored on resume."""
    params = [local(p) for p in group["params"]]
    device = params[0].device if params else torch.device("cpu")
    dtype = _statistics_dtype(params)
    for key, value_dtype in (("step", torch.float32), ("loss_avg", dtype)):
        if not isinstance(group.get(key), Tensor):
            group[key] = torch.tensor(float(group.get(key) or 0), dtype=value_dtype, device=device)
    if not isinstance(group.get("skipped_steps"), Tensor):
        group["skipped_steps"] = torch.zeros((), dtype=torch.float32, device=device)
    if group["use_fstar"] and not isinstance(group.get("fstar"), Tensor):
        lb = float(optimizer.param_groups[0]["lb"])
        group["fstar"] = torch.full((), lb, dtype=dtype, device=device)


def _global_state(groups: list[dict[str, Any]], like: Tensor) -> dict[str, Tensor]:
    """The previous step's global entries (from the first group that has them), or those of a
    run that has not started: step 0, loss average 0, lower bound ``lb`` of the first group."""
    for group in groups:
        if "step" in group:
            entries = {key: group[key] for key in ("step", "loss_avg")}
            # groups of different dtypes: the statistics run in the widest
            entries["loss_avg"] = entries["loss_avg"].to(like.dtype)
            # checkpoints of earlier versions have no skip count
            entries["skipped_steps"] = group.get("skipped_steps")
            if entries["skipped_steps"] is None:
                entries["skipped_steps"] = torch.zeros_like(group["step"], dtype=torch.float32)
            # every group carries the same estimate once stepped; before, only use_fstar ones
            fstar = next((g["fstar"] for g in groups if "fstar" in g), None)
            entries["fstar"] = None if fstar is None else fstar.to(like.dtype)
            break
    else:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        entries = {
            "step": torch.zeros((), dtype=torch.float32, device=like.device),
            "loss_avg": zero,
            "skipped_steps": torch.zeros((), dtype=torch.float32, device=like.device),
            "fstar": None,
        }
    if entries["fstar"] is None:
        entries["fstar"] = torch.full(
            (), float(groups[0]["lb"]), dtype=like.dtype, device=like.device
        )
    entries["taus"] = [group.get("tau") for group in groups]
    return entries


def _finish_rows(rows: list[Tensor], params: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The per-tensor rows as one (tensors, 3) tensor summed over ranks: one collective.
    Rows of replicas another rank counts are zeros here."""
    process_group = reduction_group(params)
    rows = [
        row.to(dtype) if counts(p, process_group) else torch.zeros_like(row, dtype=dtype)
        for row, p in zip(rows, params, strict=True)
    ]
    device = rows[0].device
    return finish_sums(torch.stack([row.to(device) for row in rows]), process_group)


def _new_gammas(
    optimizer: HFOptimizer,
    active: list[list[Tensor]],
    sums: Tensor,
    weights: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """Each parameter's :math:`\\gamma \\leftarrow \\mathrm{lerp}(\\gamma, \\langle x, g\\rangle,
    w)` from the finished rows, with its group's weight ``w``, as one vector; and the previous
    :math:`\\gamma` as one vector (what a skipped step keeps)."""
    dtype = sums.dtype
    params = [p for group_params in active for p in group_params]
    previous = torch.stack([optimizer.state[p]["grad_dot_w"].to(dtype) for p in params])
    pieces, start = [], 0
    for group_params, weight in zip(active, weights, strict=True):
        end = start + len(group_params)
        if end > start:
            pieces.append(torch.lerp(previous[start:end], sums[start:end, 0], weight.to(dtype)))
        start = end
    return torch.cat(pieces), previous


def _polyak_step_sizes(
    optimizer: HFOptimizer,
    groups: list[dict[str, Any]],
    rhos: Sequence[Tensor | float],
    loss_avg: Tensor,
    totals: Tensor,
    fstar: Tensor,
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]], Tensor]:
    """Per-group step sizes :math:`\\tau`, per-group (lr, weight_decay) tensors, and the
    updated lower-bound estimate.

    ``totals`` holds the global :math:`[\\sum(\\langle d, x\\rangle - \\gamma), \\sum\\gamma,
    \\lVert d\\rVert^2]`. Groups are visited in order, as upstream's attribute ``lb`` is, so
    the estimate updated by one group feeds the next. Everything stays on the device.
    """
    dot_minus_gamma, gamma, norm = totals[0], totals[1], totals[2]
    taus, rates = [], []
    for group, rho in zip(groups, rhos, strict=True):
        lr = optimizer._scalar(group, "lr", loss_avg)
        weight_decay = optimizer._scalar(group, "weight_decay", loss_avg)
        decay = lr * weight_decay
        shrink = 1.0 + decay
        # c*f + <d,x> - c*gamma, written so that the large <d,x> - gamma cancels first
        model_gap = shrink * loss_avg + dot_minus_gamma - decay * gamma
        if group["use_fstar"]:
            reset = model_gap < shrink * rho * fstar
            estimate = (model_gap / (2.0 * shrink * rho)).clamp(min=group["lb"])
            fstar = torch.where(reset, estimate, fstar)
            lower_bound = fstar
        else:
            lower_bound = group["lb"]
        numerator = model_gap - shrink * rho * lower_bound
        polyak = torch.where(norm > 0, numerator.clamp(min=0.0) / norm, torch.zeros_like(norm))
        cap = lr / rho
        # min(cap, polyak) that returns the cap when polyak is NaN, as Python's min does
        tau = torch.where(polyak < cap, polyak, cap)
        if group["use_fstar"]:
            fit = (loss_avg + dot_minus_gamma - 0.5 * tau * norm) / rho
            fstar = fit.clamp(min=group["lb"])
        taus.append(tau)
        rates.append((lr, weight_decay))
    return taus, rates, fstar


def _skip_decision(groups: list[dict[str, Any]], loss_finite: Tensor, rows: Tensor) -> Tensor:
    """Whether this step runs (0-d bool): the loss is finite and, where a group asks for
    ``skip_nonfinite``, so is every sum of the step (non-finite exactly when a gradient is)."""
    ok = loss_finite
    if any(group["skip_nonfinite"] for group in groups):
        ok = ok & torch.isfinite(rows).all()
    return ok


def _store_global_state(
    groups: list[dict[str, Any]],
    previous: dict[str, Tensor],
    ok: Tensor,
    loss_avg: Tensor,
    fstar: Tensor,
    taus: list[Tensor],
) -> None:
    """New tensors every step (never in place), so a loaded state_dict is never written into;
    a skipped step keeps every previous value and counts itself."""
    step = torch.where(ok, previous["step"] + 1, previous["step"])
    loss_avg = torch.where(ok, loss_avg, previous["loss_avg"])
    fstar = torch.where(ok, fstar, previous["fstar"])
    skipped = torch.where(ok, previous["skipped_steps"], previous["skipped_steps"] + 1)
    keep_fstar = any(group["use_fstar"] for group in groups)
    for group, tau, old_tau in zip(groups, taus, previous["taus"], strict=True):
        group["step"] = step
        group["loss_avg"] = loss_avg
        group["tau"] = tau if old_tau is None else torch.where(ok, tau, old_tau.to(tau.dtype))
        group["skipped_steps"] = skipped
        if keep_fstar:
            group["fstar"] = fstar


def _write_gammas(
    optimizer: HFOptimizer, params: list[Tensor], gammas: Tensor, previous: Tensor, ok: Tensor
) -> None:
    """Two ops for all parameters (a ``where`` and a ``copy_`` each would cost more than a
    small tensor's kernel)."""
    stored = [optimizer.state[p]["grad_dot_w"] for p in params]
    torch._foreach_copy_(stored, list(torch.where(ok, gammas, previous).unbind(0)))


def _below_lb_message(optimizer: HFOptimizer, what: str, value: float, lb: float) -> str:
    return (
        f"{type(optimizer).__name__}: {what} {value!r} is below lb={lb!r}, so the Polyak step "
        "size is 0 and the parameters do not move; give a lower bound of the loss with "
        "lb=..., or use_fstar=True to estimate one"
    )


def _warn_if_loss_below_lb(optimizer: HFOptimizer, loss: Any) -> None:
    """Warn once when a Python-number loss lies below ``lb`` of a group without
    ``use_fstar``. A tensor loss is not read here (that would wait for the device):
    :func:`_warn_if_average_below_lb` checks its average when the statistics are read."""
    if isinstance(loss, Tensor):
        return
    for group in optimizer.param_groups:
        if not group["use_fstar"] and float(loss) < group["lb"]:
            message = _below_lb_message(optimizer, "the loss", float(loss), group["lb"])
            optimizer._warn_once("loss-below-lb", message)
            return


def _warn_if_average_below_lb(optimizer: HFOptimizer, statistics: dict[str, float]) -> None:
    for index, group in enumerate(optimizer.param_groups):
        average = statistics.get(f"loss_avg/group_{index}")
        if average is not None and not group["use_fstar"] and average < group["lb"]:
            message = _below_lb_message(optimizer, "the loss average", average, group["lb"])
            optimizer._warn_once("loss-below-lb", message)
            return


class Momo(HFOptimizer):
    """Momo (Schaipp et al., ICML 2024): SGD with momentum whose step size is the smaller of
    ``lr`` and a Polyak step from a model of the loss. Needs the mini-batch loss each step.

    Args:
        params: parameters or param groups.
        lr: cap :math:`\\alpha` on the step size (``>= 0``, a float or a 0-d tensor);
            ``lr=1`` works broadly.
        weight_decay: proximal weight decay :math:`\\lambda` (``>= 0``).
        beta: momentum, in ``[0, 1)``.
        lb: lower bound of the loss (0 for cross-entropy/MSE); the floor when ``use_fstar``.
        bias_correction: start the averages at zero and correct them by :math:`1-\\beta^k`.
        use_fstar: estimate the lower bound online.
        implementation: ``"auto"`` (compiled kernels where a compiler works), ``"compiled"``
            or ``"eager"`` (the reference).
        skip_nonfinite: skip a step whose gradients are not all finite (a non-finite loss
            always skips the step).

    Live statistics (``statistics()``): ``tau`` per group, ``loss_avg``, ``skipped_steps``
    and (with ``use_fstar``) ``fstar``.
    """

    needs_loss = True
    supports_complex = True
    statistic_keys = STATISTIC_KEYS
    group_state_keys = GROUP_STATE_KEYS
    wide_state_keys = frozenset({"grad_dot_w"})
    counter_state_keys = frozenset()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1.0,
        weight_decay: float = 0,
        beta: float = 0.9,
        lb: float = 0,
        bias_correction: bool = False,
        use_fstar: bool = False,
        *,
        implementation: str = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            beta=beta,
            lb=lb,
            bias_correction=bias_correction,
            use_fstar=use_fstar,
            implementation=implementation,
            skip_nonfinite=skip_nonfinite,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("beta", group["beta"], 0.0, 1.0, high_open=True)
        check_range("lb", group["lb"])
        check_flag("bias_correction", group["bias_correction"])
        check_flag("use_fstar", group["use_fstar"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _add_group_state(self, self.param_groups[-1])

    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["grad_dot_w"] = torch.zeros(
            (), dtype=accumulation_dtype(_real_dtype(p)), device=p.device
        )

    def statistics(self) -> dict[str, float]:
        statistics = super().statistics()
        _warn_if_average_below_lb(self, statistics)
        return statistics

    def _step(self, loss: Any) -> None:
        groups = self.param_groups
        active = _active_params(self, "Momo")
        params = [p for group_params in active for p in group_params]
        if not params:
            return  # no gradients anywhere: nothing to do, no state to advance
        _warn_if_loss_below_lb(self, loss)
        first = _real(params[0])
        like = torch.empty((), dtype=_statistics_dtype(params), device=first.device)
        previous = _global_state(groups, like)
        loss = self._loss_tensor(loss, like).to(like.dtype)
        started = previous["step"] > 0

        # averaging weights: 1 - beta, or 1 in the first step where the averages start at the
        # first values (no bias correction)
        weights = []
        for group in groups:
            beta = self._scalar(group, "beta", like)
            first_weight = 1.0 - beta if group["bias_correction"] else torch.ones_like(beta)
            weights.append(torch.where(started, 1.0 - beta, first_weight))
        loss_avg = torch.lerp(previous["loss_avg"], loss, weights[-1])

        compiled = self._compiled(first)
        # d is stored in phase 1 unless a skip must wait for the step's sums
        store = not any(group["skip_nonfinite"] for group in groups)
        loss_finite = torch.isfinite(loss)
        rows = _momo_moments.map(
            [
                (_real(p), _real(p.grad), _real(self.state[p]["grad_avg"]), weight, loss_finite, store)
                for params_of_group, weight in zip(active, weights, strict=True)
                for p in params_of_group
            ],
            compiled=compiled,
        )
        sums = _finish_rows(rows, params, like.dtype)
        ok = _skip_decision(groups, loss_finite, sums)
        gammas, previous_gammas = _new_gammas(self, active, sums, weights)
        totals = torch.stack([(sums[:, 1] - gammas).sum(), gammas.sum(), sums[:, 2].sum()])

        step = (previous["step"] + 1).to(like.dtype)
        rhos = [
            1.0 - self._scalar(group, "beta", like) ** step if group["bias_correction"] else 1.0
            for group in groups
        ]
        taus, rates, fstar = _polyak_step_sizes(
            self, groups, rhos, loss_avg, totals, previous["fstar"]
        )

        updates = []
        for params_of_group, weight, tau, (lr, weight_decay) in zip(
            active, weights, taus, rates, strict=True
        ):
            shrink = 1.0 + lr * weight_decay
            updates += [
                (_real(p), _real(p.grad), _real(self.state[p]["grad_avg"]), weight, tau, shrink, ok,
                 store)  # fmt: skip
                for p in params_of_group
            ]
        _momo_update.map(updates, compiled=compiled)
        _write_gammas(self, params, gammas, previous_gammas, ok)
        _store_global_state(groups, previous, ok, loss_avg, fstar, taus)
