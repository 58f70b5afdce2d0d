"""Momo and MomoAdam: parity with momo-opt 0.1.0, the SGD-M/Adam anchors, and the fixes
(zero gradients, bfloat16 statistics, resume, one reduction per step).

The conformance battery (tests/test_conformance.py) covers what every optimizer must do.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from cases import IMPLEMENTATIONS

import hf_optim.momo as momo_module
from hf_optim.momo import Momo
from hf_optim.momo_adam import MomoAdam

try:
    import momo as upstream
except ImportError:  # pragma: no cover - CI installs momo-opt
    upstream = None

needs_upstream = pytest.mark.skipif(
    upstream is None,
    reason="momo-opt 0.1.0 is not installed (pip install momo-opt==0.1.0); CI installs it",
)

STEPS = 60


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        dtype
    )


def data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.sin(x[:, :3]) + 0.05 * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def batch_loss(model: torch.nn.Module, step: int, x: torch.Tensor, y: torch.Tensor):
    rows = slice(8 * (step % 8), 8 * (step % 8) + 8)
    return F.mse_loss(model(x[rows]), y[rows])


def groups_of(model: torch.nn.Module, second_group: dict | None) -> list:
    params = list(model.parameters())
    if second_group is None:
        return params
    return [{"params": params[:2]}, {"params": params[2:], **second_group}]


@contextlib.contextmanager
def float64_default():
    """momo-opt creates some statistics with the default dtype (``torch.zeros(1)``,
    ``torch.tensor(0.)``): float32, which would limit a float64 comparison to ~1e-6."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def run(
    factory,
    second_group=None,
    steps=STEPS,
    dtype=torch.float64,
    loss_as_float=False,
    upstream_dtype=False,
):
    """Train the small model; return (model, optimizer, per-step group-0 tau or None).

    ``upstream_dtype``: run the optimizer under :func:`float64_default` (for momo-opt)."""
    model = make_model(dtype)
    x, y = data(dtype)
    context = float64_default() if upstream_dtype else contextlib.nullcontext()
    taus = []
    with context, warnings.catch_warnings():
        optimizer = factory(groups_of(model, second_group))
        warnings.simplefilter("ignore")  # momo-opt warns twice per step with two groups
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model, step, x, y)
            loss.backward()
            if isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
                optimizer.step()  # the anchors take no loss
            else:
                optimizer.step(loss=loss.item() if loss_as_float else loss)
            tau = optimizer.param_groups[0].get("tau")
            taus.append(None if tau is None else float(tau))
    return model, optimizer, taus


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-10, atol=1e-12) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


# -- parity with momo-opt 0.1.0 ----------------------------------------------------------------
MOMO_CONFIGS = {
    "default": {"lr": 1.0},
    "polyak-active": {"lr": 10.0},
    "weight-decay": {"lr": 10.0, "weight_decay": 1e-2},
    "fstar": {"lr": 10.0, "use_fstar": True},
    "fstar-weight-decay-lb": {"lr": 10.0, "use_fstar": True, "weight_decay": 1e-2, "lb": 0.01},
    "bias-correction": {"lr": 5.0, "bias_correction": True, "weight_decay": 1e-3},
    "bias-correction-fstar": {"lr": 5.0, "bias_correction": True, "use_fstar": True},
}
SECOND_GROUPS = {"one-group": None, "two-groups": {"lr": 3.0, "weight_decay": 0.05}}


def parity_cases(configs: dict, groups: dict, full: str) -> list:
    """Every configuration with the compiled kernels; the eager reference for the fullest one
    (the conformance battery proves the two equal in general)."""
    cases = [(c, g, "compiled") for c in configs for g in groups]
    return cases + [(full, g, "eager") for g in groups]


def parity_id(case: tuple) -> str:
    return f"{case[0]}-{case[1]}-{case[2]}"


MOMO_PARITY = parity_cases(MOMO_CONFIGS, SECOND_GROUPS, "fstar-weight-decay-lb")


