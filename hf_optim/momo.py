r"""Momo: SGD with momentum and a Polyak-type adaptive step size built from the loss.

Paper: Fabian Schaipp, Ruben Ohana, Michael Eickenberg, Aaron Defazio, Robert M. Gower,
"MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024, arXiv:2305.07583.
Original code: ``momo-opt`` 0.1.0 (github.com/fabian-sp/MoMo), whose trajectories this module
reproduces to float tolerance.

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

Deviations from momo-opt 0.1.0, and why:

* The step count, the loss average :math:`\bar f` and the lower-bound estimate live in the
  param-group dicts (``step``, ``loss_avg``, ``fstar``; the same values in every group,
  because they are global to the model) and so in ``state_dict()``. Upstream keeps them as
  attributes and a resumed run starts over at step 1, overwriting the loaded averages.
* ``beta``, ``lb``, ``bias_correction`` and ``use_fstar`` are param-group entries (upstream:
  optimizer attributes), so they are saved and can be read by schedulers and loggers. With
  equal values in every group (the only case upstream defines) the mathematics is upstream's.
  If groups differ: each parameter's averages use its group's ``beta``; the loss average
  uses the last group's ``beta`` and ``bias_correction`` (upstream MomoAdam's convention);
  the estimate ``fstar`` starts at the first group's ``lb`` and runs through the groups in
  order as upstream's attribute does; a group without ``use_fstar`` uses its own ``lb``.
* Parameters without a gradient (and empty ones) are skipped; upstream crashes on them.
  A parameter that first gets a gradient later starts its averages as upstream would at
  step 1.
* Inner products and norms are summed in float32 (float64 for float64 parameters) whatever
  the parameter dtype, and each parameter's :math:`\langle d, x\rangle - \gamma` is formed
  before the sum over parameters, so the Polyak numerator (a small difference of large sums)
  keeps its precision; :math:`\gamma` is stored in that dtype too. Upstream sums in the
  parameter dtype, which gives meaningless step sizes for bfloat16 parameters.
* The step size is computed on the device with ``torch.where``/``clamp``: no ``.item()``, no
  Python comparison of tensors, so ``step()`` never waits for the device and compiles
  without graph breaks. Upstream synchronises 1 to 5 times per group per step.
* A zero norm :math:`\lVert d_k\rVert = 0` gives :math:`\tau_k = 0` (upstream: 0/0, then
  ``min`` returns the cap). The parameters move identically (:math:`d_k = 0`); only the
  logged step size differs. A NaN numerator gives the cap :math:`\alpha/\rho_k`, as upstream.
* All partial sums of a step are finished by one call of
  :func:`hf_optim._reduce.finish_sums`, the hook for sharded training.
* The loss may also come from a closure or :meth:`set_loss`, and may be a Python float.
* ``step_size_list`` and ``fstar`` are not stored under non-parameter keys of ``self.state``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_range
from ._reduce import accumulation_dtype, finish_sums

__all__ = ["Momo"]


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _flat(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1)


def _inner(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """:math:`\\langle x, y\\rangle` of two flat tensors as a 0-d tensor accumulated in ``dtype``
    (float32 or wider).

    One pass, no temporary for float32/float64. bfloat16/float16 inputs are widened first
    (their products are exact in float32); summing them in their own dtype would make the
    Polyak numerator meaningless.
    """
    if x.dtype != dtype:
        x, y = x.to(dtype), y.to(dtype)
    return torch.dot(x, y)


def _group_sums(dots: list[Tensor], grad_dot_ws: list[Tensor], norms: Tensor | list[Tensor]):
    """[sum(<d,x> - gamma), sum(gamma), sum(norm)] from per-parameter terms, as vector ops."""
    gamma = torch.stack(grad_dot_ws)
    norms = norms if isinstance(norms, Tensor) else torch.stack(norms)
    return torch.stack([(torch.stack(dots) - gamma).sum(), gamma.sum(), norms.sum()])


def _global_statistics(
    groups: list[dict[str, Any]],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(step, loss_avg, fstar) of the previous step, from the first group that holds them."""
    for group in groups:
        if "step" in group:
            return group["step"], group["loss_avg"], group.get("fstar")
    return None, None, None


