r"""CASMO: Confident Adaptive Selective Momentum Optimizer.

Source: the CASMO README and CASMO_THEORY.md by Abderahmane Ainouche
(https://github.com/abderahmane-ai/CASMO, commit ``04b65a0``; PyPI ``casmo-optimizer`` 0.1.0 and
0.2.0). This is the early algorithm of the 0.1.0 to 0.3.0 family, not the unrelated v0.4
redesign that kept the name.

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

with :math:`c` the floor (``c_min_calibrated`` by default, ``c_min`` with ``adaptive_c_min=False``), and :math:`\tau_t` follows the drift-detecting EMA adapter (DDEA):
an EMA mean :math:`\nu` (rate 0.001, starts at 1) and variance :math:`s^2` (decay 0.99, starts at
0.01) of AGAR; unless :math:`\mathrm{AGAR}_t > 1.2\tau_{cal}` (memorisation guard) or
:math:`|\mathrm{AGAR}_t - \tau| \le \text{dead\_zone}\cdot\tau_{cal}`,
:math:`\tau \leftarrow \max((1-\alpha)\tau + \alpha\,\mathrm{AGAR}_t,\ \tau_{cal})` with
:math:`\alpha = 0.001 + \min(0.1\,s^2/(\nu + 10^{-8}),\ 0.009)`. Finally (decoupled decay):

.. math::

    \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\, C_t\,
        \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}.

How it runs. The math is three per-tensor kernels (``@kernel``: the eager functions are the
reference, ``implementation='compiled'``/``'auto'`` runs them through ``torch.compile``), split
where a statistic over the whole group must be finished first: (1) the new moments and the
sums of :math:`|m|` and :math:`v` (the clamp scales); (2) the sum of the AGAR terms; (3) the
update. Between the phases the per-tensor partial sums of every group are stacked into one
tensor and finished by one :func:`hf_optim._reduce.finish_sums` (one all-reduce per phase under
sharded training, nothing otherwise). The calibration, DDEA and confidence are a handful of
0-d (or window-sized) tensor ops per group; no step synchronises with the device.

Deviations from upstream 0.1.0/0.2.0, and why:

* ``center``: 0.1.0 centres the sigmoid on the calibration mean, so its DDEA is dead code; 0.2.0
  centres it on the DDEA threshold as THEORY section 2.5 says. Both are coherent readings of the
  README and theory, so both are offered; ``'tau'`` (the theory's adaptive threshold) is the
  default.
* ``adaptive_c_min=True`` (the default, as upstream): ``c_min`` is the confidence floor until
  calibration, then replaced by 0.1/0.3/0.5 chosen from the calibration CV (recorded in
  ``c_min_calibrated``). ``adaptive_c_min=False`` keeps the user's ``c_min`` (the README's
  "Minimum confidence floor") at all times. Measured on upstream's B2 benchmark (grokking with
  30% label noise, README settings, tau_init_steps=1000, 3 seeds): True 90.3 +- 1.8%
  validation accuracy, False 55.2 +- 14.8% (it underfits at confidence ~0.25).
* ``agar_bias_correction``: AGAR is computed from raw moments as the theory and upstream do (so it
  starts near 1 and decays on a ~1/(1-beta2) time scale whatever the signal-to-noise ratio);
  ``True`` computes it from the bias-corrected moments instead.
* In ``'parameter'`` granularity each tensor has its own calibration window of
  ``tau_init_steps`` of its own steps, its own DDEA and its own statistics. Upstream pushes one
  sample per tensor per step into the group's shared window, so calibration happened after about
  ``tau_init_steps / n_tensors`` steps and the DDEA ran n times per step.
* Calibration is on device and bounded: the window is a tensor of at most
  ``WINDOW_CAPACITY`` (1024) samples. Windows up to that length keep every sample, so the
  statistics are exact (upstream keeps a Python list and uses NumPy); a longer window keeps every
  ``ceil(tau_init_steps / 1024)``-th sample and its statistics are those of that systematic
  subsample (upstream would hold the whole window in memory). Percentiles use NumPy's default
  (linear) interpolation. The window statistics (a sort of the window) are computed only in the
  step that may complete the window: the holder keeps a Python-int copy of the fill count
  (``known_sample_count``; a lower bound with ``skip_nonfinite``), so after calibration a step costs a few 0-d ops whatever ``tau_init_steps`` is. Where
  the host cannot know (with ``skip_nonfinite=True`` a step may or may not count, and inside an
  outer ``torch.compile``) every step computes them and ``torch.where`` commits them when the
  window fills: still no host synchronisation, at the cost of one sort of at most 1024 samples
  per holder per step. ``tau_init_steps`` may be any integer in [1, 2**24] (upstream demands
  at least 50; the fill counter is a float32 tensor, exact to 2**24).
* Group AGAR and clamp scales are sums of per-tensor partial sums finished by
  :func:`hf_optim._reduce.finish_sums`, never flat copies of the moments (upstream keeps two
  group-sized flat buffers, which also crashed when a tensor gained its gradient after the first
  step). Under sharded training (FSDP2 DTensors) every kernel works on the local shard and each
  rank contributes its shard's sums (a replicated tensor counts on one rank only), so a group
  means the same as on one process. AGAR is accumulated in float32 (float64 for float64
  parameters) whatever the parameter dtype; the moments keep the parameter dtype, as in
  ``torch.optim.AdamW``.
* Group state lives in the param-group dict, so ``add_param_group`` after construction works
  (upstream: KeyError) and ``state_dict()`` holds only tensors and Python scalars;
  ``load_state_dict`` does not mutate its argument.
* NaN/Inf gradients are not checked by default (upstream raises, at two host syncs per tensor).
  ``skip_nonfinite=True`` skips a step whose gradients (or loss, when one is given) are not all
  finite, decided on the device: parameters, moments, step counts and the calibration state stay
  exactly as before, and the group entry ``skipped_steps`` counts such steps. The check rides on
  the second phase's reduction; the cost is that moments are then recomputed in each phase
  instead of stored in the first (more memory traffic per step). Without it, as in Adam, a NaN
  gradient poisons the moments, and here also the AGAR statistics of its group (or tensor).
* No logging and no global ``'CASMO'`` logger handler; read ``statistics()`` (AGAR, confidence,
  tau, calibrated flag per group) when logging instead.
* Sparse gradients raise ``RuntimeError`` as in upstream (there NotImplementedError); complex
  parameters are refused at construction (optimise ``torch.view_as_real(p)`` instead).
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

import math
from typing import Any

import torch
from torch import Tensor

from ._base import HFOptimizer, check_betas, check_choice, check_flag, check_range
from ._kernels import kernel, wide_sum
from ._reduce import accumulation_dtype, counts, finish_sums, local, reduction_group, valid_numel

__all__ = ["CASMO"]

GRANULARITIES = ("group", "parameter")
CENTERS = ("tau", "mean")

# Constants of the early calibration and DDEA (upstream 0.1.0/0.2.0).
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

#: Most AGAR samples a calibration window stores; longer windows keep every k-th sample.
WINDOW_CAPACITY = 1024
#: The fill counter is a float32 tensor: exact up to here.
MAX_TAU_INIT_STEPS = 2**24

#: Calibration/confidence tensors (in the group dict in 'group' mode, in state[p] otherwise).
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
#: A Python int copy of ``agar_sample_count`` on the host (a lower bound of it with
#: ``skip_nonfinite``, -1 when unknown): a step that certainly only collects, or certainly
#: comes after calibration, skips the window statistics.
HOST_COUNT_KEY = "known_sample_count"
SUMMARY_KEYS = ("agar", "confidence", "tau", "calibrated")

COLLECTING, CALIBRATED, UNKNOWN = "collecting", "calibrated", "unknown"


class CASMO(HFOptimizer):
    """Adam whose step is scaled by a confidence derived from the gradient signal-to-noise
    ratio (AGAR), calibrated over the first ``tau_init_steps`` steps and tracked by a
    drift-detecting threshold adapter. See the module docstring for the math.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0; a float or a 0-d tensor).
        betas: EMA coefficients of the first and second moments, each in [0, 1).
        eps: added to the Adam denominator and used as the AGAR noise floor (>= 0).
        weight_decay: decoupled weight decay (>= 0), not scaled by the confidence.
        granularity: ``'group'`` (one AGAR and confidence per param group) or
            ``'parameter'`` (one per tensor, each with its own calibration window).
        tau_init_steps: calibration window, in optimizer steps (integer in [1, 2**24]).
        tau_clip_range: ``(low, high)`` bounds of the calibrated threshold, 0 <= low <= high <= 1.
        tau_dead_zone: DDEA ignores deviations below this fraction of the calibrated threshold.
        c_min: confidence floor in [0, 1] (until calibration with ``adaptive_c_min``).
        agar_clamp_factor: outlier clamp of the moments at this multiple of their mean
            magnitude (> 0), or ``None`` for no clamping.
        center: sigmoid centre after calibration: ``'tau'`` (DDEA threshold, upstream 0.2.0)
            or ``'mean'`` (calibration mean, upstream 0.1.0).
        adaptive_c_min: replace ``c_min`` after calibration by 0.1/0.3/0.5 from the
            calibration CV, as upstream does (default; ``False`` keeps ``c_min`` throughout).
        agar_bias_correction: compute AGAR from bias-corrected moments.
        implementation: ``'auto'`` (compiled kernels where a compiler works), ``'compiled'``
            or ``'eager'`` (the reference).
        skip_nonfinite: skip, on the device, a step whose gradients (or loss) are not all
            finite, leaving parameters and state unchanged; counted in ``skipped_steps``.
    """

    statistic_keys = ("agar", "confidence", "tau", "calibrated", "skipped_steps")
    wide_state_keys = frozenset(CALIBRATION_KEYS)  # 'parameter' mode keeps them in state[p]
    counter_state_keys = frozenset({"step"})
    group_state_keys = (*CALIBRATION_KEYS, HOST_COUNT_KEY, "skipped_steps")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
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
        adaptive_c_min: bool = True,
        agar_bias_correction: bool = False,
        *,
        implementation: str = "auto",
        skip_nonfinite: bool = False,
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
            implementation=implementation,
            skip_nonfinite=skip_nonfinite,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As the base's; the group's calibration state is created here, with the group, so
        that torch.distributed.checkpoint's template of a fresh optimizer already holds every
        group entry it must restore (it loads only the keys its template has)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["params"]:
            self._init_group_state(group, group["params"][0])

    def _reset_transient(self) -> None:
        super()._reset_transient()
        self._count_columns: dict[tuple[Any, ...], Tensor] = {}

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first invalid hyperparameter and its valid values."""
        check_range("lr", group["lr"], 0.0)
        check_betas("betas", group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_choice("granularity", group["granularity"], GRANULARITIES)
        tau_init_steps = group["tau_init_steps"]
        if isinstance(tau_init_steps, bool) or not isinstance(tau_init_steps, int):
            raise ValueError(
                f"tau_init_steps must be an integer in [1, {MAX_TAU_INIT_STEPS}], "
                f"got {tau_init_steps!r}"
            )
        check_range("tau_init_steps", tau_init_steps, 1, MAX_TAU_INIT_STEPS)
        tau_clip_range = group["tau_clip_range"]
        if not isinstance(tau_clip_range, (tuple, list)) or len(tau_clip_range) != 2:
            raise ValueError(
                f"tau_clip_range must be a pair (low, high) with 0 <= low <= high <= 1, "
                f"got {tau_clip_range!r}"
            )
        check_range("tau_clip_range[0]", tau_clip_range[0], 0.0, 1.0)
        check_range("tau_clip_range[1]", tau_clip_range[1], tau_clip_range[0], 1.0)
        check_range("tau_dead_zone", group["tau_dead_zone"], 0.0, 1.0)
        check_range("c_min", group["c_min"], 0.0, 1.0)
        if group["agar_clamp_factor"] is not None:
            check_range("agar_clamp_factor", group["agar_clamp_factor"], 0.0, low_open=True)
        check_choice("center", group["center"], CENTERS)
        check_flag("adaptive_c_min", group["adaptive_c_min"])
        check_flag("agar_bias_correction", group["agar_bias_correction"])

    # -- state ------------------------------------------------------------------------------
    def _init_param_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        # a float32 tensor on the parameter's device, as torch's capturable optimizers
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["granularity"] == "parameter":
            state.update(_new_calibration_state(group, p.device, accumulation_dtype(p.dtype)))

    def _init_group_state(self, group: dict[str, Any], like: Tensor) -> None:
        """The group's calibration state ('group' mode) or its summary ('parameter' mode),
        created lazily so that ``add_param_group`` after construction works."""
        dtype = accumulation_dtype(like.dtype)
        if "agar" not in group:
            fresh = _new_calibration_state(group, like.device, dtype)
            if group["granularity"] == "parameter":
                fresh = {key: fresh[key] for key in SUMMARY_KEYS}
            group.update(fresh)
        if self.defaults["skip_nonfinite"] and "skipped_steps" not in group:
            group["skipped_steps"] = torch.zeros((), dtype=torch.float32, device=like.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base's; then every calibration window gets the host-side bounds of its fill
        count from the loaded counter (read once here, never in ``step()``), and a window
        saved with more samples than this version stores is subsampled."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            holders = [group] if group["granularity"] == "group" else []
            holders += [self.state[p] for p in group["params"] if p in self.state]
            for holder in holders:
                present = [key for key in CALIBRATION_KEYS if key in holder]
                if not present or (holder is not group and len(present) == len(SUMMARY_KEYS)):
                    continue
                missing = [key for key in CALIBRATION_KEYS if key not in holder]
                if missing:
                    raise ValueError(
                        f"cannot load this state_dict into CASMO: calibration state lacks "
                        f"{missing}; it was saved by another optimizer or configuration"
                    )
                holder["agar_samples"] = _fit_window(holder["agar_samples"], group)
                count = min(int(holder["agar_sample_count"].item()), group["tau_init_steps"])
                holder[HOST_COUNT_KEY] = count

    # -- the step -----------------------------------------------------------------------------
    def _step(self, loss: Any) -> None:
        plans = []
        for group in self.param_groups:  # a loop: dynamo breaks on a walrus in a comprehension
            plan = self._plan(group)
            if plan is not None:
                plans.append(plan)
        if not plans:
            return
        process_group = reduction_group([p for plan in plans for p in plan.params])
        for plan in plans:
            plan.counted = [counts(p, process_group) for p in plan.params]

        # phase 1: this step's moments (stored unless the step may be skipped) and the sums
        # of |m| and v behind the clamp scales
        partial = torch.cat([plan.clamp_partials(self) for plan in plans])
        totals = finish_sums(partial, process_group).split([len(plan) for plan in plans])
        for plan, total in zip(plans, totals, strict=True):
            plan.set_bounds(total)

        # phase 2: the sums of the AGAR terms (and of non-finite gradient elements)
        partial = torch.cat([plan.agar_partials(self) for plan in plans])
        totals = finish_sums(partial, process_group).split([len(plan) for plan in plans])
        ok = _finite_step(plans, totals, loss, self)
        if isinstance(ok, Tensor):  # skip_nonfinite: counted in every group
            for group in self.param_groups:
                if "skipped_steps" in group:  # a group without parameters has none
                    group["skipped_steps"].add_((~ok).to(torch.float32))

        # calibration, DDEA, confidence; then phase 3: the update
        for plan, total in zip(plans, totals, strict=True):
            plan.update_confidence(total, ok)
            plan.update(self, ok)

    def _plan(self, group: dict[str, Any]) -> _GroupStep | None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("CASMO does not support sparse gradients")
            if not self.state[p]:
                self._init_param_state(group, p)
        self._init_group_state(group, params[0])
        return _GroupStep(
            group, params, [self.state[p] for p in params], self.defaults["skip_nonfinite"]
        )

    def _count_column(self, numbers: list[int], like: Tensor) -> Tensor:
        """Element counts as a column on ``like``'s device, cached: a tensor built from a
        Python list every step would be a blocking host-to-device copy on accelerators."""
        key = (tuple(numbers), like.device, like.dtype)
        column = None if torch.compiler.is_compiling() else self._count_columns.get(key)
        if column is None:
            column = torch.tensor(numbers, dtype=like.dtype, device=like.device).unsqueeze(1)
            if not torch.compiler.is_compiling():
                self._count_columns[key] = column
        return column

    def _hyper(self, group: dict[str, Any], like: Tensor) -> dict[str, Tensor]:
        """The group's per-step values as cached 0-d tensors (no recompiles, no copies)."""
        values = {
            key: self._scalar(group, key, like)
            for key in ("lr", "eps", "weight_decay", "agar_bias_correction")
        }
        dtype = accumulation_dtype(like.dtype)
        for index, name in enumerate(("beta1", "beta2")):
            beta = group["betas"][index]
            key = (id(group), "betas", index, like.device, dtype)
            cached = self._scalars.get(key)
            if cached is None or cached[0] != beta:
                if cached is None:
                    cached = (beta, torch.tensor(float(beta), dtype=dtype, device=like.device))
                else:
                    cached[1].fill_(float(beta))
                    cached = (beta, cached[1])
                self._scalars[key] = cached
            values[name] = cached[1]
        return values


class _GroupStep:
    """One param group's tensors for one step, carried through the three phases."""

    def __init__(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        skip: bool,
    ) -> None:
        self.group = group
        self.params = params
        self.states = states
        self.per_parameter = group["granularity"] == "parameter"
        self.holders = states if self.per_parameter else [group]
        self.fresh = skip  # moments recomputed in each phase, stored only if the step is finite
        self.counted: list[bool] = []
        self.tensors = [
            (local(p), local(p.grad), local(s["exp_avg"]), local(s["exp_avg_sq"]), s["step"])
            for p, s in zip(params, states, strict=True)
        ]
        self.numels: Tensor | None = None  # elements per holder, finished
        self.bounds: list[tuple[Tensor, Tensor]] = []
        self.confidences: list[Tensor] = []
        self._per_device: dict[tuple[Any, ...], tuple[dict[str, Tensor], bool]] = {}

    def hyper(self, optimizer: CASMO, like: Tensor) -> tuple[dict[str, Tensor], bool]:
        """The group's 0-d hyperparameters for tensors like ``like``, and whether kernels
        run compiled for them (looked up once per step per device and dtype)."""
        key = (like.device, like.dtype)
        found = self._per_device.get(key)
        if found is None:
            found = (optimizer._hyper(self.group, like), optimizer._compiled(like))
            self._per_device[key] = found
        return found

    def __len__(self) -> int:
        return len(self.holders)

    def _rows(self, sums: list[Tensor]) -> Tensor:
        """Per-tensor partial sums -> one row per holder (uncounted replicas contribute 0)."""
        if self.per_parameter:
            return torch.stack(
                [
                    s if kept else torch.zeros_like(s)
                    for s, kept in zip(sums, self.counted, strict=True)
                ]
            )
        kept = [s for s, keep in zip(sums, self.counted, strict=True) if keep]
        if not kept:
            return torch.zeros_like(sums[0]).unsqueeze(0)
        return torch.stack(kept).sum(0, keepdim=True)

    def compiled(self, optimizer: CASMO) -> bool:
        return self.hyper(optimizer, self.tensors[0][0])[1]

    def clamp_partials(self, optimizer: CASMO) -> Tensor:
        if not self.fresh:  # the moments are stored in this phase: count the step first
            torch._foreach_add_([step for *_, step in self.tensors], 1.0)
        items = []
        for param, grad, exp_avg, exp_avg_sq, step in self.tensors:
            h = self.hyper(optimizer, param)[0]
            items.append(
                (grad, exp_avg, exp_avg_sq, step, h["beta1"], h["beta2"],
                 h["agar_bias_correction"], not self.fresh)
            )  # fmt: skip
        sums = _clamp_sums.map(items, compiled=self.compiled(optimizer))
        rows = self._rows(sums)
        numels = [
            valid_numel(p) if keep else 0 for p, keep in zip(self.params, self.counted, strict=True)
        ]
        if not self.per_parameter:
            numels = [sum(numels)]
        return torch.cat([rows, optimizer._count_column(numels, rows)], dim=1)

    def set_bounds(self, total: Tensor) -> None:
        abs_m_sums, v_sums, self.numels = total.unbind(1)
        factor, eps = self.group["agar_clamp_factor"], self.group["eps"]
        if factor is None:
            # two tensors: one tensor passed twice would be another graph for the compiler
            m_bounds, v_bounds = torch.full((2, len(self)), math.inf, dtype=abs_m_sums.dtype,
                                            device=abs_m_sums.device)  # fmt: skip
            self.bounds = list(zip(m_bounds.unbind(), v_bounds.unbind(), strict=True))
            return
        elements = self.numels.clamp(min=1)
        m_bounds = factor * (abs_m_sums / elements + eps)
        v_bounds = factor * (v_sums / elements + eps)
        self.bounds = list(zip(m_bounds.unbind(), v_bounds.unbind(), strict=True))

    def _holder_of(self, index: int) -> int:
        return index if self.per_parameter else 0

    def agar_partials(self, optimizer: CASMO) -> Tensor:
        items = []
        for index, (param, grad, exp_avg, exp_avg_sq, step) in enumerate(self.tensors):
            h = self.hyper(optimizer, param)[0]
            m_bound, v_bound = self.bounds[self._holder_of(index)]
            items.append(
                (grad, exp_avg, exp_avg_sq, step, h["beta1"], h["beta2"],
                 h["agar_bias_correction"], h["eps"], m_bound, v_bound, self.fresh)
            )  # fmt: skip
        sums = _agar_sums.map(items, compiled=self.compiled(optimizer))
        return self._rows(sums)

    def update_confidence(self, total: Tensor, ok: Tensor | bool) -> None:
        ratio_sums = total[:, 0]
        agars = (ratio_sums / self.numels.clamp(min=1)).clamp(0, 1)
        if not self.fresh:
            ok = True
        group = self.group
        window = group["tau_init_steps"]
        by_stage: dict[str, list[int]] = {}
        for index, holder in enumerate(self.holders):
            by_stage.setdefault(_stage(holder, window, self.fresh), []).append(index)
        confidences: list[Tensor] = [None] * len(self.holders)  # type: ignore[list-item]
        for stage, indices in by_stage.items():
            holders = [self.holders[i] for i in indices]
            rows = _Rows(holders, agars.dtype)
            if len(indices) == len(self.holders):
                stage_agars = agars
            else:
                stage_agars = agars[torch.tensor(indices, device=agars.device)]
            batch = _confidence_math(rows, stage_agars, ok, group, stage)
            rows.write_back()
            for i, confidence in zip(indices, batch.unbind(), strict=True):
                confidences[i] = confidence
            if not self.fresh:
                for holder in holders:
                    _advance_host_count(holder, window)
        self.confidences = confidences
        if self.per_parameter:
            self._summarise(ok)

    def _summarise(self, ok: Tensor | bool) -> None:
        """'parameter' mode: the group statistics are element-weighted means over the tensors
        stepped this step (``confidence`` is the mean learning-rate scale per element). The
        weights are finished counts, so this needs no further reduction."""
        group = self.group
        dtype = group["agar"].dtype
        values = torch.stack(
            [torch.stack([h[k].to(dtype) for h in self.holders]) for k in SUMMARY_KEYS], dim=1
        ).to(group["agar"].device)
        weights = self.numels.to(values.device, dtype)
        means = (weights @ values) / weights.sum().clamp(min=1)
        olds = [group[k] for k in SUMMARY_KEYS]
        news = [_where(ok, new, old) for new, old in zip(means.unbind(), olds, strict=True)]
        torch._foreach_copy_(olds, news)

    def update(self, optimizer: CASMO, ok: Tensor | bool) -> None:
        guard = ok if self.fresh else None
        items = []
        for index, (param, grad, exp_avg, exp_avg_sq, step) in enumerate(self.tensors):
            h = self.hyper(optimizer, param)[0]
            confidence = self.confidences[self._holder_of(index)]
            items.append(
                (param, grad, exp_avg, exp_avg_sq, step, h["lr"], h["weight_decay"], h["eps"],
                 h["beta1"], h["beta2"], confidence, guard, self.fresh)
            )  # fmt: skip
        _casmo_update.map(items, compiled=self.compiled(optimizer))
        if self.fresh:  # the step counts only where it was finite
            steps = [step for *_, step in self.tensors]
            # a list of 0-d tensors: the single-tensor overload reads the scalar on the host
            torch._foreach_add_(steps, [ok.to(torch.float32)] * len(steps))


def _finite_step(plans: list[_GroupStep], totals: list[Tensor], loss: Any, optimizer: CASMO):
    """With ``skip_nonfinite`` (optimizer-wide): a 0-d bool, True when every gradient element
    (and the loss, if given) is finite. ``True`` without it."""
    checked = [total[:, 1].sum() for plan, total in zip(plans, totals, strict=True) if plan.fresh]
    if not checked:
        return True
    ok = torch.stack(checked).sum() == 0
    if loss is not None:
        ok = ok & torch.isfinite(optimizer._loss_tensor(loss, totals[0])).to(ok.device)
    return ok


# -- kernels: the per-tensor math, eager reference and compiled fast path --------------------
def _new_moments(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: Tensor, beta2: Tensor
) -> tuple[Tensor, Tensor]:
    """This step's moments, computed in the accumulation dtype and rounded to the state's."""
    g = grad.to(beta1.dtype)
    m = beta1 * exp_avg.to(beta1.dtype) + (1 - beta1) * g
    v = beta2 * exp_avg_sq.to(beta1.dtype) + (1 - beta2) * (g * g)
    return m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)


def _agar_corrections(
    step: Tensor, beta1: Tensor, beta2: Tensor, bias_correction: Tensor, counted: bool
) -> tuple[Tensor, Tensor]:
    """The divisors of the moments AGAR reads at this step's ``t``: ``1 - beta^t`` when
    ``bias_correction`` is 1, exactly 1 when it is 0 (no branch needed). ``counted``: the
    caller has counted this step in ``step`` already."""
    t = step if counted else step + 1
    return 1 - beta1**t * bias_correction, 1 - beta2**t * bias_correction


def _agar_moments(m: Tensor, v: Tensor, agar1: Tensor, agar2: Tensor) -> tuple[Tensor, Tensor]:
    """The moments AGAR reads, in the accumulation dtype."""
    return m.to(agar1.dtype) / agar1, v.to(agar2.dtype) / agar2


def _clamp_scalars(grad, exp_avg, exp_avg_sq, step, beta1, beta2, bias_correction, store):
    return _agar_corrections(step, beta1, beta2, bias_correction, counted=store)


@kernel(scalars=_clamp_scalars)
def _clamp_sums(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    bias_correction: Tensor,
    store: bool,
    agar1: Tensor,
    agar2: Tensor,
) -> Tensor:
    """Phase 1: the new moments (written when ``store``; the caller has counted the step) and
    this tensor's partial sums ``[sum |m|, sum v]`` of the moments AGAR reads (``agar1``,
    ``agar2``: :func:`_agar_corrections`)."""
    m, v = _new_moments(grad, exp_avg, exp_avg_sq, beta1, beta2)
    if store:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    dtype = agar1.dtype  # the divisors are positive: divide the sums, not every element
    return torch.stack([wide_sum(m.to(dtype).abs()) / agar1, wide_sum(v.to(dtype)) / agar2])


def _agar_scalars(
    grad, exp_avg, exp_avg_sq, step, beta1, beta2, bias_correction, eps, m_bound, v_bound, fresh
):
    return _agar_corrections(step, beta1, beta2, bias_correction, counted=not fresh)


@kernel(scalars=_agar_scalars)
def _agar_sums(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    bias_correction: Tensor,
    eps: Tensor,
    m_bound: Tensor,
    v_bound: Tensor,
    fresh: bool,
    agar1: Tensor,
    agar2: Tensor,
) -> Tensor:
    """Phase 2: ``[sum_i S_i / (S_i + N_i + eps), non-finite gradient elements]`` with the
    finished clamp bounds. ``fresh``: the moments were not stored; recompute them."""
    if fresh:
        m, v = _new_moments(grad, exp_avg, exp_avg_sq, beta1, beta2)
    else:
        m, v = exp_avg, exp_avg_sq
    m, v = _agar_moments(m, v, agar1, agar2)
    signal = m.clamp(-m_bound, m_bound).square()
    noise = (v.clamp(max=v_bound) - signal).clamp(min=eps)
    ratio_sum = wide_sum(signal / (signal + noise + eps))
    if fresh:
        nonfinite = torch.isfinite(grad).logical_not().sum().to(ratio_sum.dtype)
    else:
        nonfinite = torch.zeros_like(ratio_sum)
    return torch.stack([ratio_sum, nonfinite])


def _update_scalars(
    param, grad, exp_avg, exp_avg_sq, step, lr, weight_decay, eps, beta1, beta2, confidence,
    ok, fresh,
):  # fmt: skip
    """The bias corrections ``1 - beta^t`` of the update."""
    t = step + 1 if fresh else step
    return 1 - beta1**t, 1 - beta2**t


@kernel(scalars=_update_scalars)
def _casmo_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    weight_decay: Tensor,
    eps: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    confidence: Tensor,
    ok: Tensor | None,
    fresh: bool,
    bias1: Tensor,
    bias2: Tensor,
) -> None:
    """Phase 3: p <- p (1 - lr wd) - lr C m_hat / (sqrt(v_hat) + eps). ``fresh``: the
    moments and parameter are written here, and only where ``ok`` (the caller counts the
    step)."""
    if fresh:
        m, v = _new_moments(grad, exp_avg, exp_avg_sq, beta1, beta2)
    else:
        m, v = exp_avg, exp_avg_sq
    dtype = beta1.dtype
    m_hat = m.to(dtype) / bias1
    v_hat = v.to(dtype) / bias2
    decayed = param.to(dtype) * (1 - lr * weight_decay)
    new_param = (decayed - (lr * confidence) * (m_hat / (v_hat.sqrt() + eps))).to(param.dtype)
    if fresh:
        param.copy_(torch.where(ok, new_param, param))
        exp_avg.copy_(torch.where(ok, m, exp_avg))
        exp_avg_sq.copy_(torch.where(ok, v, exp_avg_sq))
    else:
        param.copy_(new_param)


