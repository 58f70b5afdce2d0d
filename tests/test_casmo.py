"""CASMO: parity with the upstream PyPI packages, the fixed upstream bugs, and the statistics."""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases import IMPLEMENTATIONS

import hf_optim
from hf_optim import casmo as casmo_module
from hf_optim.casmo import CASMO

CALIBRATION = 500
PARITY_STEPS = 720


def make_casmo(params, **kwargs) -> CASMO:
    """CASMO with the eager reference unless a test asks for another implementation
    (compiling costs seconds per kernel; the compiled tests share one compile per dtype)."""
    return CASMO(params, **{"implementation": "eager", **kwargs})


# -- upstream parity ----------------------------------------------------------------------
def load_upstream(upstream_dir: Path, version: str):
    path = upstream_dir / f"casmo-{version}" / "casmo.py"
    if not path.is_file():
        pytest.skip(
            f"casmo-optimizer {version} not found at {path}; run scripts/install_upstream.sh "
            "or set HF_OPTIM_UPSTREAM"
        )
    name = "upstream_casmo_" + version.replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def parity_run(make_optimizer, read):
    """Noisy regression whose target jumps after calibration (so AGAR rises and the DDEA
    moves tau); returns the parameters and per-step (confidence, tau) read by ``read``."""
    model = tiny_model()
    optimizer = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    trace = []
    for step in range(1, PARITY_STEPS + 1):
        if step == CALIBRATION + 10:
            target = target + torch.randn(4, 3, generator=gen, dtype=torch.float64)
        x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
        y = x @ target + 0.5 * torch.randn(16, 3, generator=gen, dtype=torch.float64)
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        trace.append(read(optimizer))
    return [p.detach() for p in model.parameters()], torch.tensor(trace, dtype=torch.float64)


PARITY_KWARGS = dict(
    lr=1e-2, weight_decay=0.1, tau_init_steps=CALIBRATION, tau_dead_zone=0.05, c_min=0.2
)


_UPSTREAM_RUNS: dict = {}


def upstream_run(upstream_dir: Path, version: str):
    """The upstream trajectory, computed once per version for the whole session."""
    if version not in _UPSTREAM_RUNS:
        upstream = load_upstream(upstream_dir, version)

        def read_upstream(opt):
            state = opt._group_states[0]
            return (
                state["current_confidence"],
                state["tau_adapter"].tau,
                float(state["tau_initialized"]),
            )

        _UPSTREAM_RUNS[version] = parity_run(
            lambda p: upstream.CASMO(p, log_level=0, **PARITY_KWARGS), read_upstream
        )
    return _UPSTREAM_RUNS[version]


@pytest.mark.parametrize(
    "implementation", [pytest.param("compiled", marks=pytest.mark.slow), "eager"]
)
@pytest.mark.parametrize("version,center", [("0.1.0", "mean"), ("0.2.0", "tau")])
def test_group_trajectory_matches_upstream(upstream_dir, version, center, implementation) -> None:
    ref_params, ref_trace = upstream_run(upstream_dir, version)

    def read_ours(opt):
        group = opt.param_groups[0]
        return [group[k].item() for k in ("confidence", "tau", "calibrated")]

    ours = {}

    def make(p):
        ours["opt"] = make_casmo(
            p, center=center, adaptive_c_min=True, implementation=implementation, **PARITY_KWARGS
        )
        return ours["opt"]

    params, trace = parity_run(make, read_ours)

    # calibration happens at step tau_init_steps in both; before it upstream's tau is 1.0
    assert trace[CALIBRATION - 2, 2] == 0 and trace[CALIBRATION - 1, 2] == 1
    assert torch.equal(trace[:, 2], ref_trace[:, 2])
    torch.testing.assert_close(trace[:, 0], ref_trace[:, 0], rtol=1e-10, atol=1e-12)
    after = slice(CALIBRATION - 1, None)
    torch.testing.assert_close(trace[after, 1], ref_trace[after, 1], rtol=1e-10, atol=1e-12)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

    # the run really exercised what it claims: post-calibration sigmoid, adaptive floor, DDEA
    group = ours["opt"].param_groups[0]
    assert group["c_min_calibrated"].item() != PARITY_KWARGS["c_min"]
    tau_cal = group["tau_calibrated"].item()
    assert (trace[after, 1] - tau_cal).abs().max() > 1e-4, "the DDEA never moved tau"
    assert len(set(trace[after, 0].tolist())) > 100