@needs_upstream
@pytest.mark.parametrize(
    "config,second,implementation", MOMO_PARITY, ids=map(parity_id, MOMO_PARITY)
)
def test_momo_matches_momo_opt(config: str, second: str, implementation: str) -> None:
    kwargs, second_group = MOMO_CONFIGS[config], SECOND_GROUPS[second]
    reference, ref_opt, _ = run(
        lambda p: upstream.Momo(p, **kwargs), second_group, upstream_dtype=True
    )
    ours, opt, taus = run(lambda p: Momo(p, **kwargs, implementation=implementation), second_group)
    assert_same_params(ours, reference)
    group = opt.param_groups[0]
    assert int(group["step"]) == STEPS
    torch.testing.assert_close(group["loss_avg"], ref_opt.loss_avg.reshape(()), rtol=1e-10, atol=0)
    if kwargs.get("use_fstar"):
        assert math.isclose(float(group["fstar"]), ref_opt.lb, rel_tol=1e-8, abs_tol=1e-12)
    # the adaptive step was active (the test would not notice a wrong Polyak term otherwise)
    cap = kwargs["lr"]
    assert any(tau < 0.99 * cap for tau in taus[1:]), taus


MOMO_ADAM_CONFIGS = {
    "default": {},
    "polyak-active": {"lr": 1.0},
    "weight-decay": {"lr": 1.0, "weight_decay": 1e-2},
    "weight-decay-no-divide": {"lr": 1.0, "weight_decay": 1e-2, "divide": False},
    "fstar": {"lr": 1.0, "use_fstar": True},
    "fstar-weight-decay-lb": {"lr": 1.0, "use_fstar": True, "weight_decay": 1e-2, "lb": 0.01},
}
ADAM_SECOND_GROUPS = {
    "one-group": None,
    "two-groups": {"lr": 0.3, "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
}


MOMO_ADAM_PARITY = parity_cases(MOMO_ADAM_CONFIGS, ADAM_SECOND_GROUPS, "fstar-weight-decay-lb")


@needs_upstream
@pytest.mark.parametrize(
    "config,second,implementation", MOMO_ADAM_PARITY, ids=map(parity_id, MOMO_ADAM_PARITY)
)
def test_momo_adam_matches_momo_opt(config: str, second: str, implementation: str) -> None:
    kwargs, second_group = MOMO_ADAM_CONFIGS[config], ADAM_SECOND_GROUPS[second]
    reference, ref_opt, _ = run(
        lambda p: upstream.MomoAdam(p, **kwargs), second_group, upstream_dtype=True
    )
    ours, opt, taus = run(
        lambda p: MomoAdam(p, **kwargs, implementation=implementation), second_group
    )
    assert_same_params(ours, reference)
    group = opt.param_groups[0]
    assert int(group["step"]) == STEPS
    torch.testing.assert_close(group["loss_avg"], ref_opt.loss_avg.reshape(()), rtol=1e-10, atol=0)
    if kwargs.get("use_fstar"):
        assert math.isclose(float(group["fstar"]), ref_opt.lb, rel_tol=1e-8, abs_tol=1e-12)
    if config != "default":
        beta1 = 0.9
        caps = [kwargs["lr"] / (1 - beta1 ** (k + 1)) for k in range(STEPS)]
        assert any(tau < 0.99 * cap for tau, cap in zip(taus[1:], caps[1:], strict=True))


# -- anchors: with a tiny cap the Polyak term never binds ----------------------------------
def test_momo_with_tiny_lr_is_sgd_with_dampened_momentum() -> None:
    lr, beta = 1e-4, 0.9
    ours, _, taus = run(lambda p: Momo(p, lr=lr, beta=beta))
    sgd, _, _ = run(lambda p: torch.optim.SGD(p, lr=lr, momentum=beta, dampening=beta))
    assert all(tau == pytest.approx(lr, rel=1e-12) for tau in taus)
    assert_same_params(ours, sgd, rtol=1e-12, atol=1e-14)
    assert not all(
        torch.equal(p, q) for p, q in zip(ours.parameters(), make_model().parameters(), strict=True)
    )


def test_momo_adam_with_tiny_lr_is_adam() -> None:
    lr = 1e-5
    ours, _, _ = run(lambda p: MomoAdam(p, lr=lr, eps=1e-8))
    adam, _, _ = run(lambda p: torch.optim.Adam(p, lr=lr, eps=1e-8))
    assert_same_params(ours, adam, rtol=1e-12, atol=1e-14)
    assert not all(
        torch.equal(p, q) for p, q in zip(ours.parameters(), make_model().parameters(), strict=True)
    )


# -- zero gradient, bfloat16, Python-float loss -------------------------------------------------
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cls", [Momo, MomoAdam])
def test_zero_gradient_gives_zero_step_and_no_nan(cls, implementation: str) -> None:
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    before = [p.clone() for p in params]
    optimizer = cls(params, lr=1.0, implementation=implementation)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step(loss=torch.tensor(0.7, dtype=torch.float64))
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)
    statistics = optimizer.statistics()
    assert statistics["tau/group_0"] == 0.0
    assert all(math.isfinite(value) for value in statistics.values())


