r"""CASMO: Confident Adaptive Selective Momentum Optimizer.

Source: the CASMO README and CASMO_THEORY.md by Abderahmane Ainouche
(https://github.com/abderahmane-ai/CASMO, commit ``04b65a0``; PyPI ``casmo-optimizer`` 0.1.0 and
0.2.0). This is the seed-era algorithm (0.1.0 to 0.3.0 family), not the unrelated v0.4 redesign.

The update, for a parameter group (``granularity='group'``) or for each tensor
(``granularity='parameter'``), at optimizer step :math:`t` of each tensor:

.. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \bar m &= \kappa\,(\operatorname{mean}|m| + \epsilon), \qquad
    \bar v = \kappa\,(\operatorname{mean} v + \epsilon)
    \quad\text{(clamp scales, } \kappa = \text{agar\_clamp\_factor)} \\
    S_i &= \operatorname{clip}(m_i, -\bar m, \bar m)^2, \qquad
    N_i = \max(\min(v_i, \bar v) - S_i,\ \epsilon) \\
    \mathrm{AGAR}_t &= \operatorname{clip}\Big(\tfrac{1}{n}\textstyle\sum_i
        \tfrac{S_i}{S_i + N_i + \epsilon},\ 0,\ 1\Big)

(the means and the sum run over every element of the group, or of the tensor). During the first
``tau_init_steps`` steps the AGAR values are stored, and the confidence is
:math:`C_t = \operatorname{clip}(\mathrm{AGAR}_t, c_{\min}, 1)`. At the last of them the window's
mean :math:`\mu`, population standard deviation :math:`\sigma` (floored at 0.01), median,
10th and 90th percentiles are computed, and :math:`\tau = \tau_{cal} =
\operatorname{clip}(\text{median}, \text{tau\_clip\_range})`. From then on

.. math::

    C_t = c + (1-c)\,\operatorname{sigmoid}\Big(\frac{\mathrm{AGAR}_t - \text{centre}}{\sigma}\Big)
    \in [c, 1], \qquad \text{centre} = \tau_t \ (\text{center='tau'}) \text{ or } \mu
    \ (\text{center='mean'}),

with :math:`c = c_{\min}`, and :math:`\tau_t` follows the drift-detecting EMA adapter (DDEA):
an EMA mean :math:`\nu` (rate 0.001, starts at 1) and variance :math:`s^2` (decay 0.99, starts at
0.01) of AGAR; unless :math:`\mathrm{AGAR}_t > 1.2\tau_{cal}` (memorisation guard) or
:math:`|\mathrm{AGAR}_t - \tau| \le \text{dead\_zone}\cdot\tau_{cal}`,
:math:`\tau \leftarrow \max((1-\alpha)\tau + \alpha\,\mathrm{AGAR}_t,\ \tau_{cal})` with
:math:`\alpha = 0.001 + \min(0.1\,s^2/(\nu + 10^{-8}),\ 0.009)`. Finally (decoupled decay):

.. math::

    \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\, C_t\,
        \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}.

Deviations from upstream 0.1.0/0.2.0, and why:

* ``center``: 0.1.0 centres the sigmoid on the calibration mean, so its DDEA is dead code; 0.2.0
  centres it on the DDEA threshold as THEORY section 2.5 says. Both are coherent readings of the
  seed, so both are offered; ``'tau'`` (the theory's adaptive threshold) is the default.
* ``c_min`` stays the user's confidence floor at all times (the README calls it "Minimum
  confidence floor"). Upstream replaces it at calibration with 0.1/0.3/0.5 chosen from the
  calibration CV; ``adaptive_c_min=True`` restores that (the chosen value is always recorded in
  ``c_min_calibrated``).
* ``agar_bias_correction``: AGAR is computed from raw moments as the theory and upstream do (so it
  starts near 1 and decays on a ~1/(1-beta2) time scale whatever the signal-to-noise ratio);
  ``True`` computes it from the bias-corrected moments instead.
* In ``'parameter'`` granularity each tensor has its own calibration window of
  ``tau_init_steps`` of its own steps, its own DDEA and its own statistics. Upstream pushes one
  sample per tensor per step into the group's shared window, so calibration happened after about
  ``tau_init_steps / n_tensors`` steps and the DDEA ran n times per step.
* Calibration is on device: a fixed ``tau_init_steps``-long tensor of samples and a fill counter
  in the state, statistics computed with torch ops every step and committed with ``torch.where``
  when the window fills. No ``.item()``, no NumPy, no Python branch on tensor values: ``step()``
  never synchronises with the device and has no graph breaks. Percentiles use NumPy's default
  (linear) interpolation.
* Group AGAR and clamp scales are sums of per-tensor partial sums finished by
  :func:`hf_optim._reduce.finish_sums`, never flat copies of the moments (upstream keeps two
  group-sized flat buffers, which also crashed when a tensor gained its gradient after the first
  step). AGAR is accumulated in float32 (float64 for float64 parameters) whatever the parameter
  dtype; the moments keep the parameter dtype, as in ``torch.optim.AdamW``.
* Group state lives in the param-group dict and is created lazily, so ``add_param_group`` after
  construction works (upstream: KeyError) and ``state_dict()`` holds only tensors and Python
  scalars; ``load_state_dict`` does not mutate its argument.
* NaN/Inf gradients are not checked (upstream raises, at two host syncs per tensor). Use
  ``torch.amp.GradScaler`` (which skips such steps before the optimizer runs) or skip such
  steps in the loop: as in Adam, a NaN gradient poisons the moments, and here also the AGAR
  statistics of its group (or tensor).
* ``tau_init_steps`` may be any positive integer (upstream demands at least 50).
* No logging and no global ``'CASMO'`` logger handler; read ``statistics()`` (AGAR, confidence,
  tau, calibrated flag per group) when logging instead.
* Sparse gradients raise ``RuntimeError`` as in upstream (there NotImplementedError).
* Kept as upstream: weight decay is decoupled and *not* scaled by the confidence (THEORY 2.6);
  the per-tensor bias correction uses each tensor's own step count; the DDEA's EMA starts at
  (1, 0.01) and is not reset at calibration. Note that :math:`\tau` can only rise when
  :math:`\mathrm{AGAR} > \tau + \text{dead\_zone}\cdot\tau_{cal}` and
  :math:`\mathrm{AGAR} \le 1.2\tau_{cal}`, and never falls below :math:`\tau_{cal}`: with the
  default ``tau_dead_zone=0.2`` the DDEA leaves :math:`\tau = \tau_{cal}` (up to rounding), in
  upstream 0.2.0 as here. A smaller dead zone lets it move within
  :math:`[\tau_{cal}, 1.2\tau_{cal}]`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_betas, check_choice, check_range
from ._reduce import accumulation_dtype, finish_sums

__all__ = ["CASMO"]

GRANULARITIES = ("group", "parameter")
CENTERS = ("tau", "mean")

# Constants of the seed-era calibration and DDEA (upstream 0.1.0/0.2.0).
MIN_AGAR_STD = 0.01
DDEA_MEAN_RATE = 0.001
DDEA_VAR_DECAY = 0.99
DDEA_INITIAL_MEAN = 1.0
DDEA_INITIAL_VAR = 0.01
DDEA_MIN_GAIN = 0.001
DDEA_MAX_EXTRA_GAIN = 0.009
DDEA_GAIN_SCALE = 0.1
MEMORIZATION_FACTOR = 1.2
CV_HIGH, CV_MEDIUM = 0.5, 0.3
C_MIN_FOR_HIGH_CV, C_MIN_FOR_MEDIUM_CV, C_MIN_FOR_LOW_CV = 0.1, 0.3, 0.5

# The fast path handles tensors that fit in a block with foreach ops, in batches of about a
# block; larger tensors go block by block through two reused scratch blocks. On CPU a block stays in cache, so the AGAR terms and
# the update cost about one read of m and v each instead of several passes over freshly
# allocated (page-faulting) full-size temporaries.
CPU_BLOCK_NUMEL = 1 << 17
# Elsewhere blocks bound the scratch memory and the foreach batch size.
DEVICE_BLOCK_NUMEL = 1 << 24

#: Keys of the calibration/confidence state (group dict in 'group' mode, state[p] otherwise).
CALIBRATION_KEYS = (
    "agar",
    "confidence",
    "tau",
    "calibrated",
    "agar_samples",
    "agar_sample_count",
    "agar_mean",
    "agar_std",
    "agar_median",
    "agar_p10",
    "agar_p90",
    "tau_calibrated",
    "c_min_calibrated",
    "ddea_mean",
    "ddea_var",
)


class CASMO(HFOptimizer):
    """Adam whose step is scaled by a confidence derived from the gradient signal-to-noise
    ratio (AGAR), calibrated over the first ``tau_init_steps`` steps and tracked by a
    drift-detecting threshold adapter. See the module docstring for the math.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        betas: EMA coefficients of the first and second moments, each in [0, 1).
        eps: added to the Adam denominator and used as the AGAR noise floor (>= 0).
        weight_decay: decoupled weight decay (>= 0), not scaled by the confidence.
        granularity: ``'group'`` (one AGAR and confidence per param group) or
            ``'parameter'`` (one per tensor, each with its own calibration window).
        tau_init_steps: calibration window, in optimizer steps (>= 1).
        tau_clip_range: ``(low, high)`` bounds of the calibrated threshold, 0 <= low <= high <= 1.
        tau_dead_zone: DDEA ignores deviations below this fraction of the calibrated threshold.
        c_min: confidence floor in [0, 1].
        agar_clamp_factor: outlier clamp of the moments at this multiple of their mean
            magnitude (> 0), or ``None`` for no clamping.
        center: sigmoid centre after calibration: ``'tau'`` (DDEA threshold, upstream 0.2.0)
            or ``'mean'`` (calibration mean, upstream 0.1.0).
        adaptive_c_min: replace ``c_min`` after calibration by 0.1/0.3/0.5 from the
            calibration CV, as upstream does.
        agar_bias_correction: compute AGAR from bias-corrected moments.
        foreach: ``None``/``True`` for the fast multi-tensor path, ``False`` for the
            single-tensor reference.
    """

    statistic_keys = ("agar", "confidence", "tau", "calibrated")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        granularity: str = "group",
        tau_init_steps: int = 500,
        tau_clip_range: tuple[float, float] = (0.01, 0.5),
        tau_dead_zone: float = 0.2,
        c_min: float = 0.1,
        agar_clamp_factor: float | None = 10.0,
        center: str = "tau",
        adaptive_c_min: bool = False,
        agar_bias_correction: bool = False,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            granularity=granularity,
            tau_init_steps=tau_init_steps,
            tau_clip_range=tau_clip_range,
            tau_dead_zone=tau_dead_zone,
            c_min=c_min,
            agar_clamp_factor=agar_clamp_factor,
            center=center,
            adaptive_c_min=adaptive_c_min,
            agar_bias_correction=agar_bias_correction,
            foreach=foreach,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, and a group's own hyperparameters are checked like the constructor's."""
        _check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
    ) -> bool:
        """Collect the tensors with gradients and create missing state lazily (torch's
        ``_init_group`` convention: dynamo runs it eagerly and fills the lists).
        Returns whether any parameter of the group has a gradient."""
        per_parameter = group["granularity"] == "parameter"
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CASMO does not support sparse gradients")
            state = self.state[p]
            stat_dtype = accumulation_dtype(p.dtype)
            if len(state) == 0:
                # the step is a tensor (as in torch.optim.Adam) so that step() is compilable
                state["step"] = torch.zeros((), dtype=stat_dtype, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if per_parameter and "agar" not in state:
                state.update(_new_calibration_state(group, p.device, stat_dtype))
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params and "agar" not in group:
            # group entries are created lazily, so add_param_group after construction works
            first = params[0]
            group.update(_new_calibration_state(group, first.device, steps[0].dtype))
        return bool(params)

    def _step(self, loss: Any) -> None:
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            if not self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps):
                continue
            if group["granularity"] == "group":
                holders = [group]
            else:
                holders = [self.state[p] for p in params]
            casmo = _multi_tensor_casmo if self._use_foreach(group) else _single_tensor_casmo
            casmo(params, grads, exp_avgs, exp_avg_sqs, steps, holders, group)
            if group["granularity"] == "parameter":
                _summarise_parameters(group, params, holders)