def _begin_step(
    optimizer: HFOptimizer, groups: list[dict[str, Any]], first: Tensor, loss: Any
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The global quantities Momo and MomoAdam share at the start of a step:
    (this step's count, the loss as a tensor, the previous loss average or None, fstar)."""
    previous_step, loss_avg, fstar = _global_statistics(groups)
    if previous_step is None:
        dtype, device = _statistics_dtype(groups), first.device
        previous_step = torch.zeros((), dtype=torch.float32, device=device)
    else:
        dtype, device = loss_avg.dtype, loss_avg.device
    if fstar is None:
        fstar = torch.tensor(float(groups[0]["lb"]), dtype=dtype, device=device)
    loss = optimizer._loss_tensor(loss, fstar).to(dtype)
    return previous_step + 1, loss, loss_avg, fstar


def _statistics_dtype(groups: list[dict[str, Any]]) -> torch.dtype:
    wide = any(p.dtype == torch.float64 for group in groups for p in group["params"])
    return torch.float64 if wide else torch.float32


def _polyak_step_sizes(
    groups: list[dict[str, Any]],
    rhos: Sequence[Tensor | float],
    loss_avg: Tensor,
    sums: Tensor,
    fstar: Tensor,
) -> tuple[list[Tensor], Tensor]:
    """Per-group step sizes :math:`\\tau` and the updated lower-bound estimate.

    ``sums`` holds the global :math:`[\\sum(\\langle d, x\\rangle - \\gamma), \\sum\\gamma,
    \\lVert d\\rVert^2]`. Groups are visited in order, as upstream's attribute ``lb`` is, so
    the estimate updated by one group feeds the next. Everything stays on the device.
    """
    dot_minus_gamma, gamma, norm = sums[0], sums[1], sums[2]
    taus = []
    for group, rho in zip(groups, rhos, strict=True):
        lr, weight_decay = group["lr"], group["weight_decay"]
        shrink = 1.0 + lr * weight_decay
        # c*f + <d,x> - c*gamma, written so that the large <d,x> - gamma cancels first
        model_gap = shrink * loss_avg + dot_minus_gamma - (lr * weight_decay) * gamma
        if group["use_fstar"]:
            reset = model_gap < shrink * rho * fstar
            fstar = torch.where(
                reset, (model_gap / (2.0 * shrink * rho)).clamp(min=group["lb"]), fstar
            )
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
    return taus, fstar


def _store_global_statistics(
    groups: list[dict[str, Any]],
    step: Tensor,
    loss_avg: Tensor,
    fstar: Tensor,
    taus: list[Tensor],
) -> None:
    # New tensors every step (never in-place), so a loaded state_dict is never written into.
    keep_fstar = any(group["use_fstar"] for group in groups)
    for group, tau in zip(groups, taus, strict=True):
        group["step"] = step
        group["loss_avg"] = loss_avg
        group["tau"] = tau
        if keep_fstar:
            group["fstar"] = fstar


class Momo(HFOptimizer):
    """Momo (Schaipp et al., ICML 2024): SGD with momentum whose step size is the smaller of
    ``lr`` and a Polyak step from a model of the loss. Needs the mini-batch loss each step.

    Args:
        params: parameters or param groups.
        lr: cap :math:`\\alpha` on the step size (``>= 0``); ``lr=1`` works broadly.
        weight_decay: proximal weight decay :math:`\\lambda` (``>= 0``).
        beta: momentum, in ``[0, 1]``.
        lb: lower bound of the loss (0 for cross-entropy/MSE); the floor when ``use_fstar``.
        bias_correction: start the averages at zero and correct them by :math:`1-\\beta^k`.
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
        lr: float = 1.0,
        weight_decay: float = 0,
        beta: float = 0.9,
        lb: float = 0,
        bias_correction: bool = False,
        use_fstar: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        check_range("lr", lr, 0.0)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("beta", beta, 0.0, 1.0)
        check_range("lb", lb, low_open=True, high_open=True)
        _check_flag("bias_correction", bias_correction)
        _check_flag("use_fstar", use_fstar)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            beta=beta,
            lb=lb,
            bias_correction=bias_correction,
            use_fstar=use_fstar,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        grad_avgs: list[Tensor],
        grad_dot_ws: list[Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Momo does not support sparse gradients")
            state = self.state[p]
            if not state:
                # as upstream at step 1: zeros with bias correction, else the first values
                dtype = accumulation_dtype(p.dtype)
                if group["bias_correction"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["grad_dot_w"] = torch.zeros((), dtype=dtype, device=p.device)
                else:
                    state["grad_avg"] = p.grad.clone(memory_format=torch.preserve_format)
                    state["grad_dot_w"] = _inner(_flat(p), _flat(p.grad), dtype)
            params.append(p)
            grads.append(p.grad)
            grad_avgs.append(state["grad_avg"])
            grad_dot_ws.append(state["grad_dot_w"])

    def _step(self, loss: Any) -> None:
        groups = self.param_groups
        lists = []
        for group in groups:
            params, grads, grad_avgs, grad_dot_ws = [], [], [], []
            self._init_group(group, params, grads, grad_avgs, grad_dot_ws)
            lists.append((params, grads, grad_avgs, grad_dot_ws))
        first = next((ls[0][0] for ls in lists if ls[0]), None)
        if first is None:
            return  # no gradients anywhere: nothing to do, no state to advance

        step, loss, loss_avg, fstar = _begin_step(self, groups, first, loss)
        dtype, device = loss.dtype, loss.device
        # the loss average is global: it uses the last group's beta (upstream MomoAdam's rule)
        average_beta = groups[-1]["beta"]
        if loss_avg is None:
            loss_avg = torch.zeros_like(loss) if groups[-1]["bias_correction"] else loss
        loss_avg = average_beta * loss_avg + (1.0 - average_beta) * loss

        partials = []
        for group, (params, grads, grad_avgs, grad_dot_ws) in zip(groups, lists, strict=True):
            if not params:
                continue
            func = _multi_tensor_momo_sums if self._use_foreach(group) else _single_tensor_momo_sums
            sums = func(params, grads, grad_avgs, grad_dot_ws, beta=group["beta"], dtype=dtype)
            partials.append(sums.to(device))
        sums = finish_sums(torch.stack(partials).sum(0))

        step_in_dtype = step.to(dtype)
        rhos = [
            1.0 - group["beta"] ** step_in_dtype if group["bias_correction"] else 1.0
            for group in groups
        ]
        taus, fstar = _polyak_step_sizes(groups, rhos, loss_avg, sums, fstar)

        for group, tau, (params, _, grad_avgs, _) in zip(groups, taus, lists, strict=True):
            if not params:
                continue
            func = (
                _multi_tensor_momo_update
                if self._use_foreach(group)
                else _single_tensor_momo_update
            )
            shrink = 1.0 + group["lr"] * group["weight_decay"]
            func(params, grad_avgs, tau=tau, shrink=shrink)
        _store_global_statistics(groups, step, loss_avg, fstar, taus)


def _single_tensor_momo_sums(
    params: list[Tensor],
    grads: list[Tensor],
    grad_avgs: list[Tensor],
    grad_dot_ws: list[Tensor],
    *,
    beta: float,
    dtype: torch.dtype,
) -> Tensor:
    """Update the averages; return this group's [sum(<d,x> - gamma), sum(gamma), ||d||^2]
    in ``dtype``, each parameter's terms accumulated in its own accumulation dtype."""
    dot_minus_gamma, gamma, norm = [], [], []
    for p, grad, grad_avg, grad_dot_w in zip(params, grads, grad_avgs, grad_dot_ws, strict=True):
        wide = grad_dot_w.dtype
        grad_avg.lerp_(grad, 1.0 - beta)
        flat_p, flat_avg = _flat(p), _flat(grad_avg)
        grad_dot_w.lerp_(_inner(flat_p, _flat(grad), wide), 1.0 - beta)
        dot_minus_gamma.append((_inner(flat_p, flat_avg, wide) - grad_dot_w).to(dtype))
        gamma.append(grad_dot_w.to(dtype))
        norm.append(_inner(flat_avg, flat_avg, wide).to(dtype))
    return torch.stack([torch.stack(column).sum() for column in (dot_minus_gamma, gamma, norm)])


def _single_tensor_momo_update(
    params: list[Tensor], grad_avgs: list[Tensor], *, tau: Tensor, shrink: float
) -> None:
    """:math:`x \\leftarrow (x - \\tau d) / (1 + \\alpha\\lambda)`."""
    neg_tau = -tau
    for p, grad_avg in zip(params, grad_avgs, strict=True):
        p.addcmul_(grad_avg, neg_tau)
        if shrink != 1.0:
            p.div_(shrink)


def _multi_tensor_momo_sums(
    params: list[Tensor],
    grads: list[Tensor],
    grad_avgs: list[Tensor],
    grad_dot_ws: list[Tensor],
    *,
    beta: float,
    dtype: torch.dtype,
) -> Tensor:
    torch._foreach_lerp_(grad_avgs, grads, 1.0 - beta)
    wides = [grad_dot_w.dtype for grad_dot_w in grad_dot_ws]
    flat_params, flat_avgs = [_flat(p) for p in params], [_flat(a) for a in grad_avgs]
    grad_dots = [_inner(p, _flat(g), w) for p, g, w in zip(flat_params, grads, wides, strict=True)]
    torch._foreach_lerp_(grad_dot_ws, grad_dots, 1.0 - beta)
    dots = [_inner(p, a, w) for p, a, w in zip(flat_params, flat_avgs, wides, strict=True)]
    norms = [_inner(a, a, w) for a, w in zip(flat_avgs, wides, strict=True)]
    return _group_sums(dots, grad_dot_ws, norms).to(dtype)


def _multi_tensor_momo_update(
    params: list[Tensor], grad_avgs: list[Tensor], *, tau: Tensor, shrink: float
) -> None:
    # a 0-d tensor factor keeps tau on the device; on CPU this is one pass per parameter
    torch._foreach_addcmul_(params, grad_avgs, [-tau] * len(params))
    if shrink != 1.0:
        torch._foreach_div_(params, shrink)