# -- calibration, DDEA and confidence: 0-d (or window-sized) tensor math ---------------------
def _window_stride(window: int) -> int:
    """Every ``stride``-th sample of a window is stored (1 for windows that fit)."""
    return -(-window // WINDOW_CAPACITY)


def _new_calibration_state(
    group: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    def scalar(value: float) -> Tensor:  # a fill, not a host-to-device copy
        return torch.full((), value, dtype=dtype, device=device)

    window = group["tau_init_steps"]
    return {
        "agar": scalar(0.0),
        "confidence": scalar(group["c_min"]),
        "tau": scalar(0.0),
        "calibrated": scalar(0.0),
        "agar_samples": torch.zeros(window // _window_stride(window), dtype=dtype, device=device),
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
        HOST_COUNT_KEY: 0,
    }


def _fit_window(samples: Tensor, group: dict[str, Any]) -> Tensor:
    """A loaded window in this version's size (older versions stored every sample)."""
    window = group["tau_init_steps"]
    stride = _window_stride(window)
    size = window // stride
    if samples.numel() == size:
        return samples
    if samples.numel() == window:
        return samples[stride - 1 :: stride][:size].clone()
    raise ValueError(
        f"cannot load this state_dict into CASMO: its calibration window holds "
        f"{samples.numel()} samples, but tau_init_steps={window} stores {size}"
    )


def _stage(holder: dict[str, Any], window: int, skip: bool) -> str:
    """What the host knows of a holder's calibration before this step."""
    if torch.compiler.is_compiling():
        return UNKNOWN  # the host count is a Python int: reading it would specialise the graph
    known = holder[HOST_COUNT_KEY]
    if known >= window:
        return CALIBRATED
    if known < 0 or skip:  # with skip_nonfinite a step may or may not count
        return UNKNOWN
    return COLLECTING if known + 1 < window else UNKNOWN


def _advance_host_count(holder: dict[str, Any], window: int) -> None:
    """Without skip_nonfinite every step of a holder counts until the window is full."""
    if torch.compiler.is_compiling():
        holder[HOST_COUNT_KEY] = -1  # unknown from now on (until a load_state_dict)
    elif holder[HOST_COUNT_KEY] >= 0:
        holder[HOST_COUNT_KEY] = min(holder[HOST_COUNT_KEY] + 1, window)


class _Rows:
    """Calibration entries of several holders as stacked rows, read and written lazily.

    One holder: views of its 0-d entries (writes go straight through). Several holders
    ('parameter' mode): stacked copies of the entries the math touches, written back once."""

    def __init__(self, holders: list[dict[str, Any]], dtype: torch.dtype) -> None:
        self.holders = holders
        self.dtype = dtype
        self.rows: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.rows:
            if len(self.holders) == 1:
                self.rows[key] = self.holders[0][key].unsqueeze(0)
            else:
                self.rows[key] = torch.stack([h[key].to(self.dtype) for h in self.holders])
        return self.rows[key]

    def write_back(self) -> None:
        if len(self.holders) == 1:
            return
        for key, rows in self.rows.items():
            torch._foreach_copy_([h[key] for h in self.holders], list(rows.unbind()))


def _where(mask: Tensor | bool, new: Tensor, old: Tensor) -> Tensor:
    if mask is True:
        return new
    if mask is False:
        return old
    return torch.where(mask, new, old)


def _and(a: Tensor | bool, b: Tensor | bool) -> Tensor | bool:
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    return a & b


def _not(a: Tensor | bool) -> Tensor | bool:
    return (not a) if isinstance(a, bool) else ~a


def _or(a: Tensor | bool, b: Tensor | bool) -> Tensor | bool:
    return _not(_and(_not(a), _not(b)))


def _percentile(ordered: Tensor, q: float) -> Tensor:
    """NumPy's default ('linear') percentile of each row of row-sorted samples."""
    last = ordered.shape[-1] - 1
    position = q * last
    low = int(position)
    high = min(low + 1, last)
    return torch.lerp(ordered[:, low], ordered[:, high], position - low)


def _confidence_math(
    rows: _Rows, agar: Tensor, ok: Tensor | bool, group: dict[str, Any], stage: str
) -> Tensor:
    """Record one AGAR sample per holder, calibrate, run the DDEA; return the confidences.

    Branch-free on tensor values: where the host does not know the phase (``stage`` UNKNOWN)
    every phase is computed and ``torch.where`` keeps the one that applies, so ``step()`` never
    waits for the device. ``ok`` False (a skipped step) leaves every entry as it was."""
    window = group["tau_init_steps"]
    stride = _window_stride(window)
    if stage == CALIBRATED:
        was_calibrated: Tensor | bool = True
    elif stage == COLLECTING:
        was_calibrated = False
    else:
        was_calibrated = rows["calibrated"] > 0
    collecting = _and(_not(was_calibrated), ok)
    calibrating: Tensor | bool = False

    # the calibration window: store the sample at its slot while collecting
    if collecting is not False:
        samples, count = rows["agar_samples"], rows["agar_sample_count"]
        new_count = count + 1
        stored = _and(collecting, new_count % stride == 0) if stride > 1 else collecting
        slot = torch.div(new_count, stride, rounding_mode="floor") - 1
        slot = slot.clamp(0, samples.shape[-1] - 1).to(torch.long).unsqueeze(1)
        kept = samples.gather(1, slot).squeeze(1)
        samples.scatter_(1, slot, _where(stored, agar, kept).unsqueeze(1))
        count.copy_(_where(collecting, new_count, count))
        if stage != COLLECTING:
            calibrating = _and(collecting, count >= window)

    # the calibration statistics, committed in the step that fills the window
    if calibrating is not False:
        samples = rows["agar_samples"]
        size = samples.shape[-1]
        ordered = samples.sort(dim=1).values
        mean = samples.mean(dim=1)
        std = (samples - mean.unsqueeze(1)).square().mean(dim=1).sqrt()  # population std
        median = (ordered[:, (size - 1) // 2] + ordered[:, size // 2]) * 0.5
        coefficient_of_variation = std / (mean + 1e-8)
        adaptive_floor = torch.full_like(agar, C_MIN_FOR_LOW_CV)
        adaptive_floor = torch.where(
            coefficient_of_variation > CV_MEDIUM, C_MIN_FOR_MEDIUM_CV, adaptive_floor
        )
        adaptive_floor = torch.where(
            coefficient_of_variation > CV_HIGH, C_MIN_FOR_HIGH_CV, adaptive_floor
        )
        tau_low, tau_high = group["tau_clip_range"]
        for key, value in (
            ("agar_mean", mean),
            ("agar_std", std.clamp(min=MIN_AGAR_STD)),
            ("agar_median", median),
            ("agar_p10", _percentile(ordered, 0.1)),
            ("agar_p90", _percentile(ordered, 0.9)),
            ("tau_calibrated", median.clamp(tau_low, tau_high)),
            ("c_min_calibrated", adaptive_floor),
        ):
            rows[key].copy_(_where(calibrating, value, rows[key]))
        rows["calibrated"].copy_(_where(calibrating, torch.ones_like(agar), rows["calibrated"]))
        rows["tau"].copy_(_where(calibrating, rows["tau_calibrated"], rows["tau"]))

    # DDEA, for the samples after the calibration step
    if was_calibrated is not False:
        adapting = _and(was_calibrated, ok)
        tau, tau_cal = rows["tau"], rows["tau_calibrated"]
        ddea_mean, ddea_var = rows["ddea_mean"], rows["ddea_var"]
        difference = agar - ddea_mean
        new_mean = ddea_mean + DDEA_MEAN_RATE * difference
        new_var = DDEA_VAR_DECAY * ddea_var + (1 - DDEA_VAR_DECAY) * difference.square()
        gain = DDEA_MIN_GAIN + (DDEA_GAIN_SCALE * new_var / (new_mean + 1e-8)).clamp(
            max=DDEA_MAX_EXTRA_GAIN
        )
        moves = (agar <= MEMORIZATION_FACTOR * tau_cal) & (
            (agar - tau).abs() > group["tau_dead_zone"] * tau_cal
        )
        adapted_tau = torch.where(moves, torch.maximum(torch.lerp(tau, agar, gain), tau_cal), tau)
        ddea_mean.copy_(_where(adapting, new_mean, ddea_mean))
        ddea_var.copy_(_where(adapting, new_var, ddea_var))
        tau.copy_(_where(adapting, adapted_tau, tau))

    # the confidence
    calibrated = _or(was_calibrated, calibrating)
    mapped = None
    if calibrated is not False:
        centre = rows["tau"] if group["center"] == "tau" else rows["agar_mean"]
        floor = rows["c_min_calibrated"] if group["adaptive_c_min"] else group["c_min"]
        sigmoid = torch.sigmoid((agar - centre) / rows["agar_std"])
        mapped = (floor + (1 - floor) * sigmoid).clamp(min=floor).clamp(max=1.0)
    passthrough = agar.clamp(group["c_min"], 1.0) if calibrated is not True else None
    confidence = _where(calibrated, mapped, passthrough)  # type: ignore[arg-type]
    rows["confidence"].copy_(_where(ok, confidence, rows["confidence"]))
    rows["agar"].copy_(_where(ok, agar, rows["agar"]))
    return rows["confidence"]