def test_calibration_statistics_match_numpy() -> None:
    np = pytest.importorskip("numpy")
    torch.manual_seed(3)
    param = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    optimizer = make_casmo([param], tau_init_steps=37, lr=1e-2)
    agars = []
    for step in range(37):
        param.grad = torch.randn(50, dtype=torch.float64) + 0.3 * math.sin(step)
        optimizer.step()
        agars.append(optimizer.param_groups[0]["agar"].item())
    group = optimizer.param_groups[0]
    samples = np.array(agars)
    expected = {
        "agar_mean": samples.mean(),
        "agar_std": max(samples.std(), 0.01),
        "agar_median": np.median(samples),
        "agar_p10": np.percentile(samples, 10),
        "agar_p90": np.percentile(samples, 90),
        "tau_calibrated": np.clip(np.median(samples), 0.01, 0.5),
    }
    for key, value in expected.items():
        assert group[key].item() == pytest.approx(float(value), rel=1e-12, abs=1e-14), key
    assert group["calibrated"].item() == 1.0


# -- the AGAR formula, independent of the implementation's fused form ----------------------
def reference_agar(moments, eps, clamp_factor):
    m = torch.cat([m.reshape(-1) for m, _ in moments])
    v = torch.cat([v.reshape(-1) for _, v in moments])
    if clamp_factor is not None:
        m_scale = m.abs().mean() + eps
        v_scale = v.mean() + eps
        m = m.clamp(-clamp_factor * m_scale, clamp_factor * m_scale)
        v = v.clamp(0, clamp_factor * v_scale)
    signal = m**2
    noise = (v - signal).clamp(min=eps)
    return (signal / (signal + noise + eps)).mean().clamp(0, 1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bias_correction", [False, True], ids=["raw", "bias_corrected"])
@pytest.mark.parametrize("clamp_factor", [10.0, 2.0, None])
def test_group_agar_is_the_formula_over_all_elements(implementation, bias_correction, clamp_factor):
    gen = torch.Generator().manual_seed(0)
    shapes = [(30, 20), (7,), (0, 3), (5, 4)]
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes
    ]
    late = params[3]  # gains its gradient at step 3 (upstream crashed here)
    optimizer = make_casmo(
        params,
        implementation=implementation,
        agar_clamp_factor=clamp_factor,
        agar_bias_correction=bias_correction,
        tau_init_steps=50,
    )
    beta1, beta2 = 0.9, 0.999
    for step in range(1, 7):
        for p in params:
            if p is late and step < 3:
                p.grad = None
                continue
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 + 0.05
        optimizer.step()
        moments = []
        for p in (p for p in params if p.grad is not None):
            state = optimizer.state[p]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if bias_correction:
                t = state["step"].double()  # a float32 counter; the powers in float64
                m, v = m / (1 - beta1**t), v / (1 - beta2**t)
            moments.append((m, v))
        expected = reference_agar(moments, 1e-8, clamp_factor)
        torch.testing.assert_close(
            optimizer.param_groups[0]["agar"], expected, rtol=1e-12, atol=1e-14
        )
    assert optimizer.state[late]["step"].item() == 4 and optimizer.state[params[0]]["step"] == 6


# -- fixed upstream bugs -------------------------------------------------------------------
def test_parameter_gaining_gradient_later_in_group_mode() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    head = torch.nn.Linear(4, 2)
    optimizer = make_casmo(list(model.parameters()) + list(head.parameters()), tau_init_steps=5)
    x = torch.randn(8, 3)
    for step in range(1, 10):
        optimizer.zero_grad(set_to_none=True)
        hidden = model[0](x)
        loss = model[1](hidden).square().mean()
        if step >= 3:  # the head joins the graph later (unfreezing, conditional branches)
            loss = loss + head(hidden).square().mean()
        loss.backward()
        optimizer.step()
    assert optimizer.state[head.weight]["step"].item() == 7
    assert optimizer.state[model[0].weight]["step"].item() == 9
    assert all(torch.isfinite(p).all() for p in head.parameters())
    assert optimizer.param_groups[0]["calibrated"].item() == 1.0