def _check_hyperparameters(values: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter and its valid values."""
    lr, betas, eps = values["lr"], values["betas"], values["eps"]
    weight_decay, granularity = values["weight_decay"], values["granularity"]
    tau_init_steps, tau_clip_range = values["tau_init_steps"], values["tau_clip_range"]
    tau_dead_zone, c_min = values["tau_dead_zone"], values["c_min"]
    agar_clamp_factor, center = values["agar_clamp_factor"], values["center"]
    adaptive_c_min, agar_bias_correction = values["adaptive_c_min"], values["agar_bias_correction"]
    check_range("lr", lr, 0.0)
    check_betas("betas", betas)
    check_range("eps", eps, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    check_choice("granularity", granularity, GRANULARITIES)
    if isinstance(tau_init_steps, bool) or not isinstance(tau_init_steps, int):
        raise ValueError(f"tau_init_steps must be an integer >= 1, got {tau_init_steps!r}")
    check_range("tau_init_steps", tau_init_steps, 1)
    if not isinstance(tau_clip_range, (tuple, list)) or len(tau_clip_range) != 2:
        raise ValueError(
            f"tau_clip_range must be a pair (low, high) with 0 <= low <= high <= 1, "
            f"got {tau_clip_range!r}"
        )
    check_range("tau_clip_range[0]", tau_clip_range[0], 0.0, 1.0)
    check_range("tau_clip_range[1]", tau_clip_range[1], tau_clip_range[0], 1.0)
    check_range("tau_dead_zone", tau_dead_zone, 0.0, 1.0)
    check_range("c_min", c_min, 0.0, 1.0)
    if agar_clamp_factor is not None:
        check_range("agar_clamp_factor", agar_clamp_factor, 0.0, low_open=True)
    check_choice("center", center, CENTERS)
    check_choice("adaptive_c_min", adaptive_c_min, (False, True))
    check_choice("agar_bias_correction", agar_bias_correction, (False, True))


# -- calibration, DDEA and confidence: 0-d tensor math shared by both paths -----------------
def _new_calibration_state(
    group: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    def scalar(value: float) -> Tensor:  # a fill, not a host-to-device copy
        return torch.full((), value, dtype=dtype, device=device)

    return {
        "agar": scalar(0.0),
        "confidence": scalar(group["c_min"]),
        "tau": scalar(0.0),
        "calibrated": scalar(0.0),
        "agar_samples": torch.zeros(group["tau_init_steps"], dtype=dtype, device=device),
        "agar_sample_count": scalar(0.0),
        "agar_mean": scalar(0.0),
        "agar_std": scalar(MIN_AGAR_STD),
        "agar_median": scalar(0.0),
        "agar_p10": scalar(0.0),
        "agar_p90": scalar(0.0),
        "tau_calibrated": scalar(0.0),
        "c_min_calibrated": scalar(group["c_min"]),
        "ddea_mean": scalar(DDEA_INITIAL_MEAN),
        "ddea_var": scalar(DDEA_INITIAL_VAR),
    }


def _percentile(ordered: Tensor, q: float) -> Tensor:
    """NumPy's default ('linear') percentile of each row of row-sorted samples."""
    last = ordered.shape[-1] - 1
    position = q * last
    low = int(position)
    high = min(low + 1, last)
    return torch.lerp(ordered[:, low], ordered[:, high], position - low)


def _update_confidences(
    holders: list[dict[str, Tensor]], agars: Tensor, group: dict[str, Any]
) -> Tensor:
    """Record one AGAR sample per holder and return their confidences (1-D, one per holder).

    A holder is the group dict ('group' mode) or a tensor's ``state[p]`` ('parameter' mode).
    The holders' entries are stacked so the math runs once for all of them, then written
    back: a handful of small ops per step instead of dozens per tensor."""
    if len(holders) == 1:  # views: in-place writes go straight to the holder
        rows = {key: holders[0][key].unsqueeze(0) for key in CALIBRATION_KEYS}
    else:
        rows = {key: _stack([h[key] for h in holders], agars.dtype) for key in CALIBRATION_KEYS}
    _confidence_math(rows, agars, group)
    if len(holders) > 1:
        for key in CALIBRATION_KEYS:
            torch._foreach_copy_([h[key] for h in holders], list(rows[key].unbind()))
    return rows["confidence"]


def _confidence_math(rows: dict[str, Tensor], agar: Tensor, group: dict[str, Any]) -> None:
    """Calibration window, DDEA and confidence for a batch of holders, updated in place.

    Branch-free on tensor values: every phase is computed and ``torch.where`` keeps the one
    that applies, so ``step()`` never waits for the device."""
    samples, count = rows["agar_samples"], rows["agar_sample_count"]
    window = samples.shape[-1]
    tau_low, tau_high = group["tau_clip_range"]
    was_calibrated = rows["calibrated"] > 0
    collecting = ~was_calibrated

    # the calibration window: write the sample at the fill position while collecting
    position = count.clamp(max=window - 1).to(torch.long).unsqueeze(1)
    kept = samples.gather(1, position).squeeze(1)
    samples.scatter_(1, position, torch.where(collecting, agar, kept).unsqueeze(1))
    count.add_(collecting.to(count.dtype))
    calibrating = collecting & (count >= window)

    ordered = samples.sort(dim=1).values
    mean = samples.mean(dim=1)
    std = (samples - mean.unsqueeze(1)).square().mean(dim=1).sqrt()  # population std
    median = (ordered[:, (window - 1) // 2] + ordered[:, window // 2]) * 0.5
    coefficient_of_variation = std / (mean + 1e-8)
    adaptive_floor = torch.full_like(agar, C_MIN_FOR_LOW_CV)
    adaptive_floor = torch.where(
        coefficient_of_variation > CV_MEDIUM, C_MIN_FOR_MEDIUM_CV, adaptive_floor
    )
    adaptive_floor = torch.where(
        coefficient_of_variation > CV_HIGH, C_MIN_FOR_HIGH_CV, adaptive_floor
    )
    for key, value in (
        ("agar_mean", mean),
        ("agar_std", std.clamp(min=MIN_AGAR_STD)),
        ("agar_median", median),
        ("agar_p10", _percentile(ordered, 0.1)),
        ("agar_p90", _percentile(ordered, 0.9)),
        ("tau_calibrated", median.clamp(tau_low, tau_high)),
        ("c_min_calibrated", adaptive_floor),
    ):
        rows[key].copy_(torch.where(calibrating, value, rows[key]))

    # DDEA, for the samples after the calibration step
    tau, tau_cal = rows["tau"], rows["tau_calibrated"]
    ddea_mean, ddea_var = rows["ddea_mean"], rows["ddea_var"]
    difference = agar - ddea_mean
    new_mean = ddea_mean + DDEA_MEAN_RATE * difference
    new_var = DDEA_VAR_DECAY * ddea_var + (1 - DDEA_VAR_DECAY) * difference.square()
    gain = DDEA_MIN_GAIN + (DDEA_GAIN_SCALE * new_var / (new_mean + 1e-8)).clamp(
        max=DDEA_MAX_EXTRA_GAIN
    )
    adapts = (agar <= MEMORIZATION_FACTOR * tau_cal) & (
        (agar - tau).abs() > group["tau_dead_zone"] * tau_cal
    )
    adapted_tau = torch.where(adapts, torch.maximum(torch.lerp(tau, agar, gain), tau_cal), tau)
    ddea_mean.copy_(torch.where(was_calibrated, new_mean, ddea_mean))
    ddea_var.copy_(torch.where(was_calibrated, new_var, ddea_var))
    tau.copy_(torch.where(was_calibrated, adapted_tau, torch.where(calibrating, tau_cal, tau)))

    # the confidence
    calibrated = was_calibrated | calibrating
    centre = tau if group["center"] == "tau" else rows["agar_mean"]
    floor = rows["c_min_calibrated"] if group["adaptive_c_min"] else group["c_min"]
    sigmoid = torch.sigmoid((agar - centre) / rows["agar_std"])
    mapped = (floor + (1 - floor) * sigmoid).clamp(min=floor).clamp(max=1.0)
    rows["confidence"].copy_(torch.where(calibrated, mapped, agar.clamp(group["c_min"], 1.0)))
    rows["calibrated"].copy_(calibrated.to(agar.dtype))
    rows["agar"].copy_(agar)


def _summarise_parameters(
    group: dict[str, Any], params: list[Tensor], holders: list[dict[str, Tensor]]
) -> None:
    """In 'parameter' mode the group statistics are element-weighted means over the tensors
    stepped this step (so ``confidence`` is the mean learning-rate scale per element)."""
    device, dtype = group["agar"].device, group["agar"].dtype
    keys = CASMO.statistic_keys
    values = torch.stack([_stack([h[k] for h in holders], dtype) for k in keys], dim=1)
    values = values.to(device)
    weights = _numels(params, group["agar"])
    partial = torch.cat([weights @ values, weights.sum().reshape(1)])
    totals = finish_sums(partial)
    means = totals[:-1] / totals[-1].clamp(min=1)
    for index, key in enumerate(keys):
        group[key].copy_(means[index])


def _stack(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``torch.stack`` in ``dtype`` (tensors of a mixed-dtype group are converted first)."""
    if all(t.dtype == dtype for t in tensors):
        return torch.stack(tensors)
    return torch.stack([t.to(dtype) for t in tensors])


def _numels(tensors: list[Tensor], like: Tensor) -> Tensor:
    """Element counts as a tensor on ``like``'s device, filled on the device (a tensor built
    from a Python list would be a blocking host-to-device copy on accelerators)."""
    return torch.stack([like.new_full((), float(t.numel())) for t in tensors])


def _clamp_scales(
    abs_m_sums: Tensor, v_sums: Tensor, counts: Tensor, group: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """Clamp bounds of m and v from finished sums: factor * (mean + eps)."""
    eps, factor = group["eps"], group["agar_clamp_factor"]
    counts = counts.clamp(min=1)
    return factor * (abs_m_sums / counts + eps), factor * (v_sums / counts + eps)


# -- the readable reference --------------------------------------------------------------
def _single_tensor_casmo(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    holders: list[dict[str, Tensor]],
    group: dict[str, Any],
) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    per_group = group["granularity"] == "group"
    stat_dtype, device = holders[0]["agar"].dtype, holders[0]["agar"].device

    moments = []  # AGAR inputs in the accumulation dtype
    for grad, exp_avg, exp_avg_sq, step in zip(grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step.add_(1)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m, v = exp_avg.to(stat_dtype), exp_avg_sq.to(stat_dtype)
        if group["agar_bias_correction"]:
            m = m / (1 - beta1**step)
            v = v / (1 - beta2**step)
        moments.append((m, v))

    def agar_of(indices: list[int]) -> Tensor:
        """AGAR over the elements of the tensors ``indices`` (partial sums, finished)."""
        counts = _numels([moments[i][0] for i in indices], holders[0]["agar"])
        if group["agar_clamp_factor"] is not None:
            sums = [torch.stack([m.abs().sum(), v.sum()]) for m, v in (moments[i] for i in indices)]
            partial = torch.cat([torch.stack(sums).sum(0).to(device), counts.sum().reshape(1)])
            total = finish_sums(partial)
            m_bound, v_bound = _clamp_scales(total[0], total[1], total[2], group)
        ratio_sums = []
        for m, v in (moments[i] for i in indices):
            if group["agar_clamp_factor"] is not None:
                m = m.clamp(-m_bound, m_bound)
                v = v.clamp(max=v_bound)
            signal = m.square()
            noise = (v - signal).clamp(min=eps)
            ratio_sums.append((signal / (signal + noise + eps)).sum())
        partial = torch.stack([torch.stack(ratio_sums).sum().to(device), counts.sum()])
        total = finish_sums(partial)
        return (total[0] / total[1].clamp(min=1)).clamp(0, 1)

    if per_group:
        agar = agar_of(list(range(len(params))))
        confidences = [_update_confidences([group], agar.reshape(1), group)[0]] * len(params)
    else:
        confidences = [
            _update_confidences([holder], agar_of([i]).reshape(1), group)[0]
            for i, holder in enumerate(holders)
        ]

    for param, exp_avg, exp_avg_sq, step, confidence in zip(
        params, exp_avgs, exp_avg_sqs, steps, confidences, strict=True
    ):
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        m_hat = exp_avg.to(stat_dtype) / (1 - beta1**step)
        v_hat = exp_avg_sq.to(stat_dtype) / (1 - beta2**step)
        direction = m_hat / (v_hat.sqrt() + eps)
        param.add_(direction * (-lr * confidence.to(param.device)))


# -- the fast path ------------------------------------------------------------------------
def _blocks(tensors: list[Tensor], block_numel: int) -> list[tuple[Tensor, ...]]:
    """Aligned blocks of ``tensors`` (same shape): flat slices when all are contiguous,
    otherwise the whole tensors."""
    numel = tensors[0].numel()
    if numel <= block_numel or not all(t.is_contiguous() for t in tensors):
        return [tuple(tensors)]
    flat = [t.view(-1) for t in tensors]
    return [
        tuple(f[start : start + block_numel] for f in flat)
        for start in range(0, numel, block_numel)
    ]


def _partition(tensors: list[Tensor], block_numel: int) -> tuple[list[list[int]], list[int]]:
    """Split tensor indices into batches for the foreach ops (tensors of one dtype that fit in
    a block, packed up to about a block per batch so that a batch stays in cache on CPU) and
    the larger tensors, which go block by block through scratch buffers."""
    batches: list[list[int]] = []
    large: list[int] = []
    batch_numel = 0
    for index, tensor in enumerate(tensors):
        if tensor.numel() > block_numel:
            large.append(index)
            continue
        if (
            not batches
            or batch_numel + tensor.numel() > block_numel
            or tensors[batches[-1][0]].dtype != tensor.dtype
        ):
            batches.append([])
            batch_numel = 0
        batches[-1].append(index)
        batch_numel += tensor.numel()
    return batches, large


def _multi_tensor_casmo(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    holders: list[dict[str, Tensor]],
    group: dict[str, Any],
) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    per_group = group["granularity"] == "group"
    clamps = group["agar_clamp_factor"] is not None
    stat_dtype, device = holders[0]["agar"].dtype, holders[0]["agar"].device

    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    # per-tensor bias corrections, vectorised over the tensors
    step_vector = torch.stack(steps).to(device, stat_dtype)
    bias_correction1 = 1 - torch.pow(beta1, step_vector)
    bias_correction2 = 1 - torch.pow(beta2, step_vector)

    block_numel = CPU_BLOCK_NUMEL if device.type == "cpu" else DEVICE_BLOCK_NUMEL
    batches, large = _partition(exp_avgs, block_numel)
    blocks = {i: _blocks([exp_avgs[i], exp_avg_sqs[i]], block_numel) for i in large}
    update_blocks = {
        i: _blocks([params[i], exp_avgs[i], exp_avg_sqs[i]], block_numel) for i in large
    }
    largest = max([b[0].numel() for i in large for b in blocks[i] + update_blocks[i]], default=0)
    scratch = torch.empty(largest, dtype=stat_dtype, device=device)
    scratch2 = torch.empty(largest, dtype=stat_dtype, device=device)

    def scratch_like(buffer: Tensor, like: Tensor) -> Tensor:
        return buffer[: like.numel()].view(like.shape)

    def pick(values: Any, batch: list[int]) -> list[Any]:
        return [values[i] for i in batch]

    if per_group:  # only the total element count is needed
        count = holders[0]["agar"].new_full((), float(sum(p.numel() for p in params)))
    else:
        counts = _numels(params, holders[0]["agar"])
    if group["agar_bias_correction"]:
        m_scales = 1 / bias_correction1
        v_scales_list = (1 / bias_correction2).unbind()
        m_scales_list, m_scales_squared = m_scales.unbind(), m_scales.square().unbind()

    # sweep 1: sums of |m| and v per tensor (the clamp scales)
    if clamps:
        abs_m_sums: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        v_sums: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        for batch in batches:
            abs_m = torch._foreach_norm(pick(exp_avgs, batch), 1, dtype=stat_dtype)
            # v >= 0: its 1-norm is its sum
            v_sum = torch._foreach_norm(pick(exp_avg_sqs, batch), 1, dtype=stat_dtype)
            for index, a, b in zip(batch, abs_m, v_sum, strict=True):
                abs_m_sums[index], v_sums[index] = a, b
        for index in large:
            abs_m, v_sum = [], []
            for m, v in blocks[index]:
                s = scratch_like(scratch, m)
                if m.dtype == stat_dtype:
                    torch.abs(m, out=s)
                else:
                    s.copy_(m).abs_()
                abs_m.append(s.sum())
                v_sum.append(v.sum(dtype=stat_dtype))
            abs_m_sums[index] = torch.stack(abs_m).sum()
            v_sums[index] = torch.stack(v_sum).sum()
        sums = torch.stack([torch.stack(abs_m_sums), torch.stack(v_sums)], dim=1).to(device)
        if group["agar_bias_correction"]:
            sums = sums * torch.stack([m_scales, 1 / bias_correction2], dim=1)
        if per_group:
            total = finish_sums(torch.cat([sums.sum(0), count.reshape(1)]))
            m_bounds, v_bounds = _clamp_scales(total[0], total[1], total[2], group)
            m_bounds, v_bounds = [m_bounds] * len(params), [v_bounds] * len(params)
        else:
            total = finish_sums(torch.cat([sums, counts[:, None]], dim=1))
            m_bounds, v_bounds = _clamp_scales(total[:, 0], total[:, 1], total[:, 2], group)
            m_bounds, v_bounds = m_bounds.unbind(), v_bounds.unbind()
        m_bounds_squared = [b.square() for b in m_bounds]

    # sweep 2: sum over elements of S / (max(v, S + eps) + eps) == S / (S + max(v - S, eps) + eps)
    ratio_sums: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for batch in batches:
        ms, vs = pick(exp_avgs, batch), pick(exp_avg_sqs, batch)
        if ms[0].dtype == stat_dtype:
            signal = torch._foreach_mul(ms, ms)
            total_power = torch._foreach_mul(vs, 1.0)  # a copy
        else:  # narrower moments: the AGAR terms in the statistics dtype
            signal = [m.to(stat_dtype) for m in ms]
            torch._foreach_mul_(signal, signal)
            total_power = [v.to(stat_dtype) for v in vs]
        if group["agar_bias_correction"]:
            torch._foreach_mul_(signal, pick(m_scales_squared, batch))
            torch._foreach_mul_(total_power, pick(v_scales_list, batch))
        if clamps:
            torch._foreach_clamp_max_(signal, pick(m_bounds_squared, batch))
            torch._foreach_clamp_max_(total_power, pick(v_bounds, batch))
        torch._foreach_sub_(total_power, eps)
        torch._foreach_maximum_(total_power, signal)
        torch._foreach_add_(total_power, 2 * eps)
        torch._foreach_div_(signal, total_power)
        for index, ratio_sum in zip(batch, torch._foreach_norm(signal, 1), strict=True):
            ratio_sums[index] = ratio_sum  # the ratios are >= 0: 1-norm == sum
    for index in large:
        parts = []
        for m, v in blocks[index]:
            signal, total_power = scratch_like(scratch, m), scratch_like(scratch2, m)
            if group["agar_bias_correction"] or m.dtype != stat_dtype:
                signal.copy_(m)
                total_power.copy_(v)
                if group["agar_bias_correction"]:
                    signal.mul_(m_scales_list[index])
                    total_power.mul_(v_scales_list[index])
                signal.square_()
                if clamps:
                    total_power.clamp_(max=v_bounds[index])
            else:  # the same with fewer passes
                torch.mul(m, m, out=signal)
                if clamps:
                    torch.clamp(v, max=v_bounds[index], out=total_power)
                else:
                    total_power.copy_(v)
            if clamps:
                signal.clamp_(max=m_bounds_squared[index])
            total_power.sub_(eps)
            torch.maximum(total_power, signal, out=total_power)
            total_power.add_(2 * eps)
            parts.append(signal.div_(total_power).sum())
        ratio_sums[index] = torch.stack(parts).sum()
    ratio_sums = torch.stack(ratio_sums).to(device)
    if per_group:
        total = finish_sums(torch.stack([ratio_sums.sum(), count]))
        agar = (total[0] / total[1].clamp(min=1)).clamp(0, 1)
        confidences = _update_confidences([group], agar.reshape(1), group).expand(len(params))
    else:
        total = finish_sums(torch.stack([ratio_sums, counts], dim=1))
        agars = (total[:, 0] / total[:, 1].clamp(min=1)).clamp(0, 1)
        confidences = _update_confidences(holders, agars, group)

    # sweep 3: the update, p <- p * (1 - lr * wd) - lr * C * m_hat / (sqrt(v_hat) + eps)
    decay = 1 - lr * weight_decay
    step_sizes = (-lr * confidences / bias_correction1).to(params[0].device).unbind()
    inverse_sqrt_bc2 = bias_correction2.rsqrt().to(params[0].device).unbind()
    for batch in batches:
        ps, ms = pick(params, batch), pick(exp_avgs, batch)
        if ms[0].dtype == stat_dtype:
            direction = torch._foreach_sqrt(pick(exp_avg_sqs, batch))
        else:
            direction = [v.to(stat_dtype) for v in pick(exp_avg_sqs, batch)]
            torch._foreach_sqrt_(direction)
        torch._foreach_mul_(direction, pick(inverse_sqrt_bc2, batch))
        torch._foreach_add_(direction, eps)
        direction = torch._foreach_div(ms, direction)
        if weight_decay != 0:
            torch._foreach_mul_(ps, decay)
        torch._foreach_addcmul_(ps, direction, pick(step_sizes, batch))
    for index in large:
        for p_block, m_block, v_block in update_blocks[index]:
            direction = scratch_like(scratch, m_block)
            if v_block.dtype == stat_dtype:
                torch.sqrt(v_block, out=direction)
            else:
                direction.copy_(v_block).sqrt_()
            direction.mul_(inverse_sqrt_bc2[index]).add_(eps)
            torch.div(m_block, direction, out=direction)
            if weight_decay != 0:  # here, while the block is in cache
                p_block.mul_(decay)
            p_block.addcmul_(direction, step_sizes[index])
