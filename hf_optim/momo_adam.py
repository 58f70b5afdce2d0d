r"""MomoAdam: Adam with a Polyak-type adaptive step size built from the loss.

Paper: Fabian Schaipp, Ruben Ohana, Michael Eickenberg, Aaron Defazio, Robert M. Gower,
"MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024, arXiv:2305.07583.
Original code: ``momo-opt`` 0.1.0, whose trajectories this module reproduces to float
tolerance.

The update (global step :math:`k`, per-parameter step :math:`t`, cap :math:`\alpha` = ``lr``,
weight decay :math:`\lambda`, lower bound :math:`\ell` = ``lb``, loss :math:`f_k`):

.. math::

    d_k &= \beta_1 d_{k-1} + (1-\beta_1) g_k, \qquad
    v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2, \qquad
    \gamma_k = \beta_1 \gamma_{k-1} + (1-\beta_1) \langle g_k, x_k\rangle \\
    \bar f_k &= \beta_1 \bar f_{k-1} + (1-\beta_1) f_k, \qquad
    D_k = \sqrt{v_k / (1-\beta_2^t)} + \epsilon, \qquad
    \rho_k = 1-\beta_1^k, \qquad c = 1+\alpha\lambda \\
    \tau_k &= \min\Big(\frac{\alpha}{\rho_k},
      \frac{\big(c(\bar f_k - \rho_k\ell) + \langle d_k, x_k\rangle - c\,\gamma_k\big)_+}
           {\lVert d_k\rVert^2_{D_k^{-1}}}\Big) \\
    x_{k+1} &= \big(x_k - \tau_k\, d_k / D_k\big) / c \quad (\texttt{divide=True}), \qquad
    x_{k+1} = (1-\alpha\lambda)\,x_k - \tau_k\, d_k / D_k \quad (\texttt{divide=False})

All averages start at zero. Inner products and the norm are sums over all parameters of all
groups; :math:`\tau_k` is per group. ``use_fstar`` estimates :math:`\ell` online exactly as in
:mod:`hf_optim.momo` (with :math:`\rho_k = 1-\beta_1^k`). With ``divide=False`` the step size
keeps the :math:`c` factors of the proximal form, as upstream does.

How it runs: as :mod:`hf_optim.momo`, two per-tensor kernels around one reduction.
:func:`_momo_adam_moments` reads :math:`x, g, d, v`, forms the new moments and :math:`D` in
registers and returns :math:`[\langle x, g\rangle, \langle x, d\rangle, \sum d^2/D]`; after
the reduction :func:`_momo_adam_update` forms them again and writes :math:`d`, :math:`v` and
:math:`x`: 44 bytes per float32 parameter per step in two passes (fused AdamW: 28 in one).

Deviations from momo-opt 0.1.0, and why:

* The global step count, :math:`\bar f`, the lower-bound estimate, the last step sizes and
  the count of skipped steps live in the param-group dicts (``step``, ``loss_avg``,
  ``fstar``, ``tau``, ``skipped_steps``; equal in every group but ``tau``) and so in
  ``state_dict()``. Upstream keeps them as attributes: a resumed run restarts :math:`\bar f`
  at 0 and :math:`\rho` at step 1.
* :math:`D` uses the parameter's own step :math:`t` in both the norm and the update.
  Upstream uses :math:`t` in the norm but the global :math:`k` in the update; the two agree
  unless a parameter skipped steps (no gradient), and then the norm must measure the
  direction actually taken for the Polyak step to be the one derived in the paper.
* ``lb``, ``divide`` and ``use_fstar`` are param-group entries (upstream: attributes), so they
  are saved; :math:`\bar f` uses the last group's :math:`\beta_1` as upstream does.
* Each parameter's :math:`\langle g, x\rangle` is summed over the whole tensor (over all ranks
  under sharding) before it enters :math:`\gamma`, so :math:`\gamma` is the same on every rank.
  Inner products and norms are summed in float32 (float64 for float64 parameters) whatever
  the parameter dtype, each parameter's :math:`\langle d, x\rangle - \gamma` is formed before
  the sum over parameters, and :math:`\gamma` is stored in that dtype (upstream: float32
  scalar, summed in the parameter dtype).
* The step size is computed on the device (no ``.item()``, no Python comparison of tensors):
  ``step()`` never waits for the device and compiles without graph breaks. A zero norm gives
  :math:`\tau_k = 0` instead of 0/0.
* A non-finite loss skips the step whatever ``skip_nonfinite`` says, and with
  ``skip_nonfinite=True`` so does a step whose gradients are not all finite: parameters,
  moments, counters, :math:`\bar f` and ``tau`` stay as they were; ``skipped_steps`` counts it
  (upstream lets a NaN loss into :math:`\bar f` for good, after which every step is the cap).
* Complex parameters are optimised as their ``torch.view_as_real`` views (torch's convention).
* The loss may also come from a closure or :meth:`set_loss`, and may be a Python float.
* ``weight_decay`` must be ``>= 0`` (upstream does not check it) and the flags must be bools.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_betas, check_flag, check_range
from ._kernels import kernel, wide_sum
from ._reduce import accumulation_dtype
from .momo import (
    GROUP_STATE_KEYS,
    STATISTIC_KEYS,
    _active_params,
    _add_group_state,
    _finish_rows,
    _global_state,
    _new_gammas,
    _polyak_step_sizes,
    _real,
    _real_dtype,
    _skip_decision,
    _statistics_dtype,
    _store_global_state,
    _warn_if_average_below_lb,
    _warn_if_loss_below_lb,
    _wide,
    _write_gammas,
)

__all__ = ["MomoAdam"]


def _bias_correction(param, grad, grad_avg, grad_avg_sq, step, beta1, beta2, eps, *_):
    """:math:`1-\\beta_2^t` at this tensor's next step ``t`` (a kernel's scalar)."""
    wide = _wide(param)
    return (1.0 - beta2.to(wide) ** (step.to(wide) + 1.0),)


def _adam_moments(param, grad, grad_avg, grad_avg_sq, beta1, beta2, eps, bias2):
    """:math:`d`, :math:`v` (in the state dtype) and :math:`D = \\sqrt{v/(1-\\beta_2^t)} +
    \\epsilon` (in float32, float64 for float64), ``bias2`` the :func:`_bias_correction`."""
    wide = _wide(param)
    g = grad.to(wide)
    beta1, beta2 = beta1.to(wide), beta2.to(wide)
    average = torch.lerp(grad_avg.to(wide), g, 1.0 - beta1).to(grad_avg.dtype)
    average_sq = (beta2 * grad_avg_sq.to(wide) + (1.0 - beta2) * g * g).to(grad_avg_sq.dtype)
    denominator = (average_sq.to(wide) / bias2).sqrt() + eps.to(wide)
    return average, average_sq, denominator


@kernel(scalars=_bias_correction)
def _momo_adam_moments(param, grad, grad_avg, grad_avg_sq, step, beta1, beta2, eps, bias2):
    """Phase 1 for one tensor (reads only): the tensor's :math:`[\\langle x, g\\rangle,
    \\langle x, d\\rangle, \\sum d^2/D]` with this step's moments."""
    average, _, denominator = _adam_moments(
        param, grad, grad_avg, grad_avg_sq, beta1, beta2, eps, bias2
    )
    wide = _wide(param)
    x, g, d = param.to(wide), grad.to(wide), average.to(wide)
    return torch.stack([wide_sum(x * g), wide_sum(x * d), wide_sum(d * d / denominator)])


@kernel(scalars=_bias_correction)
def _momo_adam_update(
    param, grad, grad_avg, grad_avg_sq, step, beta1, beta2, eps, tau, keep, shrink, ok, bias2
):
    """Phase 2 for one tensor: the moments again, :math:`x \\leftarrow (\\kappa x - \\tau
    d/D) / c` (``keep`` :math:`\\kappa`, ``shrink`` :math:`c`); the caller counts the step.
    Nothing changes where ``ok`` is false."""
    wide = _wide(param)
    average, average_sq, denominator = _adam_moments(
        param, grad, grad_avg, grad_avg_sq, beta1, beta2, eps, bias2
    )
    direction = average.to(wide) / denominator
    new = (keep.to(wide) * param.to(wide) - tau.to(wide) * direction) / shrink.to(wide)
    grad_avg.copy_(torch.where(ok, average, grad_avg))
    grad_avg_sq.copy_(torch.where(ok, average_sq, grad_avg_sq))
    param.copy_(torch.where(ok, new.to(param.dtype), param))


class MomoAdam(HFOptimizer):
    """MomoAdam (Schaipp et al., ICML 2024): Adam whose step size is the smaller of
    ``lr``/(1-beta1^k) and a Polyak step from a model of the loss. Needs the loss each step.

    Args:
        params: parameters or param groups.
        lr: cap :math:`\\alpha` on the step size (``>= 0``, a float or a 0-d tensor);
            ``lr=1e-2`` works broadly.
        betas: :math:`(\\beta_1, \\beta_2)`, each in ``[0, 1)``.
        eps: added to :math:`\\sqrt{v}` (``>= 0``).
        weight_decay: :math:`\\lambda` (``>= 0``).
        lb: lower bound of the loss (0 for cross-entropy/MSE); the floor when ``use_fstar``.
        divide: proximal weight decay :math:`(x - \\tau d/D)/(1+\\alpha\\lambda)` (``True``)
            or AdamW's :math:`(1-\\alpha\\lambda)x - \\tau d/D` (``False``).
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
    counter_state_keys = frozenset({"step"})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        lb: float = 0,
        divide: bool = True,
        use_fstar: bool = False,
        *,
        implementation: str = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            lb=lb,
            divide=divide,
            use_fstar=use_fstar,
            implementation=implementation,
            skip_nonfinite=skip_nonfinite,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("lb", group["lb"])
        check_flag("divide", group["divide"])
        check_flag("use_fstar", group["use_fstar"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _add_group_state(self, self.param_groups[-1])

    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["grad_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["grad_dot_w"] = torch.zeros(
            (), dtype=accumulation_dtype(_real_dtype(p)), device=p.device
        )

    def _group_scalars(self, group: dict[str, Any], like: Tensor) -> tuple[Tensor, ...]:
        """(beta1, beta2, eps) of ``group`` as cached 0-d tensors."""
        return (
            self._beta_scalar(group, 0, like),
            self._beta_scalar(group, 1, like),
            self._scalar(group, "eps", like),
        )

    def _beta_scalar(self, group: dict[str, Any], index: int, like: Tensor) -> Tensor:
        """``group["betas"][index]`` as :meth:`_scalar` gives a group entry: cached, refreshed
        in place when the value changes (no recompile, no host-device copy per step)."""
        value = group["betas"][index]
        if isinstance(value, Tensor):
            return value.detach().to(device=like.device, dtype=like.dtype).reshape(())
        cache_key = (id(group), f"betas[{index}]", like.device, like.dtype)
        cached = self._scalars.get(cache_key)
        if cached is None or cached[0] != value:
            tensor = torch.tensor(float(value), dtype=like.dtype, device=like.device)
            if cached is not None:
                tensor = cached[1].fill_(float(value))
            self._scalars[cache_key] = (value, tensor)
            return tensor
        return cached[1]

    def statistics(self) -> dict[str, float]:
        statistics = super().statistics()
        _warn_if_average_below_lb(self, statistics)
        return statistics

    def _moments(self, p: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[p]
        return _real(state["grad_avg"]), _real(state["grad_avg_sq"])

    def _step(self, loss: Any) -> None:
        groups = self.param_groups
        active = _active_params(self, "MomoAdam")
        params = [p for group_params in active for p in group_params]
        if not params:
            return  # no gradients anywhere: nothing to do, no state to advance
        _warn_if_loss_below_lb(self, loss)
        first = _real(params[0])
        like = torch.empty((), dtype=_statistics_dtype(params), device=first.device)
        previous = _global_state(groups, like)
        loss = self._loss_tensor(loss, like).to(like.dtype)

        scalars = [self._group_scalars(group, like) for group in groups]
        weights = [1.0 - beta1 for beta1, _, _ in scalars]
        loss_avg = torch.lerp(previous["loss_avg"], loss, weights[-1])

        compiled = self._compiled(first)
        rows = _momo_adam_moments.map(
            [
                (_real(p), _real(p.grad), *self._moments(p), self.state[p]["step"], *scalars_of)
                for params_of_group, scalars_of in zip(active, scalars, strict=True)
                for p in params_of_group
            ],
            compiled=compiled,
        )
        sums = _finish_rows(rows, params, like.dtype)
        ok = _skip_decision(groups, torch.isfinite(loss), sums)
        gammas, previous_gammas = _new_gammas(self, active, sums, weights)
        totals = torch.stack([(sums[:, 1] - gammas).sum(), gammas.sum(), sums[:, 2].sum()])

        step = (previous["step"] + 1).to(like.dtype)
        rhos = [1.0 - beta1**step for beta1, _, _ in scalars]
        taus, rates, fstar = _polyak_step_sizes(
            self, groups, rhos, loss_avg, totals, previous["fstar"]
        )

        one = torch.ones((), dtype=like.dtype, device=like.device)
        updates = []
        for group, params_of_group, scalars_of, tau, (lr, weight_decay) in zip(
            groups, active, scalars, taus, rates, strict=True
        ):
            decay = lr * weight_decay
            keep, shrink = (one, 1.0 + decay) if group["divide"] else (1.0 - decay, one)
            updates += [
                (_real(p), _real(p.grad), *self._moments(p), self.state[p]["step"], *scalars_of)
                + (tau, keep, shrink, ok)
                for p in params_of_group
            ]
        _momo_adam_update.map(updates, compiled=compiled)
        # per-parameter counters outside the kernel (kernels never write 0-d inputs)
        steps = [self.state[p]["step"] for p in params]
        # a list of 0-d tensors: the single-tensor overload reads the scalar on the host
        torch._foreach_add_(steps, [ok.to(torch.float32)] * len(steps))
        _write_gammas(self, params, gammas, previous_gammas, ok)
        _store_global_state(groups, previous, ok, loss_avg, fstar, taus)