def test_add_param_group_after_construction() -> None:
    first = torch.nn.Parameter(torch.randn(5))
    second = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = make_casmo([first], tau_init_steps=3, adaptive_c_min=False)
    first.grad = torch.randn(5)
    optimizer.step()
    optimizer.add_param_group({"params": [second], "c_min": 0.4})
    for _ in range(4):
        first.grad, second.grad = torch.randn(5), torch.randn(3, 2)
        optimizer.step()
    groups = optimizer.param_groups
    # each group has its own window: the first calibrated at its 3rd step, the second too
    assert groups[0]["agar_sample_count"].item() == 3 and groups[1]["agar_sample_count"].item() == 3
    assert groups[0]["calibrated"].item() == groups[1]["calibrated"].item() == 1.0
    assert groups[1]["confidence"].item() >= 0.4
    statistics = optimizer.statistics()
    assert {"confidence/group_0", "confidence/group_1", "tau/group_1"} <= set(statistics)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_parameter_mode_calibrates_after_its_own_steps(implementation) -> None:
    always = torch.nn.Parameter(torch.randn(6))
    later = torch.nn.Parameter(torch.randn(4))
    window = 5
    optimizer = make_casmo(
        [always, later],
        granularity="parameter",
        tau_init_steps=window,
        implementation=implementation,
    )
    calibrated_at = {}
    for step in range(1, 12):
        always.grad = torch.randn(6)
        later.grad = torch.randn(4) if step >= 4 else None
        optimizer.step()
        for name, p in (("always", always), ("later", later)):
            state = optimizer.state[p]
            if state and state["calibrated"].item() == 1.0 and name not in calibrated_at:
                calibrated_at[name] = step
    # upstream shared one window: with two tensors it calibrated after about window/2 steps
    assert calibrated_at == {"always": window, "later": 3 + window}
    group = optimizer.param_groups[0]
    assert group["calibrated"].item() == 1.0
    # the group statistics are element-weighted means over the tensors
    states = [optimizer.state[always], optimizer.state[later]]
    expected = (6 * states[0]["confidence"] + 4 * states[1]["confidence"]) / 10
    torch.testing.assert_close(group["confidence"], expected)


@pytest.mark.parametrize("granularity", ["group", "parameter"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_empty_tensor_never_produces_nan(granularity, implementation) -> None:
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    alone = torch.nn.Parameter(torch.zeros(0))
    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = make_casmo(
        [{"params": [empty, weight]}, {"params": [alone]}],
        granularity=granularity,
        tau_init_steps=4,
        implementation=implementation,
    )
    for _ in range(8):  # through calibration and beyond
        empty.grad, alone.grad = torch.zeros(0, 3), torch.zeros(0)
        weight.grad = torch.randn(4, 3)
        optimizer.step()
    for group in optimizer.param_groups:
        for key, value in group.items():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all(), (granularity, key, value)
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all(), (granularity, key)
    assert torch.isfinite(weight).all()
    assert all(math.isfinite(v) for v in optimizer.statistics().values())


def test_all_zero_first_gradients() -> None:
    """LoRA's B matrix starts at zero, so its first gradients (and A's) can be all zero."""
    lora_b = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = make_casmo([lora_b], tau_init_steps=4, c_min=0.25)
    for step in range(6):
        lora_b.grad = torch.zeros(4, 2) if step < 2 else torch.randn(4, 2)
        optimizer.step()
        group = optimizer.param_groups[0]
        assert torch.isfinite(lora_b).all() and torch.isfinite(group["confidence"])
        if step < 2:
            assert group["agar"].item() == 0.0 and group["confidence"].item() == 0.25
            assert torch.equal(lora_b, torch.zeros(4, 2))


@pytest.mark.parametrize("adaptive_c_min", [False, True])
@pytest.mark.parametrize("center", ["tau", "mean"])
@pytest.mark.parametrize("granularity", ["group", "parameter"])
def test_confidence_stays_within_its_floor_and_one(granularity, center, adaptive_c_min) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(10, 3), (3,)]]
    c_min = 0.3
    optimizer = make_casmo(
        params,
        granularity=granularity,
        center=center,
        adaptive_c_min=adaptive_c_min,
        c_min=c_min,
        tau_init_steps=6,
    )
    holders = [optimizer.param_groups[0]] if granularity == "group" else None
    seen = []
    for step in range(40):
        signal = 0.3 if step % 13 < 6 else 0.0  # alternate cleaner and noisier phases
        for p in params:
            p.grad = signal + torch.randn(p.shape, generator=gen)
        optimizer.step()
        for holder in holders or [optimizer.state[p] for p in params]:
            confidence = holder["confidence"].item()
            calibrated = holder["calibrated"].item() == 1.0
            floor = holder["c_min_calibrated"].item() if adaptive_c_min and calibrated else c_min
            assert floor - 1e-7 <= confidence <= 1.0 + 1e-7, (step, confidence, floor)
            seen.append(confidence)
    assert max(seen) - min(seen) > 0.05, "the confidence should move in this run"


