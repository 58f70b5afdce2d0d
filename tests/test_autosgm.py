"""AutoSGM: the anchors of the seed (Adam, AdamW, heavy ball, Nesterov), the numerators, the
window shapes in closed form, both configuration styles, state size and the training-loop
contract (schedulers, per-group counters, no master copy)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from cases import IMPLEMENTATIONS

from hf_optim import AutoSGM
from hf_optim.autosgm import window_factor


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request) -> str:
    """Each test taking ``implementation`` runs on the eager reference kernels and on the
    same kernels compiled."""
    return request.param


def make_params(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (5,), (3, 5)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def loss_at(params: list[torch.Tensor], step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    w1, b1, w2 = params
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64).to(w1.dtype)
    y = torch.randn(7, 3, generator=gen, dtype=torch.float64).to(w1.dtype)
    return ((torch.tanh(x @ w1.T + b1) @ w2.T - y) ** 2).mean()


def run(optimizer, params, steps: int, start: int = 0, scheduler=None) -> None:
    for step in range(start + 1, start + steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss_at(params, step).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_trajectory(make_a, make_b, steps: int = 15, **tolerance) -> None:
    base = make_params()
    pa, pb = clone(base), clone(base)
    run(make_a(pa), pa, steps)
    run(make_b(pb), pb, steps)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


# -- anchors ---------------------------------------------------------------------------------
def test_num_lrc_0_without_window_is_adam(implementation: str) -> None:
    assert_same_trajectory(
        lambda p: AutoSGM(
            p, lr=1e-2, num_lrc=0, eps=1e-8, eps_inside_sqrt=False, implementation=implementation
        ),
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.999), eps=1e-8),
        rtol=1e-12,
        atol=1e-14,
    )


def test_coupled_decay_is_adam_l2_and_tuples_agree(implementation: str) -> None:
    assert_same_trajectory(
        lambda p: AutoSGM(
            p,
            lr_cfg=(True, 3e-3, 0),
            beta_cfg=(0.9999, 0.99, 0.8, 0, 0, True),
            wd_cfg=(0.1, 0),
            eps_cfg=(1e-8, False),
            implementation=implementation,
        ),
        lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
        rtol=1e-12,
        atol=1e-14,
    )


def test_decoupled_decay_mapping_is_adamw(implementation: str) -> None:
    decay, beta_i = 0.05, 0.9
    assert_same_trajectory(
        lambda p: AutoSGM(
            p,
            lr=1e-2,
            weight_decay=decay / (1 - beta_i),
            decoupled=True,
            eps=1e-8,
            eps_inside_sqrt=False,
            implementation=implementation,
        ),
        lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-8, weight_decay=decay),
        rtol=1e-12,
        atol=1e-14,
    )


def quadratic():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    hessian = a @ a.T / 6 + 0.1 * torch.eye(6, dtype=torch.float64)
    target = torch.randn(6, generator=gen, dtype=torch.float64)

    def gradient(w: torch.Tensor) -> torch.Tensor:
        return hessian @ (w - target)

    return gradient, torch.randn(6, generator=gen, dtype=torch.float64)


def autosgm_trajectory(steps: int, **kwargs) -> list[torch.Tensor]:
    gradient, start = quadratic()
    w = start.clone().requires_grad_()
    optimizer = AutoSGM([w], **kwargs)
    out = []
    for _ in range(steps):
        w.grad = gradient(w.detach())
        optimizer.step()
        out.append(w.detach().clone())
    return out


def test_heavy_ball_setting_is_polyaks_recurrence(implementation: str) -> None:
    alpha, beta, steps = 0.05, 0.8, 30
    ours = autosgm_trajectory(
        steps, lr=alpha, adaptive=False, beta_i=beta, gamma=0.0, eta_i=1.0, debias=False,
        implementation=implementation,
    )  # fmt: skip
    # Polyak: w_{t+1} = w_t - alpha grad(w_t) + beta (w_t - w_{t-1}), w_{-1} = w_0
    gradient, w = quadratic()
    previous = w.clone()
    for t in range(steps):
        w, previous = w - alpha * gradient(w) + beta * (w - previous), w
        torch.testing.assert_close(ours[t], w, rtol=1e-12, atol=1e-13)


def test_nesterov_setting_is_nesterovs_recurrence(implementation: str) -> None:
    alpha, beta, steps = 0.05, 0.8, 30
    ours = autosgm_trajectory(
        steps, lr=alpha, adaptive=False, beta_i=beta, gamma=beta / (1 + beta), eta_i=1.0,
        debias=False, implementation=implementation,
    )  # fmt: skip
    # Nesterov (Sutskever et al. 2013): v_{t+1} = beta v_t - alpha grad(w_t + beta v_t),
    # w_{t+1} = w_t + v_{t+1}; the optimizer holds the look-ahead point w_t + beta v_t.
    gradient, w = quadratic()
    v = torch.zeros_like(w)
    for t in range(steps):
        v = beta * v - alpha * gradient(w + beta * v)
        w = w + v
        torch.testing.assert_close(ours[t], w + beta * v, rtol=1e-12, atol=1e-13)


# -- the numerators, written independently from the spec ------------------------------------
def numerator_oracle(num_lrc: int, steps: int, lr=1e-2, beta_n=0.99, cf=4.0, eps=1e-10):
    """Per-tensor numerators of each step for one tensor, from the recurrences of the spec."""
    gradient, w = quadratic()
    beta_a, beta_i = 0.999, 0.9
    b = torch.zeros_like(w)
    m = torch.zeros_like(w)
    p = torch.zeros_like(w)
    q = torch.zeros_like(w)
    xbar = torch.zeros_like(w)
    var = torch.zeros_like(w)
    numerator, history = 0.0, []
    for t in range(1, steps + 1):
        g = gradient(w)
        b = beta_a * b + (1 - beta_a) * g * g
        d = torch.sqrt(b / (1 - beta_a**t) + eps) + eps
        m = beta_i * m + (1 - beta_i) * g
        u = m / (1 - beta_i**t) / d
        gn = g / d
        if num_lrc == 2:
            p = beta_n * p + (1 - beta_n) * lr * (w * w + gn * gn)
            raw = torch.clamp(p, max=lr).mean()
        else:
            q = beta_n * q + (1 - beta_n) * w * w
            big_w = beta_n * q if num_lrc == 3 else q
            x = w * gn
            if num_lrc == 3:
                xbar = beta_n * xbar + (1 - beta_n) * (x.abs() + eps)
                h = x / (x.abs() + eps) * torch.minimum(x.abs() + eps, cf * xbar)
            else:
                xbar = beta_n * xbar + (1 - beta_n) * x
                r = (x - xbar).abs() + eps
                var = beta_n * var + (1 - beta_n) * r * r
                h = x / r * torch.minimum(r, var.sqrt() + eps)
            p = beta_n * p + lr / (1 + big_w) * h
            dm = torch.clamp(d, max=1.0)
            low = (1 - dm * dm) ** 2 * dm * lr / (1 + big_w)
            raw = torch.minimum(torch.maximum(p.abs(), low), lr * (1 + big_w)).mean()
        numerator = 0.1 * numerator + 0.9 * float(raw)
        history.append(numerator)
        w = w - numerator * u
    return history


@pytest.mark.parametrize("num_lrc", [2, 3, 4])
def test_numerators_follow_the_spec_recurrences(num_lrc: int, implementation: str) -> None:
    gradient, start = quadratic()
    w = start.clone().requires_grad_()
    optimizer = AutoSGM([w], lr=1e-2, num_lrc=num_lrc, beta_n=0.99, implementation=implementation)
    expected = numerator_oracle(num_lrc, steps=25)
    for t in range(25):
        w.grad = gradient(w.detach())
        optimizer.step()
        got = optimizer.param_groups[0]["lr_effective"]
        assert math.isclose(float(got), expected[t], rel_tol=1e-9), (t, float(got), expected[t])
    # the numerators really are iteration-dependent and differ from the constant lr
    assert len({round(x, 12) for x in expected}) > 10 and expected[-1] != 1e-2


def test_num_lrc_1_is_an_alias_of_0_that_warns() -> None:
    with pytest.warns(UserWarning, match="alias of num_lrc=0"):
        optimizer = AutoSGM([torch.zeros(2, requires_grad=True)], num_lrc=1)
    assert optimizer.param_groups[0]["num_lrc"] == 0
    with warnings.catch_warnings():  # the alias warning only: a first compile may warn too
        warnings.simplefilter("error", UserWarning)
        assert_same_trajectory(
            lambda p: AutoSGM(p, lr_cfg=(True, 1e-2, 0)),
            lambda p: AutoSGM(p, lr=1e-2, num_lrc=0),
            rtol=0,
            atol=0,
        )
    with pytest.warns(UserWarning):
        assert_same_trajectory(
            lambda p: AutoSGM(p, lr_cfg=(True, 1e-2, 1)),
            lambda p: AutoSGM(p, lr=1e-2, num_lrc=0),
            rtol=0,
            atol=0,
        )


def test_maximize_equals_minimizing_the_negated_objective(implementation: str) -> None:
    base = make_params()
    pa, pb = clone(base), clone(base)
    oa = AutoSGM(pa, lr=1e-2, num_lrc=3, beta_n=0.99, maximize=True, implementation=implementation)
    ob = AutoSGM(pb, lr=1e-2, num_lrc=3, beta_n=0.99, implementation=implementation)
    for step in range(1, 10):
        oa.zero_grad()
        ob.zero_grad()
        (-loss_at(pa, step)).backward()
        loss_at(pb, step).backward()
        oa.step()
        ob.step()
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- the window ------------------------------------------------------------------------------
def closed_form(kind: str, f: float, n: float) -> float:
    if kind == "cosine":
        return max(math.cos(math.pi * f / 2), 0.0) ** n
    if kind == "linear":
        return (1 - f) ** n
    if kind == "beta_exp":
        return (n**f - n) / (1 - n)
    if kind == "polynomial":
        return (1 - f**n) ** 2
    centre = 0.5 if kind == "logistic" else 0.875

    def s(z: float) -> float:
        return 1 / (1 + 2 ** (2 * n * (z - centre)))

    return (s(f) - s(1)) / (s(0) - s(1))


def expected_factor(step: int, length: int, kind: str, n: float, floor: float, half: bool,
                    flat: float, restart: bool, unit: int = 1) -> float:  # fmt: skip
    elapsed = step - 1
    if restart:
        elapsed %= length
    elapsed = (elapsed // unit) * unit
    f = min(elapsed / length, 1.0)
    if not half:
        f = abs(2 * f - 1)
    if f < flat:
        return 1.0
    f = (f - flat) / (1 - flat)
    return floor + (1 - floor) * closed_form(kind, f, n)


SHAPES = [("cosine", 2.0), ("cosine", 1.0), ("linear", 1.0), ("linear", 2.0), ("beta_exp", 0.05),
          ("beta_exp", 2.0), ("polynomial", 1.8), ("logistic", 4.0), ("logistic_late", 4.0)]  # fmt: skip


@pytest.mark.parametrize("half", [True, False], ids=["half", "full"])
@pytest.mark.parametrize("kind,n", SHAPES)
def test_window_shapes_match_their_closed_form(kind: str, n: float, half: bool) -> None:
    for flat, floor in ((0.0, 0.0), (0.25, 0.1)):
        group = dict(window=kind, window_steps=20, window_shape=n, window_floor=floor,
                     window_half=half, window_flat=flat, window_unit_steps=1, restart=False)  # fmt: skip
        for step in range(1, 30):
            got = float(window_factor(torch.tensor(float(step), dtype=torch.float64), group))
            want = expected_factor(step, 20, kind, n, floor, half, flat, restart=False)
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (kind, step, got, want)
        # the ends: 1 at the start of a half window (the floor for a full one), the floor at the end
        first = float(window_factor(torch.tensor(1.0, dtype=torch.float64), group))
        last = float(window_factor(torch.tensor(21.0, dtype=torch.float64), group))
        assert math.isclose(first, 1.0 if half else floor, abs_tol=1e-12)
        assert math.isclose(last, floor, abs_tol=1e-12)


def factors_through_the_optimizer(steps: int, **kwargs) -> list[float]:
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = AutoSGM([w], **kwargs)
    out = []
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        optimizer.step()
        out.append(float(optimizer.param_groups[0]["window_factor"]))
    return out


def test_window_holds_after_its_end_and_restarts_only_when_asked() -> None:
    held = factors_through_the_optimizer(25, window="cosine", window_steps=10, window_floor=0.1)
    assert held == pytest.approx(
        [expected_factor(s, 10, "cosine", 2.0, 0.1, True, 0.0, False) for s in range(1, 26)]
    )
    assert held[10:] == pytest.approx([0.1] * 15)
    again = factors_through_the_optimizer(
        25, window="cosine", window_steps=10, window_floor=0.1, restart=True
    )
    assert again[:10] == pytest.approx(held[:10]) and again[10:20] == pytest.approx(held[:10])
    assert again[20] == pytest.approx(1.0)


def test_rc_cfg_units_epochs_and_per_epoch_restarts() -> None:
    # README example: cosine over num_epochs * iters_epoch steps (cfact=1)
    steps = factors_through_the_optimizer(12, rc_cfg=(1, 0, 0, 2, 1, 2, 5, 1, 0))
    assert steps == pytest.approx(
        [expected_factor(s, 10, "cosine", 2.0, 0, True, 0, False) for s in range(1, 13)]
    )
    # cfact=0: epoch units, the factor changes once per epoch of spe steps
    epochs = factors_through_the_optimizer(12, rc_cfg=(2, 0, 0, 1, 1, 4, 3, 0, 0))
    assert epochs == pytest.approx([1, 1, 1, 0.75, 0.75, 0.75, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    # cfact=2: a window of spe steps that restarts every epoch
    restarts = factors_through_the_optimizer(8, rc_cfg=(2, 0, 0, 1, 1, 9, 4, 2, 0))
    assert restarts == pytest.approx([1, 0.75, 0.5, 0.25] * 2)


def test_window_counter_is_per_group() -> None:
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    optimizer = AutoSGM(
        [{"params": [a]}, {"params": [b], "window_steps": 4}], window="linear", window_steps=8,
        window_shape=1.0,
    )  # fmt: skip
    for step in range(1, 7):
        a.grad = torch.ones_like(a)
        b.grad = torch.ones_like(b) if step % 2 else None
        optimizer.step()
    first, second = optimizer.param_groups
    assert float(first["step"]) == 6 and float(second["step"]) == 3
    assert float(first["window_factor"]) == pytest.approx(1 - 5 / 8)
    assert float(second["window_factor"]) == pytest.approx(1 - 2 / 4)


# -- configuration ------------------------------------------------------------------------------
def test_readme_tuples_equal_readable_keywords() -> None:
    tuples = dict(
        lr_cfg=(True, 1e-3, 3),
        beta_cfg=(0.9999, 0.999, 0.9, 0.5528, 0, True),
        rc_cfg=(1, 0, 0, 2, 1, 1, 20, 1, 0),
        wd_cfg=(0.01, 1),
        eps_cfg=(1e-10, True),
        miscs=(1,),
    )
    readable = dict(
        lr=1e-3, num_lrc=3, beta_n=0.9999, beta_a=0.999, beta_i=0.9, gamma=0.5528, eta_i=0,
        debias=True, window="cosine", window_shape=2, window_floor=0, window_half=True,
        window_steps=20, weight_decay=0.01, decoupled=True, eps=1e-10, eps_inside_sqrt=True,
        per_tensor=True,
    )  # fmt: skip
    assert_same_trajectory(
        lambda p: AutoSGM(p, **tuples), lambda p: AutoSGM(p, **readable), rtol=0, atol=0
    )
    # a keyword that agrees with the tuple is fine; one that disagrees says so
    AutoSGM(make_params(), lr=1e-3, **tuples)
    with pytest.raises(ValueError, match=r"lr=0\.01 conflicts with lr_cfg\[1\]=0\.001"):
        AutoSGM(make_params(), lr=0.01, **tuples)
    with pytest.raises(ValueError, match="restart=False conflicts"):
        AutoSGM(make_params(), rc_cfg=(1, 0, 0, 2, 1, 3, 5, 2, 0), restart=False)


def test_param_groups_accept_tuples_and_keywords() -> None:
    a, b = clone(make_params())[:2]
    optimizer = AutoSGM([{"params": [a], "wd_cfg": (0.1, 1)}, {"params": [b], "lr": 0.5}])
    first, second = optimizer.param_groups
    assert first["weight_decay"] == 0.1 and first["decoupled"] is True and "wd_cfg" not in first
    assert second["lr"] == 0.5 and second["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="beta_i"):
        optimizer.add_param_group({"params": [torch.zeros(1)], "beta_i": 2.0})
    with pytest.raises(ValueError, match="debug"):
        AutoSGM(make_params(), debug=True)
    # upstream's init() pre-created the state; here state stays lazy
    optimizer.init()
    assert len(optimizer.state) == 0


def test_every_group_has_lr_and_weight_decay_read_each_step() -> None:
    def with_schedule(make):
        def build(params):
            optimizer = make(params)
            return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.8**s)

        return build

    base = make_params()
    pa, pb = clone(base), clone(base)
    oa, sa = with_schedule(lambda p: AutoSGM(p, lr=1e-2, eps=1e-8, eps_inside_sqrt=False))(pa)
    ob, sb = with_schedule(lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-8))(pb)
    run(oa, pa, 10, scheduler=sa)
    run(ob, pb, 10, scheduler=sb)
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert oa.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.8**10)
    assert float(oa.param_groups[0]["lr_effective"]) == pytest.approx(1e-2 * 0.8**9)
    # weight_decay set on the group after construction is used
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    optimizer = AutoSGM([w], lr=0.1, decoupled=True)
    optimizer.param_groups[0]["weight_decay"] = 1.0
    w.grad = torch.zeros_like(w)
    optimizer.step()
    assert torch.allclose(w, torch.full_like(w, 1 - 0.1 * (1 - 0.9)))


# -- memory, weights and dtypes ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,buffers",
    [
        ({"num_lrc": 0}, 2),
        ({"num_lrc": 2}, 3),
        ({"num_lrc": 3}, 5),
        ({"num_lrc": 4}, 6),
        ({"num_lrc": 3, "adaptive": False}, 1),
    ],  # fmt: skip
)
def test_state_bytes_are_what_num_lrc_needs(kwargs: dict, buffers: int) -> None:
    params = clone(make_params())
    optimizer = AutoSGM(params, **kwargs)
    run(optimizer, params, 2)
    for p in params:
        state = optimizer.state[p]
        full = sum(v.numel() * v.element_size() for v in state.values() if v.shape == p.shape)
        small = sum(v.numel() * v.element_size() for v in state.values() if v.shape != p.shape)
        assert full == buffers * p.numel() * p.element_size()
        assert small <= 16  # the step counter and the per-tensor numerator


def test_no_master_copy_weights_changed_outside_stay_changed() -> None:
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    optimizer = AutoSGM([w], lr=1e-3, num_lrc=3)
    for _ in range(3):
        w.grad = torch.randn(4, dtype=torch.float64)
        optimizer.step()
    with torch.no_grad():
        w.fill_(5.0)  # loading weights, an EMA swap, a re-initialisation
    w.grad = torch.randn(4, dtype=torch.float64)
    optimizer.step()
    assert (w - 5.0).abs().max() < 0.01


def test_low_precision_parameters_keep_float32_state_across_resume() -> None:
    base = make_params(dtype=torch.bfloat16)
    pa = clone(base)
    oa = AutoSGM(pa, lr=1e-2, num_lrc=3, beta_n=0.99)
    run(oa, pa, 12)
    pb = clone(base)
    ob = AutoSGM(pb, lr=1e-2, num_lrc=3, beta_n=0.99)
    run(ob, pb, 5)
    buffer = io.BytesIO()
    torch.save(ob.state_dict(), buffer)
    buffer.seek(0)
    pc = [p.detach().clone().requires_grad_() for p in pb]
    oc = AutoSGM(pc, lr=1e-2, num_lrc=3, beta_n=0.99)
    oc.load_state_dict(torch.load(buffer, weights_only=True))
    for p in pc:
        assert all(v.dtype == torch.float32 for v in oc.state[p].values())
    run(oc, pc, 7, start=5)
    for a, c in zip(pa, pc, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, c)


@pytest.mark.parametrize("num_lrc", [0, 2, 3, 4])
def test_benchmark_constructor_works(num_lrc: int) -> None:
    params = clone(make_params(dtype=torch.float32))
    optimizer = AutoSGM(params, num_lrc=num_lrc)
    run(optimizer, params, 3)
    stats = optimizer.statistics()
    assert set(stats) == {"lr_effective/group_0", "window_factor/group_0", "skipped_steps/group_0"}
    assert stats["window_factor/group_0"] == 1.0 and stats["skipped_steps/group_0"] == 0.0
    assert 0 < stats["lr_effective/group_0"] <= 1e-3 * (1 + 1e-6)


# -- the compiled kernels ----------------------------------------------------------------------
def slow(kwargs: dict):
    """One variant for the default pass (one compile); the others in the slow pass."""
    return pytest.param(kwargs, marks=pytest.mark.slow)


@pytest.mark.parametrize(
    "kwargs",
    [
        slow({"num_lrc": 0, "gamma": 0.3, "weight_decay": 0.1, "decoupled": True, "maximize": True}),
        {"num_lrc": 0, "adaptive": False, "eta_i": 1.0, "debias": False},
        slow({"num_lrc": 2, "weight_decay": 0.1, "eps_inside_sqrt": False}),
        slow({"num_lrc": 3, "gamma": 0.4, "weight_decay": 0.1, "decoupled": True}),
        slow({"num_lrc": 4, "per_tensor": False, "weight_decay": 0.1, "decoupled": True}),
        slow({"num_lrc": 4, "debias": False, "maximize": True, "eta_i": 0.5}),
        slow({"num_lrc": 3, "skip_nonfinite": True, "weight_decay": 0.1}),
    ],
    ids=["lrc0", "sgd", "lrc2", "lrc3", "lrc4-elementwise", "lrc4", "lrc3-skip-nonfinite"],
)
def test_compiled_kernels_match_the_eager_reference(kwargs: dict) -> None:
    """float64, every structural variant of the kernels: compiled == eager to rtol 1e-12
    (inductor reorders the per-tensor sums; elementwise work is the same arithmetic)."""
    options = {"lr": 1e-2, "beta_n": 0.99, "window": "cosine", "window_steps": 20, **kwargs}
    runs = []
    for implementation in ("eager", "compiled"):
        params = clone(make_params())
        optimizer = AutoSGM(params, implementation=implementation, **options)
        run(optimizer, params, 12)
        runs.append((params, optimizer))
    (eager, eager_opt), (compiled, compiled_opt) = runs
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for p, q in zip(compiled, eager, strict=True):
        for key, value in eager_opt.state[q].items():
            torch.testing.assert_close(compiled_opt.state[p][key], value, rtol=1e-12, atol=1e-15)
    assert float(compiled_opt.param_groups[0]["lr_effective"]) == pytest.approx(
        float(eager_opt.param_groups[0]["lr_effective"]), rel=1e-12
    )


@pytest.mark.slow
def test_compiled_kernels_handle_bfloat16() -> None:
    results = []
    for implementation in ("eager", "compiled"):
        params = clone(make_params(dtype=torch.bfloat16))
        optimizer = AutoSGM(params, lr=1e-2, num_lrc=3, beta_n=0.99, implementation=implementation)
        run(optimizer, params, 6)
        results.append(params)
        assert all(v.dtype == torch.float32 for p in params for v in optimizer.state[p].values())
    for a, b in zip(*results, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("num_lrc", [0, 3])
def test_zero_lr_is_a_true_no_op(implementation: str, num_lrc: int) -> None:
    """A scheduler's warm-up from 0 (or a window at a floor of 0) must not move the weights."""
    params = clone(make_params())
    before = [p.detach().clone() for p in params]
    optimizer = AutoSGM(params, lr=0.0, num_lrc=num_lrc, implementation=implementation)
    run(optimizer, params, 3)
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)
    assert float(optimizer.param_groups[0]["lr_effective"]) == 0.0