@pytest.mark.parametrize("cls,lr", [(Momo, 10.0), (MomoAdam, 1.0)])
def test_bfloat16_parameters_give_sensible_step_sizes(cls, lr: float) -> None:
    """With bf16 parameters the Polyak numerator is accumulated in float32, so the step sizes
    stay close to those of the float32 run (summed in bf16 they are noise)."""
    steps = 15
    _, _, taus_fp32 = run(lambda p: cls(p, lr=lr), dtype=torch.float32, steps=steps)
    model, optimizer, taus_bf16 = run(lambda p: cls(p, lr=lr), dtype=torch.bfloat16, steps=steps)
    assert all(math.isfinite(t) and t >= 0 for t in taus_bf16)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert any(t < 0.99 * lr for t in taus_fp32[1:6])  # the Polyak step is active
    for t32, t16 in zip(taus_fp32[:6], taus_bf16[:6], strict=True):
        assert t16 == pytest.approx(t32, rel=0.1), (taus_fp32, taus_bf16)
    assert optimizer.state[next(model.parameters())]["grad_dot_w"].dtype == torch.float32


@pytest.mark.parametrize("cls", [Momo, MomoAdam])
def test_loss_may_be_a_python_float(cls) -> None:
    as_tensor, _, _ = run(lambda p: cls(p, lr=1.0), steps=10)
    as_float, _, _ = run(lambda p: cls(p, lr=1.0), steps=10, loss_as_float=True)
    assert_same_params(as_tensor, as_float, rtol=1e-12, atol=1e-14)


# -- resume -------------------------------------------------------------------------------------
def roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def train_steps(model, optimizer, start: int, steps: int) -> None:
    x, y = data(next(model.parameters()).dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(start, start + steps):
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model, step, x, y)
            loss.backward()
            optimizer.step(loss=loss)


@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (Momo, "Momo", {"lr": 10.0, "use_fstar": True}),
        (MomoAdam, "MomoAdam", {"lr": 1.0, "use_fstar": True}),
    ],
    ids=["momo", "momo_adam"],
)
def test_resume_continues_loss_average_and_counters(ours, theirs, kwargs) -> None:
    split, rest = 7, 8
    whole = make_model()
    uninterrupted = ours(whole.parameters(), **kwargs)
    train_steps(whole, uninterrupted, 0, split + rest)

    first = make_model()
    optimizer = ours(first.parameters(), **kwargs)
    train_steps(first, optimizer, 0, split)
    saved = roundtrip(optimizer.state_dict())
    group = saved["param_groups"][0]
    assert int(group["step"]) == split
    assert group["loss_avg"].item() > 0 and "fstar" in group and "tau" in group
    resumed = ours(first.parameters(), **kwargs)
    resumed.load_state_dict(saved)
    train_steps(first, resumed, split, rest)
    assert int(resumed.param_groups[0]["step"]) == split + rest
    assert torch.equal(
        resumed.param_groups[0]["loss_avg"], uninterrupted.param_groups[0]["loss_avg"]
    )
    assert torch.equal(resumed.param_groups[0]["fstar"], uninterrupted.param_groups[0]["fstar"])
    for p, q in zip(first.parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q)

    if upstream is None:
        return
    # control: momo-opt loses its step count, loss average and lower bound on resume
    base, broken = make_model(), make_model()
    with float64_default():
        reference = getattr(upstream, theirs)(base.parameters(), **kwargs)
        train_steps(base, reference, 0, split + rest)
        reference_first = getattr(upstream, theirs)(broken.parameters(), **kwargs)
        train_steps(broken, reference_first, 0, split)
        state = reference_first.state_dict()
        restarted = getattr(upstream, theirs)(broken.parameters(), **kwargs)
        restarted.load_state_dict(state)
        train_steps(broken, restarted, split, rest)
    assert restarted._number_steps == rest
    assert any(
        not torch.equal(p, q) for p, q in zip(broken.parameters(), base.parameters(), strict=True)
    )