@pytest.mark.parametrize(
    "name,value,choices",
    [("center", "median", ("tau", "mean")), ("granularity", "layer", ("group", "parameter"))],
)
def test_invalid_choices_name_the_valid_ones(name, value, choices) -> None:
    with pytest.raises(ValueError) as error:
        make_casmo([torch.nn.Parameter(torch.randn(2))], **{name: value})
    message = str(error.value)
    assert name in message and all(repr(choice) in message for choice in choices)


# -- memory, reductions, statistics ---------------------------------------------------------
def test_state_is_two_moments_per_parameter_and_small_group_tensors() -> None:
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 32), (32,)]]
    optimizer = make_casmo(params, tau_init_steps=10)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    for p in params:
        assert set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    group_numel = sum(v.numel() for v in optimizer.param_groups[0].values() if torch.is_tensor(v))
    assert group_numel < 10 + 20  # the calibration window and a few scalars, no flat copies


@pytest.mark.parametrize("granularity", ["group", "parameter"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cross_tensor_sums_go_through_finish_sums(monkeypatch, granularity, implementation) -> None:
    """Simulate two ranks holding identical shards: finish_sums doubles every partial sum.
    Every statistic is a ratio of finished sums, so the trajectory must not change; a sum
    that bypassed finish_sums would be off by a factor of two."""

    def run():
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
            for s in [(6, 5), (5,)]
        ]
        optimizer = make_casmo(
            params, granularity=granularity, tau_init_steps=3, implementation=implementation
        )
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 + 0.02
            optimizer.step()
        return params, optimizer.param_groups[0]["agar"].clone()

    single_params, single_agar = run()
    calls = []

    def two_identical_ranks(partial, process_group=None):
        calls.append(partial.shape)
        return partial * 2

    monkeypatch.setattr(casmo_module, "finish_sums", two_identical_ranks)
    doubled_params, doubled_agar = run()
    assert calls, "CASMO never called finish_sums"
    torch.testing.assert_close(doubled_agar, single_agar, rtol=1e-12, atol=1e-14)
    for p, q in zip(single_params, doubled_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_bfloat16_statistics_accumulate_in_float32() -> None:
    param = torch.nn.Parameter(torch.randn(300, 300).to(torch.bfloat16))
    optimizer = make_casmo([param], tau_init_steps=3)
    for _ in range(4):
        param.grad = (torch.randn(300, 300) * 0.1 + 0.05).to(torch.bfloat16)
        optimizer.step()
    group = optimizer.param_groups[0]
    assert group["agar"].dtype == torch.float32 and group["agar_samples"].dtype == torch.float32
    assert optimizer.state[param]["exp_avg"].dtype == torch.bfloat16
    assert torch.isfinite(param).all() and 0 < group["agar"].item() <= 1


def test_exported_and_statistics() -> None:
    assert hf_optim.CASMO is CASMO
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = make_casmo([param])
    # the group's calibration state exists from construction (for DCP's template)
    assert optimizer.statistics()["calibrated/group_0"] == 0.0
    param.grad = torch.randn(3)
    optimizer.step()
    statistics = optimizer.statistics()
    assert set(statistics) == {f"{k}/group_0" for k in ("agar", "confidence", "tau", "calibrated")}
    assert statistics["calibrated/group_0"] == 0.0
    assert 0.1 <= statistics["confidence/group_0"] <= 1.0


def test_weight_decay_is_decoupled_and_not_scaled_by_confidence() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = make_casmo([param], lr=0.1, weight_decay=0.5, c_min=0.0, tau_init_steps=10)
    param.grad = torch.zeros(4)  # zero gradient: AGAR 0, confidence 0, only the decay acts
    optimizer.step()
    assert optimizer.param_groups[0]["confidence"].item() == 0.0
    torch.testing.assert_close(param.detach(), torch.full((4,), 1 - 0.1 * 0.5))


def test_bfloat16_parameter_mode_resume_keeps_float32_calibration() -> None:
    def make():
        param = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.bfloat16))
        return param, make_casmo([param], granularity="parameter", tau_init_steps=3)

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 8, generator=gen).to(torch.bfloat16) for _ in range(6)]
    param, optimizer = make()
    for grad in grads[:2]:
        param.grad = grad
        optimizer.step()
    resumed_param, resumed = make()
    resumed_param.data.copy_(param.detach())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state[resumed_param]["agar_samples"].dtype == torch.float32
    for grad in grads[2:]:
        param.grad, resumed_param.grad = grad, grad.clone()
        optimizer.step()
        resumed.step()
    assert torch.equal(param, resumed_param)
    state, resumed_state = optimizer.state[param], resumed.state[resumed_param]
    for key, value in state.items():
        if not torch.is_tensor(value):  # the host-side bounds of the window's fill count
            assert value == resumed_state[key], key
            continue
        assert value.dtype == resumed_state[key].dtype and torch.equal(value, resumed_state[key])


