"""The conformance battery every hf-optim optimizer must pass.

Parametrised over every case in ``tests/cases`` so that a new optimizer inherits all of it:
foreach == single-tensor reference, state_dict hygiene and bitwise resume, argument errors,
convergence, dtypes, and a step free of host synchronisation and graph breaks.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
import torch.nn.functional as F
from cases import OptimizerCase, all_cases

CASES = all_cases()
CASE_IDS = [case.id for case in CASES]

# A parameter that loses its gradient on these steps (1-based) and regains it afterwards.
NO_GRAD_STEPS = {3, 4, 5}


# -- a small problem with awkward parameters ----------------------------------------------
def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (6,), (0, 4), (3, 6), (4,)]
    return [
        (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
        for shape in shapes
    ]


def param_groups(case: OptimizerCase, params: list[torch.Tensor]) -> list[dict]:
    w1, b1, empty, w2, sometimes = params
    return [
        {"params": [w1, b1, empty]},
        {"params": [w2, sometimes], **case.second_group},
    ]


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 3, generator=gen, dtype=torch.float64) * 0.1
    return x.to(dtype), y.to(dtype)


def compute_loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    w1, b1, empty, w2, sometimes = params
    x, y = batch(step, w1.dtype)
    prediction = torch.tanh(x @ w1.T + b1) @ w2.T
    loss = F.mse_loss(prediction, y) + empty.sum()
    if step not in NO_GRAD_STEPS:
        loss = loss + 0.1 * (sometimes**2).sum()
    return loss


def train(case, optimizer, params, steps, start=0):
    losses = []
    for step in range(start + 1, start + steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(params, step)
        loss.backward()
        if case.needs_loss:
            optimizer.step(loss=loss)
        else:
            optimizer.step()
        losses.append(loss.item())
    return losses


def snapshot(optimizer) -> tuple[list, list]:
    """Per-parameter state and group entries (without params), in a comparable form."""
    states = [dict(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"]]
    groups = [
        {k: v for k, v in g.items() if k not in ("params", "foreach")}
        for g in optimizer.param_groups
    ]
    return states, groups


def assert_same_structure(a, b, close: bool, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b)}"
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        )
        if close:
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=1e-11, equal_nan=True, msg=lambda m: f"{path}: {m}"
            )
        else:
            assert (
                torch.equal(a, b)
                or (a.isnan() == b.isnan()).all()
                and torch.equal(a.nan_to_num(), b.nan_to_num())
            ), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        )
        for key in a:
            assert_same_structure(a[key], b[key], close, f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for index, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_same_structure(x, y, close, f"{path}[{index}]")
    elif isinstance(a, float) and close:
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-11) or (
            math.isnan(a) and math.isnan(b)
        ), f"{path}: {a} vs {b}"
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"


# -- foreach == reference -----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_foreach_matches_single_tensor_reference(case: OptimizerCase) -> None:
    runs = {}
    for foreach in (False, True):
        params = make_params(torch.float64)
        optimizer = case.make(param_groups(case, params), foreach=foreach)
        losses = train(case, optimizer, params, steps=12)
        runs[foreach] = (params, optimizer, losses)
    (ref_params, ref_opt, ref_losses), (fast_params, fast_opt, _fast_losses) = (
        runs[False],
        runs[True],
    )
    for ref, fast in zip(ref_params, fast_params, strict=False):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    assert_same_structure(snapshot(ref_opt), snapshot(fast_opt), close=True, path="state")
    # the parameters really moved, and the one without a gradient did not move while it had none
    initial = make_params(torch.float64)
    assert any(not torch.equal(p, q) for p, q in zip(ref_params, initial, strict=False))
    assert all(math.isfinite(x) for x in ref_losses)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parameter_without_gradient_is_left_alone(case: OptimizerCase) -> None:
    params = make_params(torch.float64)
    optimizer = case.make(param_groups(case, params))
    train(case, optimizer, params, steps=2)
    sometimes = params[4]
    before = sometimes.detach().clone()
    state_before = {
        k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[sometimes].items()
    }
    train(case, optimizer, params, steps=3, start=2)  # steps 3, 4, 5: no gradient for `sometimes`
    assert sometimes.grad is None
    # parameters without gradients are skipped: value and state untouched
    assert torch.equal(sometimes.detach(), before)
    assert_same_structure(
        state_before, dict(optimizer.state[sometimes]), close=False, path="skipped"
    )


# -- state_dict hygiene and resume ----------------------------------------------------------
ALLOWED_SCALARS = (int, float, bool, str, type(None))


def assert_weights_only_types(value, path="state_dict") -> None:
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (int, str)), f"{path}: key {key!r} of type {type(key)}"
            assert_weights_only_types(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            assert_weights_only_types(item, f"{path}[{index}]")
    else:
        assert type(value) in ALLOWED_SCALARS, (
            f"{path}: {type(value)} is not a tensor or Python scalar"
        )


def roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_is_weights_only_safe(case: OptimizerCase) -> None:
    params = make_params()
    optimizer = case.make(param_groups(case, params))
    train(case, optimizer, params, steps=6)
    state_dict = optimizer.state_dict()
    assert set(state_dict) == {"state", "param_groups"}, "no extra top-level keys"
    assert all(isinstance(key, int) for key in state_dict["state"]), (
        "state is keyed by parameters only"
    )
    assert_weights_only_types(state_dict)
    loaded = roundtrip(state_dict)
    assert_same_structure(state_dict, loaded, close=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_resume_is_bitwise(case: OptimizerCase, dtype: torch.dtype) -> None:
    total, split = 14, 6
    params = make_params(dtype)
    optimizer = case.make(param_groups(case, params))
    train(case, optimizer, params, steps=total)

    first_params = make_params(dtype)
    first = case.make(param_groups(case, first_params))
    train(case, first, first_params, steps=split)
    saved = roundtrip(first.state_dict())
    saved_copy = roundtrip(first.state_dict())

    resumed_params = [p.detach().clone().requires_grad_() for p in first_params]
    resumed = case.make(param_groups(case, resumed_params))
    resumed.load_state_dict(saved)
    assert_same_structure(
        saved, saved_copy, close=False, path="load_state_dict must not mutate its argument"
    )
    train(case, resumed, resumed_params, steps=total - split, start=split)

    for p, q in zip(params, resumed_params, strict=False):
        assert torch.equal(p, q), "resumed run differs from the uninterrupted one"
    assert_same_structure(snapshot(optimizer), snapshot(resumed), close=False)
    # the resumed optimizer's in-place steps never wrote into the state_dict it was given
    assert_same_structure(saved, saved_copy, close=False, path="loaded state must not alias")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fresh_optimizer_differs_from_resumed(case: OptimizerCase) -> None:
    """Control for the resume test: dropping the optimizer state must change the result."""
    total, split = 14, 6
    params = make_params()
    optimizer = case.make(param_groups(case, params))
    train(case, optimizer, params, steps=total)
    restarted_params = make_params()
    first = case.make(param_groups(case, restarted_params))
    train(case, first, restarted_params, steps=split)
    fresh = case.make(param_groups(case, restarted_params))
    train(case, fresh, restarted_params, steps=total - split, start=split)
    assert any(not torch.equal(p, q) for p, q in zip(params, restarted_params, strict=False))


# -- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_invalid_hyperparameters_raise_value_error(case: OptimizerCase) -> None:
    assert case.invalid, f"{case.id}: list the invalid hyperparameters the constructor must reject"
    for kwargs, name in case.invalid:
        with pytest.raises(ValueError, match=name):
            case.make(make_params(), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unknown_keyword_raises_type_error(case: OptimizerCase) -> None:
    with pytest.raises(TypeError):
        case.make(make_params(), no_such_argument=1)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.needs_loss], ids=[c.id for c in CASES if c.needs_loss]
)
def test_missing_loss_explains_the_three_ways(case: OptimizerCase) -> None:
    params = make_params()
    optimizer = case.make(param_groups(case, params))
    compute_loss(params, 1).backward()
    with pytest.raises(ValueError) as error:
        optimizer.step()
    message = str(error.value)
    assert "step(loss=" in message and "closure" in message and "set_loss" in message


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_by_keyword_closure_and_set_loss_agree(case: OptimizerCase) -> None:
    results = []
    for way in ("keyword", "closure", "set_loss"):
        params = make_params()
        optimizer = case.make(param_groups(case, params))
        for step in range(1, 5):
            optimizer.zero_grad(set_to_none=True)
            if way == "closure":

                def closure(step=step, params=params):
                    loss = compute_loss(params, step)
                    loss.backward()
                    return loss

                returned = optimizer.step(closure)
                assert torch.is_tensor(returned)
                continue
            loss = compute_loss(params, step)
            loss.backward()
            if way == "keyword":
                optimizer.step(loss=loss)
            else:
                optimizer.set_loss(loss)
                optimizer.step()
        results.append(params)
    for other in results[1:]:
        for p, q in zip(results[0], other, strict=False):
            assert torch.equal(p, q)


# -- convergence ----------------------------------------------------------------------------
def regression_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 10, generator=gen)
    true_w = torch.randn(10, 1, generator=gen)
    y = x @ true_w + 0.01 * torch.randn(128, 1, generator=gen)
    model = torch.nn.Linear(10, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model, lambda: F.mse_loss(model(x), y)


def classification_problem():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    labels = torch.arange(3).repeat_interleave(64)
    x = centers[labels] + 0.7 * torch.randn(192, 2, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, lambda: F.cross_entropy(model(x), labels)


@pytest.mark.parametrize(
    "problem", [regression_problem, classification_problem], ids=["regression", "classification"]
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loss_decreases(case: OptimizerCase, problem) -> None:
    model, loss_fn = problem()
    kwargs = case.train_kwargs if case.train_kwargs is not None else case.kwargs
    optimizer = case.cls(model.parameters(), **kwargs)
    initial = loss_fn().item()
    for _ in range(150):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step(loss=loss) if case.needs_loss else optimizer.step()
    final = loss_fn().item()
    assert math.isfinite(final)
    assert final < 0.5 * initial, f"loss went from {initial:.4f} to {final:.4f}"


# -- dtypes and statistics ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dtypes_and_finite_statistics(case: OptimizerCase, dtype: torch.dtype) -> None:
    params = make_params(dtype)
    optimizer = case.make(param_groups(case, params))
    train(case, optimizer, params, steps=10)
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
    statistics = optimizer.statistics()
    assert isinstance(statistics, dict) and statistics, "every optimizer reports live statistics"
    for name, value in statistics.items():
        assert isinstance(name, str) and isinstance(value, float) and math.isfinite(value), (
            name,
            value,
        )


# -- host synchronisation and graph breaks -------------------------------------------------
class HostSyncError(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_sync():
    """Make every Python-level device-to-host read of a tensor raise."""
    names = [
        "item",
        "tolist",
        "numpy",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
    ]
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbidden(name):
        def method(self, *args, **kwargs):
            raise HostSyncError(f"Tensor.{name}() called inside step()")

        return method

    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def one_step(case, optimizer, params, step):
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(params, step)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_makes_no_host_sync(case: OptimizerCase) -> None:
    if case.host_sync_reason:
        pytest.skip(case.host_sync_reason)
    params = make_params(torch.float32)
    optimizer = case.make(param_groups(case, params))
    for step in range(1, 13):  # the first step (state creation) and every later phase
        loss = one_step(case, optimizer, params, step)
        with forbid_host_sync():
            optimizer.step(loss=loss) if case.needs_loss else optimizer.step()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_has_no_graph_breaks(case: OptimizerCase) -> None:
    if case.host_sync_reason:
        pytest.skip(case.host_sync_reason)
    import torch._dynamo

    params = make_params(torch.float32)
    optimizer = case.make(param_groups(case, params))
    for step in range(1, 3):
        loss = one_step(case, optimizer, params, step)
        optimizer.step(loss=loss) if case.needs_loss else optimizer.step()
    loss = one_step(case, optimizer, params, 3)
    torch._dynamo.reset()
    try:
        if case.needs_loss:
            explanation = torch._dynamo.explain(optimizer.step)(loss=loss)
        else:
            explanation = torch._dynamo.explain(optimizer.step)()
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count >= 1