def test_state_dtypes_survive_load_state_dict() -> None:
    """torch casts floating state to the parameter dtype on load; gamma stays float32."""
    model = make_model(torch.bfloat16)
    optimizer = Momo(model.parameters(), lr=10.0)
    train_steps(model, optimizer, 0, 3)
    resumed = Momo(model.parameters(), lr=10.0)
    resumed.load_state_dict(roundtrip(optimizer.state_dict()))
    for p in model.parameters():
        assert resumed.state[p]["grad_dot_w"].dtype == torch.float32
        assert resumed.state[p]["grad_avg"].dtype == torch.bfloat16
        assert torch.equal(resumed.state[p]["grad_dot_w"], optimizer.state[p]["grad_dot_w"])


# -- the reduction hook and the statistics ------------------------------------------------------
@pytest.mark.parametrize("cls", [Momo, MomoAdam])
def test_one_finish_sums_call_per_step(monkeypatch, cls) -> None:
    calls = []
    original = momo_module.finish_sums  # MomoAdam shares Momo's reduction

    def counting(partial, *args, **kwargs):
        calls.append(tuple(partial.shape))
        return original(partial, *args, **kwargs)

    monkeypatch.setattr(momo_module, "finish_sums", counting)
    run(lambda p: cls(p, lr=1.0), second_group={"lr": 0.5}, steps=4)
    # one row [<x,g>, <x,d>, ||d||^2] per parameter with a gradient, one call per step
    assert calls == [(4, 3)] * 4


@pytest.mark.parametrize("cls", [Momo, MomoAdam])
def test_statistics_report_tau_loss_average_and_fstar(cls) -> None:
    _, optimizer, taus = run(
        lambda p: cls(p, lr=1.0, use_fstar=True), second_group={"lr": 0.5}, steps=5
    )
    statistics = optimizer.statistics()
    assert set(statistics) == {
        f"{key}/group_{index}"
        for key in ("tau", "loss_avg", "fstar", "skipped_steps")
        for index in (0, 1)
    }
    assert statistics["tau/group_0"] == taus[-1]
    assert statistics["loss_avg/group_0"] == statistics["loss_avg/group_1"] > 0
    _, plain, _ = run(lambda p: cls(p, lr=1.0), steps=2)
    assert set(plain.statistics()) == {"tau/group_0", "loss_avg/group_0", "skipped_steps/group_0"}


def test_step_without_any_gradient_changes_nothing() -> None:
    model = make_model()
    optimizer = Momo(model.parameters())
    before = {k: v.clone() for k, v in optimizer.param_groups[0].items() if torch.is_tensor(v)}
    optimizer.step(loss=1.0)
    after = {k: v for k, v in optimizer.param_groups[0].items() if torch.is_tensor(v)}
    assert not optimizer.state
    assert before.keys() == after.keys() and float(after["step"]) == 0
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- reliability (issue 9) ------------------------------------------------------------------
def masked_batch_loss(model, step, x, y, masked_steps):
    """MSE over the batch, or, on ``masked_steps``, a loss over no elements: NaN with finite,
    zero gradients (what a batch whose labels are all ignored gives)."""
    if step in masked_steps:
        return F.mse_loss(model(x[:0]), y[:0], reduction="mean")
    return batch_loss(model, step, x, y)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_momo_stores_momentum_in_either_phase_with_the_same_result(implementation) -> None:
    """Without ``skip_nonfinite`` phase 1 stores the new ``d`` and phase 2 reads it back; with
    it phase 1 writes nothing and phase 2 forms ``d`` again. On finite steps the two shapes
    are the same math: bitwise equal eagerly, to rounding compiled (two different graphs)."""
    runs = {}
    for skip in (False, True):
        model, optimizer, taus = run(
            lambda groups, skip=skip: Momo(
                groups, lr=1.0, weight_decay=0.01, implementation=implementation,
                skip_nonfinite=skip,
            ),  # fmt: skip
            second_group=SECOND_GROUPS["two-groups"],
            steps=20,
        )
        runs[skip] = (model, optimizer, taus)
    (stored, stored_opt, stored_taus), (formed, formed_opt, formed_taus) = runs[False], runs[True]
    assert len(set(stored_taus)) > 1  # the Polyak step acted, not only the cap
    if implementation == "eager":
        assert stored_taus == formed_taus
        assert_same_params(stored, formed, rtol=0, atol=0)
    else:
        assert_same_params(stored, formed, rtol=1e-9, atol=1e-11)
    for p, q in zip(stored.parameters(), formed.parameters(), strict=True):
        torch.testing.assert_close(
            stored_opt.state[p]["grad_avg"], formed_opt.state[q]["grad_avg"], rtol=1e-9, atol=1e-11
        )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "cls,kwargs", [(Momo, {"lr": 10.0}), (MomoAdam, {"lr": 1.0})], ids=["momo", "momo_adam"]
)
def test_non_finite_loss_skips_the_step_and_keeps_the_loss_average(
    cls, kwargs, implementation
) -> None:
    """A NaN loss (with zero gradients) once used to make the loss average NaN for good, and
    every later step the cap. Now the step is skipped: the run continues exactly as if that
    batch had not been there, and the skip is counted."""
    x, y = data()

    def train(masked_steps, steps):
        model = make_model()
        optimizer = cls(model.parameters(), **kwargs, implementation=implementation)
        taus = []
        for step in range(steps):
            optimizer.zero_grad(set_to_none=False)
            loss = masked_batch_loss(model, step, x, y, masked_steps)
            loss.backward()
            optimizer.step(loss=loss)
            taus.append(float(optimizer.param_groups[0]["tau"]))
        return model, optimizer, taus

    with_bad, optimizer, taus = train({3}, 13)
    assert math.isnan(masked_batch_loss(with_bad, 3, x, y, {3}).item())
    statistics = optimizer.statistics()
    assert statistics["skipped_steps/group_0"] == 1.0
    assert math.isfinite(statistics["loss_avg/group_0"])
    assert int(optimizer.param_groups[0]["step"]) == 12
    assert any(tau < 0.99 * kwargs["lr"] for tau in taus[4:])  # the Polyak step still works
    # the same run without the bad batch: steps 0-2 and 4-12 use the same batches
    model = make_model()
    reference = cls(model.parameters(), **kwargs, implementation=implementation)
    for step in [s for s in range(13) if s != 3]:
        reference.zero_grad(set_to_none=False)
        loss = batch_loss(model, step, x, y)
        loss.backward()
        reference.step(loss=loss)
    for p, q in zip(with_bad.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [Momo, MomoAdam])