@pytest.mark.parametrize("granularity", ["group", "parameter"])
def test_compiled_matches_eager_on_non_contiguous_and_tiny_tensors(granularity) -> None:
    """Non-contiguous and one-element tensors run the eager kernel inside a compiled step."""
    runs = []
    for implementation in ("eager", "compiled"):
        gen = torch.Generator().manual_seed(0)
        transposed = torch.nn.Parameter(torch.randn(7, 5, generator=gen, dtype=torch.float64).t())
        assert not transposed.is_contiguous()
        params = [
            transposed,
            torch.nn.Parameter(torch.randn(9, 4, generator=gen).double()),
            torch.nn.Parameter(torch.randn(1, generator=gen).double()),
        ]
        optimizer = make_casmo(
            params,
            granularity=granularity,
            tau_init_steps=3,
            weight_decay=0.1,
            implementation=implementation,
        )
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) + 0.2
            optimizer.step()
        runs.append((params, optimizer.param_groups[0]["confidence"]))
    (ref, ref_confidence), (fast, fast_confidence) = runs
    torch.testing.assert_close(fast_confidence, ref_confidence, rtol=1e-12, atol=1e-14)
    for p, q in zip(fast, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "override,name",
    [
        ({"granularity": "layer"}, "granularity"),
        ({"c_min": -0.1}, "c_min"),
        ({"center": 1}, "center"),
    ],
)
def test_param_group_hyperparameters_are_checked(override, name) -> None:
    first, second = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=name):
        make_casmo([{"params": [first]}, {"params": [second], **override}])
    optimizer = make_casmo([first])
    with pytest.raises(ValueError, match=name):
        optimizer.add_param_group({"params": [second], **override})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("granularity", ["group", "parameter"])
def test_bfloat16_compiled_agrees_with_eager(granularity) -> None:
    """bfloat16 moments, AGAR terms in float32; the compiled kernels round fewer
    intermediates to bfloat16 than the eager ones, hence the loose parameter tolerance."""
    runs = []
    for implementation in ("eager", "compiled"):
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16))
            for s in [(16, 8), (8,), (0, 2)]
        ]
        optimizer = make_casmo(
            params, granularity=granularity, tau_init_steps=3, implementation=implementation
        )
        agars = []
        for _ in range(6):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1 + 0.05).to(torch.bfloat16)
            optimizer.step()
            agars.append(optimizer.param_groups[0]["agar"].clone())
        runs.append((params, torch.stack(agars)))
    (ref_params, ref_agars), (fast_params, fast_agars) = runs
    assert fast_agars.dtype == torch.float32
    torch.testing.assert_close(fast_agars, ref_agars, rtol=1e-5, atol=1e-6)
    for p, q in zip(fast_params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-2)
