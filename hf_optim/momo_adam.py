r"""MomoAdam: Adam with a Polyak-type adaptive step size built from the loss.

Paper: Fabian Schaipp, Ruben Ohana, Michael Eickenberg, Aaron Defazio, Robert M. Gower,
"MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024, arXiv:2305.07583.
Original code: ``momo-opt`` 0.1.0 (github.com/fabian-sp/MoMo), whose trajectories this module
reproduces to float tolerance.

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

Deviations from momo-opt 0.1.0, and why:

* The global step count, :math:`\bar f` and the lower-bound estimate live in the param-group
  dicts (``step``, ``loss_avg``, ``fstar``; equal in every group) and so in ``state_dict()``.
  Upstream keeps them as attributes: a resumed run restarts :math:`\bar f` at 0 and
  :math:`\rho` at step 1.
* :math:`D` uses the parameter's own step :math:`t` in both the norm and the update.
  Upstream uses :math:`t` in the norm but the global :math:`k` in the update; the two agree
  unless a parameter skipped steps (no gradient), and then the norm must measure the
  direction actually taken for the Polyak step to be the one derived in the paper.
* ``lb``, ``divide`` and ``use_fstar`` are param-group entries (upstream: attributes), so they
  are saved; :math:`\bar f` uses the last group's :math:`\beta_1` as upstream does.
* Inner products and norms are summed in float32 (float64 for float64 parameters) whatever the
  parameter dtype, each parameter's :math:`\langle d, x\rangle - \gamma` is formed before the
  sum over parameters, and :math:`\gamma` is stored in that dtype (upstream: float32 scalar,
  summed in the parameter dtype).
* The step size is computed on the device (no ``.item()``, no Python comparison of tensors):
  ``step()`` never waits for the device and compiles without graph breaks. A zero norm gives
  :math:`\tau_k = 0` instead of 0/0.
* The direction :math:`d_k/D_k` is formed once per step, into one buffer, and reused by the
  norm and the update (upstream computes :math:`D_k` twice, with temporaries each time). On
  CPU and CUDA the multi-tensor path forms it with torch's fused Adam kernel, applied with
  ``lr=1`` to a zero buffer (which also updates :math:`d` and :math:`v` in the same pass):
  the buffer then holds :math:`-d/((1-\beta_1^t)D)`. Elsewhere, and in the reference loop,
  the bias correction is folded into :math:`\sqrt{v} + \epsilon\sqrt{1-\beta_2^t}` and a
  per-parameter scalar.
* All partial sums of a step are finished by one call of
  :func:`hf_optim._reduce.finish_sums`, the hook for sharded training.
* The loss may also come from a closure or :meth:`set_loss`, and may be a Python float.
* ``weight_decay`` must be ``>= 0`` (upstream does not check it) and the flags must be bools.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_betas, check_range
from ._reduce import accumulation_dtype, finish_sums
from .momo import (
    _begin_step,
    _check_flag,
    _flat,
    _group_sums,
    _inner,
    _polyak_step_sizes,
    _store_global_statistics,
)

__all__ = ["MomoAdam"]


class MomoAdam(HFOptimizer):
    """MomoAdam (Schaipp et al., ICML 2024): Adam whose step size is the smaller of
    ``lr``/(1-beta1^k) and a Polyak step from a model of the loss. Needs the loss each step.

    Args:
        params: parameters or param groups.
        lr: cap :math:`\\alpha` on the step size (``>= 0``); ``lr=1e-2`` works broadly.
        betas: :math:`(\\beta_1, \\beta_2)`, each in ``[0, 1)``.
        eps: added to :math:`\\sqrt{v}` (``>= 0``).
        weight_decay: :math:`\\lambda` (``>= 0``).
        lb: lower bound of the loss (0 for cross-entropy/MSE); the floor when ``use_fstar``.
        divide: proximal weight decay :math:`(x - \\tau d/D)/(1+\\alpha\\lambda)` (``True``)
            or AdamW's :math:`(1-\\alpha\\lambda)x - \\tau d/D` (``False``).
        use_fstar: estimate the lower bound online.
        foreach: ``None``/``True`` for the multi-tensor path, ``False`` for the reference loop.

    Live statistics (``statistics()``): ``tau`` per group, ``loss_avg`` and (with
    ``use_fstar``) ``fstar``.
    """

    needs_loss = True
    statistic_keys = ("tau", "loss_avg", "fstar")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        lb: float = 0,
        divide: bool = True,
        use_fstar: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        check_range("lr", lr, 0.0)
        check_betas("betas", betas)
        check_range("eps", eps, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("lb", lb, low_open=True, high_open=True)
        _check_flag("divide", divide)
        _check_flag("use_fstar", use_fstar)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            lb=lb,
            divide=divide,
            use_fstar=use_fstar,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], lists: tuple[list[Tensor], ...]) -> None:
        params, grads, grad_avgs, grad_avg_sqs, grad_dot_ws, steps = lists
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MomoAdam does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["grad_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["grad_dot_w"] = torch.zeros(
                    (), dtype=accumulation_dtype(p.dtype), device=p.device
                )
            params.append(p)
            grads.append(p.grad)
            grad_avgs.append(state["grad_avg"])
            grad_avg_sqs.append(state["grad_avg_sq"])
            grad_dot_ws.append(state["grad_dot_w"])
            steps.append(state["step"])

    def _step(self, loss: Any) -> None:
        groups = self.param_groups
        group_lists = []
        for group in groups:
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
            self._init_group(group, lists)
            group_lists.append(lists)
        first = next((lists[0][0] for lists in group_lists if lists[0]), None)
        if first is None:
            return  # no gradients anywhere: nothing to do, no state to advance

        step, loss, loss_avg, fstar = _begin_step(self, groups, first, loss)
        dtype, device = loss.dtype, loss.device
        if loss_avg is None:
            loss_avg = torch.zeros_like(loss)
        beta1_of_average = groups[-1]["betas"][0]  # upstream: the last group's beta1
        loss_avg = beta1_of_average * loss_avg + (1.0 - beta1_of_average) * loss

        partials, directions = [], []
        for group, lists in zip(groups, group_lists, strict=True):
            if not lists[0]:
                directions.append(None)
                continue
            func = (
                _multi_tensor_momo_adam_sums
                if self._use_foreach(group)
                else _single_tensor_momo_adam_sums
            )
            beta1, beta2 = group["betas"]
            sums, direction = func(*lists, beta1=beta1, beta2=beta2, eps=group["eps"], dtype=dtype)
            partials.append(sums.to(device))
            directions.append(direction)
        sums = finish_sums(torch.stack(partials).sum(0))

        step_in_dtype = step.to(dtype)
        rhos = [1.0 - group["betas"][0] ** step_in_dtype for group in groups]
        taus, fstar = _polyak_step_sizes(groups, rhos, loss_avg, sums, fstar)

        for group, tau, lists, direction in zip(groups, taus, group_lists, directions, strict=True):
            if direction is None:
                continue
            func = (
                _multi_tensor_momo_adam_update
                if self._use_foreach(group)
                else _single_tensor_momo_adam_update
            )
            lr, weight_decay = group["lr"], group["weight_decay"]
            func(
                lists[0],
                *direction,
                tau=tau,
                decay=lr * weight_decay,
                divide=group["divide"],
            )
        _store_global_statistics(groups, step, loss_avg, fstar, taus)


def _single_tensor_momo_adam_sums(
    params: list[Tensor],
    grads: list[Tensor],
    grad_avgs: list[Tensor],
    grad_avg_sqs: list[Tensor],
    grad_dot_ws: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, tuple[list[Tensor], list[Tensor]]]:
    """Update the moments; return this group's [sum(<d,x> - gamma), sum(gamma),
    ||d||^2_{D^-1}] in ``dtype`` and the update direction as (u, s) with d/D = s*u."""
    dot_minus_gamma, gamma, norm = [], [], []
    directions, scales = [], []
    for p, grad, grad_avg, grad_avg_sq, grad_dot_w, step in zip(
        params, grads, grad_avgs, grad_avg_sqs, grad_dot_ws, steps, strict=True
    ):
        wide = grad_dot_w.dtype
        step.add_(1)
        grad_avg.lerp_(grad, 1.0 - beta1)
        grad_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        flat_p, flat_avg = _flat(p), _flat(grad_avg)
        grad_dot_w.lerp_(_inner(flat_p, _flat(grad), wide), 1.0 - beta1)
        # D = sqrt(v / (1 - beta2^t)) + eps = (sqrt(v) + eps * s) / s with s = sqrt(1 - beta2^t)
        scale = (1.0 - beta2 ** step.to(wide)).sqrt()
        direction = grad_avg_sq.sqrt().add_(eps * scale)
        torch.div(grad_avg, direction, out=direction)  # d / D = scale * direction
        dot_minus_gamma.append((_inner(flat_p, flat_avg, wide) - grad_dot_w).to(dtype))
        gamma.append(grad_dot_w.to(dtype))
        norm.append((scale * _inner(flat_avg, _flat(direction), wide)).to(dtype))
        directions.append(direction)
        scales.append(scale)
    sums = torch.stack([torch.stack(column).sum() for column in (dot_minus_gamma, gamma, norm)])
    return sums, (directions, scales)


def _single_tensor_momo_adam_update(
    params: list[Tensor],
    directions: list[Tensor],
    scales: list[Tensor],
    *,
    tau: Tensor,
    decay: float,
    divide: bool,
) -> None:
    """:math:`x \\leftarrow (x - \\tau d/D)/(1+\\alpha\\lambda)` or
    :math:`(1-\\alpha\\lambda) x - \\tau d/D`."""
    for p, direction, scale in zip(params, directions, scales, strict=True):
        if decay != 0.0 and not divide:
            p.mul_(1.0 - decay)
        p.addcmul_(direction, -tau * scale)
        if decay != 0.0 and divide:
            p.div_(1.0 + decay)


def _multi_tensor_momo_adam_sums(
    params: list[Tensor],
    grads: list[Tensor],
    grad_avgs: list[Tensor],
    grad_avg_sqs: list[Tensor],
    grad_dot_ws: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, tuple[list[Tensor], Tensor]]:
    # per-parameter scalars (steps, scales, inner products) are handled as stacked vectors
    wides = [grad_dot_w.dtype for grad_dot_w in grad_dot_ws]
    wide = torch.float64 if torch.float64 in wides else torch.float32
    flat_params = [_flat(p) for p in params]
    grad_dots = [_inner(p, _flat(g), w) for p, g, w in zip(flat_params, grads, wides, strict=True)]
    torch._foreach_add_(steps, 1)
    exponents = torch.stack(steps).to(wide)
    if _fused_direction_supported(params):
        directions = _fused_moments_and_direction(
            grads, grad_avgs, grad_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps
        )
        scales = beta1**exponents - 1.0  # d/D = -(1 - beta1^t) * direction
    else:
        torch._foreach_lerp_(grad_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(grad_avg_sqs, beta2)
        torch._foreach_addcmul_(grad_avg_sqs, grads, grads, value=1.0 - beta2)
        # s = sqrt(1 - beta2^t); D = (sqrt(v) + eps * s) / s, so d/D = s * d / (sqrt(v) + eps s)
        scales = (1.0 - beta2**exponents).sqrt()
        directions = torch._foreach_sqrt(grad_avg_sqs)
        torch._foreach_add_(directions, list((eps * scales).unbind(0)))
        for grad_avg, direction in zip(grad_avgs, directions, strict=True):
            torch.div(grad_avg, direction, out=direction)  # one pass, no temporary
    torch._foreach_lerp_(grad_dot_ws, grad_dots, 1.0 - beta1)
    flat_avgs = [_flat(a) for a in grad_avgs]
    dots = [_inner(p, a, w) for p, a, w in zip(flat_params, flat_avgs, wides, strict=True)]
    norms = [_inner(a, _flat(u), w) for a, u, w in zip(flat_avgs, directions, wides, strict=True)]
    sums = _group_sums(dots, grad_dot_ws, torch.stack(norms) * scales).to(dtype)
    return sums, (directions, scales)


def _fused_direction_supported(params: list[Tensor]) -> bool:
    """Where torch's fused Adam kernel exists for one device and dtype."""
    first = params[0]
    return (
        first.device.type in ("cpu", "cuda")
        and first.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        and all(p.device == first.device and p.dtype == first.dtype for p in params)
    )


def _fused_moments_and_direction(
    grads: list[Tensor],
    grad_avgs: list[Tensor],
    grad_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Update d and v and form the direction in one fused pass over memory.

    torch's fused Adam kernel, applied with lr=1 to zero buffers u instead of the parameters,
    leaves u = -d / ((1-beta1^t) D): the moments are updated as MomoAdam updates them and
    d/D = -(1-beta1^t) u. ``steps`` must already be incremented.
    """
    directions = [torch.zeros_like(g, memory_format=torch.preserve_format) for g in grads]
    torch._fused_adam_(
        directions,
        grads,
        grad_avgs,
        grad_avg_sqs,
        [],
        steps,
        lr=1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    return directions


def _multi_tensor_momo_adam_update(
    params: list[Tensor],
    directions: list[Tensor],
    scales: Tensor,
    *,
    tau: Tensor,
    decay: float,
    divide: bool,
) -> None:
    if decay != 0.0 and not divide:
        torch._foreach_mul_(params, 1.0 - decay)
    torch._foreach_addcmul_(params, directions, list((scales * -tau).unbind(0)))
    if decay != 0.0 and divide:
        torch._foreach_div_(params, 1.0 + decay)