def test_loss_below_lb_warns_once(cls) -> None:
    """A loss below ``lb`` (without use_fstar) makes the Polyak step 0: say so, once. A Python
    number is checked at the step; a tensor loss when the statistics are read (reading it at
    the step would wait for the device)."""
    params = [torch.randn(3, dtype=torch.float64, requires_grad=True)]
    optimizer = cls(params, lr=1.0)
    with pytest.warns(UserWarning, match="below lb"):
        for _ in range(2):
            params[0].grad = torch.ones_like(params[0])
            optimizer.step(loss=-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params[0].grad = torch.ones_like(params[0])
        optimizer.step(loss=-0.5)  # once only

    tensor_loss = cls(params, lr=1.0)
    params[0].grad = torch.ones_like(params[0])
    tensor_loss.step(loss=torch.tensor(-0.5, dtype=torch.float64))
    with pytest.warns(UserWarning, match="below lb"):
        tensor_loss.statistics()
    fine = cls(params, lr=1.0, use_fstar=True)
    params[0].grad = torch.ones_like(params[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine.step(loss=-0.5)
        fine.statistics()


@pytest.mark.parametrize(
    "cls,kwargs",
    [(Momo, {"lr": 10.0, "use_fstar": True}), (MomoAdam, {"lr": 1.0})],
    ids=["momo", "momo_adam"],
)
def test_checkpoint_of_the_previous_version_continues(cls, kwargs) -> None:
    """The previous version saved ``foreach`` and no ``skipped_steps``, ``implementation`` or
    ``skip_nonfinite`` in its groups: such a checkpoint loads and continues exactly."""
    whole = make_model()
    uninterrupted = cls(whole.parameters(), **kwargs)
    train_steps(whole, uninterrupted, 0, 8)

    first = make_model()
    optimizer = cls(first.parameters(), **kwargs)
    train_steps(first, optimizer, 0, 4)
    saved = roundtrip(optimizer.state_dict())
    for group in saved["param_groups"]:
        for key in ("skipped_steps", "implementation", "skip_nonfinite"):
            del group[key]
        group["foreach"] = None
    resumed = cls(first.parameters(), **kwargs)
    resumed.load_state_dict(saved)
    train_steps(first, resumed, 4, 4)
    for p, q in zip(first.parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.statistics()["skipped_steps/group_0"] == 0.0
