"""The conformance battery every hf-optim optimizer must pass.

Parametrised over every case in ``tests/cases`` so that a new optimizer inherits all of it,
with the implementation (the compiled kernels and their eager reference) as one more axis:
compiled == eager, state_dict hygiene and bitwise resume, argument errors, convergence, dtypes,
a step free of host synchronisation, graph breaks and recompiles, ``torch.compile`` of the
whole step, and the conventions torch's own optimizer tests check (hooks, deepcopy, named
parameters, schedulers, tensor ``lr``, complex parameters, older checkpoints, zero gradients).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from cases import OptimizerCase, all_cases

CASES = all_cases()
CASE_IDS = [case.id for case in CASES]
# one configuration per optimizer class, for the most expensive checks
FIRST_CASES = list({case.cls: case for case in reversed(CASES)}.values())[::-1]
FIRST_IDS = [case.id for case in FIRST_CASES]


def implementation_axis(cases: list[OptimizerCase]) -> list:
    """(case, implementation) pairs: every configuration on the eager reference (default pass),
    and the compiled kernels (slow pass) for the first configuration of each optimizer class.
    Every configuration's compiled kernels are proven equal to its eager reference by
    ``test_compiled_matches_eager_reference``; compiling all of them again for every check
    would cost an hour on 2 cores."""
    pairs = [pytest.param(case, "eager", id=f"{case.id}-eager") for case in cases]
    pairs += [
        pytest.param(case, "compiled", id=f"{case.id}-compiled", marks=pytest.mark.slow)
        for case in cases
        if case in FIRST_CASES
    ]
    return pairs

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
    # .get: indexing the state's defaultdict would create entries (and fool DCP's "is the state
    # initialised" test)
    states = [
        dict(optimizer.state.get(p, {}))
        for group in optimizer.param_groups
        for p in group["params"]
    ]
    groups = [
        {k: v for k, v in g.items() if k not in ("params", "implementation")}
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


# -- compiled == eager reference ------------------------------------------------------------
def assert_compiled_without_failure() -> None:
    from hf_optim._kernels import COMPILE_FAILURES

    assert not COMPILE_FAILURES, f"kernels fell back to eager: {COMPILE_FAILURES}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_matches_eager_reference(case: OptimizerCase) -> None:
    """float64, 12 steps: the compiled kernels agree with the eager reference to rtol 1e-9
    (not bitwise: inductor fuses and reorders, e.g. lerp and reductions)."""
    runs = {}
    for implementation in ("eager", "compiled"):
        params = make_params(torch.float64)
        optimizer = case.make(param_groups(case, params), implementation=implementation)
        losses = train(case, optimizer, params, steps=12)
        runs[implementation] = (params, optimizer, losses)
    assert_compiled_without_failure()
    (ref_params, ref_opt, ref_losses), (fast_params, fast_opt, _) = runs["eager"], runs["compiled"]
    for ref, fast in zip(ref_params, fast_params, strict=False):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-11)
    assert_same_structure(snapshot(ref_opt), snapshot(fast_opt), close=True, path="state")
    initial = make_params(torch.float64)
    assert any(not torch.equal(p, q) for p, q in zip(ref_params, initial, strict=False))
    assert all(math.isfinite(x) for x in ref_losses)


@pytest.mark.parametrize("case,implementation", implementation_axis(CASES))
def test_parameter_without_gradient_is_left_alone(case: OptimizerCase, implementation) -> None:
    params = make_params(torch.float64)
    optimizer = case.make(param_groups(case, params), implementation=implementation)
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
@pytest.mark.parametrize("case,implementation", implementation_axis(CASES))
def test_resume_is_bitwise(case: OptimizerCase, dtype: torch.dtype, implementation) -> None:
    total, split = 14, 6
    params = make_params(dtype)
    optimizer = case.make(param_groups(case, params), implementation=implementation)
    train(case, optimizer, params, steps=total)

    first_params = make_params(dtype)
    first = case.make(param_groups(case, first_params), implementation=implementation)
    train(case, first, first_params, steps=split)
    saved = roundtrip(first.state_dict())
    saved_copy = roundtrip(first.state_dict())

    resumed_params = [p.detach().clone().requires_grad_() for p in first_params]
    resumed = case.make(param_groups(case, resumed_params), implementation=implementation)
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
COMMON_INVALID = (
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"implementation": "fast"}, "implementation"),
    ({"skip_nonfinite": "yes"}, "skip_nonfinite"),
)


def group_options(case: OptimizerCase) -> set[str]:
    return set(case.make(make_params()).defaults)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_invalid_hyperparameters_raise_value_error(case: OptimizerCase) -> None:
    """At construction and in add_param_group, with the same message; a rejected group is not
    added."""
    assert case.invalid, f"{case.id}: list the invalid hyperparameters the constructor must reject"
    options = group_options(case)
    for kwargs, name in (*case.invalid, *COMMON_INVALID):
        with pytest.raises(ValueError, match=name) as at_construction:
            case.make(make_params(), **kwargs)
        aliases = set(getattr(case.cls, "argument_aliases", {}))
        if not set(kwargs) <= options or (set(kwargs) | set(case.kwargs)) & aliases:
            continue  # a constructor-only argument or an upstream alias: no group entry
        optimizer = case.make(make_params())
        groups_before = len(optimizer.param_groups)
        extra = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        with pytest.raises(ValueError, match=name) as in_group:
            optimizer.add_param_group({"params": [extra], **kwargs})
        assert str(in_group.value) == str(at_construction.value)
        assert len(optimizer.param_groups) == groups_before


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unknown_keyword_raises_type_error(case: OptimizerCase) -> None:
    with pytest.raises(TypeError):
        case.make(make_params(), no_such_argument=1)


@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_tensor_lr_equals_float_lr(case: OptimizerCase) -> None:
    lr = case.make(make_params()).defaults["lr"]
    runs = []
    for value in (lr, torch.tensor(lr, dtype=torch.float64)):
        params = make_params()
        groups = param_groups(case, params)
        for group in groups:
            group.pop("lr", None)
        train(case, case.make(groups, lr=value), params, steps=6)
        runs.append(params)
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.needs_loss], ids=[c.id for c in CASES if c.needs_loss]
)
def test_missing_loss_explains_every_way(case: OptimizerCase) -> None:
    params = make_params()
    optimizer = case.make(param_groups(case, params))
    compute_loss(params, 1).backward()
    with pytest.raises(ValueError) as error:
        optimizer.step()
    message = str(error.value)
    for way in ("LossFeeder", "step(loss=", "closure", "set_loss"):
        assert way in message, (way, message)


@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_loss_given_twice_or_as_a_string_is_refused(case: OptimizerCase) -> None:
    params = make_params()
    optimizer = case.make(param_groups(case, params))
    loss = compute_loss(params, 1)
    loss.backward()
    with pytest.raises(ValueError, match="not both"):
        optimizer.step(lambda: loss, loss=loss)
    with pytest.raises(TypeError, match="loss"):
        optimizer.step(loss="0.5")
    with pytest.raises(TypeError, match="loss"):
        optimizer.set_loss("0.5")


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
    optimizer = case.cls(model.parameters(), **{"implementation": "eager", **kwargs})
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


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["plain", "skip-nonfinite"])
@pytest.mark.parametrize("case,implementation", implementation_axis(CASES))
def test_step_makes_no_host_sync(case: OptimizerCase, implementation, skip_nonfinite) -> None:
    if case.host_sync_reason:
        pytest.skip(case.host_sync_reason)
    options = {"implementation": implementation, "skip_nonfinite": skip_nonfinite}
    # float32: dynamo turns a 0-d float64 CPU tensor into a Python float read by .item() in its
    # guards (a CPU read, not a device sync, but the watch cannot tell them apart)
    warm_params = make_params(torch.float32)  # compile outside the watched region
    train(case, case.make(param_groups(case, warm_params), **options), warm_params, steps=12)
    params = make_params(torch.float32)
    optimizer = case.make(param_groups(case, params), **options)
    for step in range(1, 13):  # the first step (state creation) and every later phase
        loss = one_step(case, optimizer, params, step)
        with forbid_host_sync():
            optimizer.step(loss=loss) if case.needs_loss else optimizer.step()
    assert_compiled_without_failure()


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


# -- compiling ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_kernels_do_not_recompile(case: OptimizerCase) -> None:
    """A learning rate that changes every step and a second optimizer cost no recompile once a
    dtype has been seen: one compile per kernel per dtype and device, whatever the sizes (the
    problem's parameters have five different sizes)."""
    from torch._dynamo.utils import counters

    params = make_params(torch.float64)
    optimizer = case.make(param_groups(case, params), implementation="compiled")
    train(case, optimizer, params, steps=3)
    graphs = counters["stats"]["unique_graphs"]
    for step in range(4, 12):
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * 0.9
        train(case, optimizer, params, steps=1, start=step - 1)
    other = make_params(torch.float64, seed=1)  # five sizes, the same kernels
    train(case, case.make(param_groups(case, other), implementation="compiled"), other, steps=4)
    assert counters["stats"]["unique_graphs"] == graphs, "a kernel recompiled"
    assert_compiled_without_failure()


@pytest.mark.slow
@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_torch_compile_of_step_trains_like_eager(case: OptimizerCase) -> None:
    """torch.compile(optimizer.step), the Trainer's torch_compile path, for each optimizer:
    the parameters move and equal the eager run over enough steps to reach every phase."""
    runs = []
    for compile_step in (False, True):
        params = make_params(torch.float32)
        optimizer = case.make(param_groups(case, params), implementation="eager")
        step = torch.compile(optimizer.step) if compile_step else optimizer.step
        for index in range(1, 9):
            # in place, as torch's compiled-optimizer tests do: a new grad tensor every step
            # invalidates the compiled step's guards (a recompile per step)
            optimizer.zero_grad(set_to_none=False)
            loss = compute_loss(params, index)
            loss.backward()
            step(loss=loss.detach()) if case.needs_loss else step()
        runs.append((params, optimizer))
    (eager_params, _), (compiled_params, compiled_opt) = runs
    initial = make_params(torch.float32)
    assert any(not torch.equal(p, q) for p, q in zip(compiled_params, initial, strict=True))
    for p, q in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert compiled_opt.state, "the compiled step created no state"


# -- torch's optimizer conventions -----------------------------------------------------------
@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_step_and_state_dict_hooks_run(case: OptimizerCase) -> None:
    params = make_params()
    optimizer = case.make(param_groups(case, params))
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("sd-pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("sd-post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load-pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load-post"))
    train(case, optimizer, params, steps=2)
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == ["pre", "post", "pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]


@pytest.mark.parametrize("way", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_copied_optimizer_continues_like_the_original(case: OptimizerCase, way) -> None:
    params = make_params()
    optimizer = case.make(param_groups(case, params))
    train(case, optimizer, params, steps=3)
    if way == "deepcopy":
        copied_params, copied = copy.deepcopy((params, optimizer))
    else:
        copied_params, copied = pickle.loads(pickle.dumps((params, optimizer)))
    train(case, optimizer, params, steps=3, start=3)
    train(case, copied, copied_params, steps=3, start=3)
    for p, q in zip(params, copied_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_named_parameters_are_kept_in_the_state_dict(case: OptimizerCase) -> None:
    names = ["w1", "b1", "empty", "w2", "sometimes"]

    def named_groups(params):
        groups = param_groups(case, params)
        pairs = dict(zip(map(id, params), names, strict=True))
        return [{**g, "params": [(pairs[id(p)], p) for p in g["params"]]} for g in groups]

    params = make_params()
    optimizer = case.make(named_groups(params))
    train(case, optimizer, params, steps=10)
    first_params = make_params()
    first = case.make(named_groups(first_params))
    train(case, first, first_params, steps=4)
    saved = roundtrip(first.state_dict())
    assert [g["param_names"] for g in saved["param_groups"]] == [names[:3], names[3:]]
    resumed = case.make(named_groups(first_params))
    resumed.load_state_dict(saved)
    train(case, resumed, first_params, steps=6, start=4)
    for p, q in zip(params, first_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_lr_scheduler_drives_lr_and_resumes(case: OptimizerCase) -> None:
    def run(steps_before_save, total):
        params = make_params()
        optimizer = case.make(param_groups(case, params))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.8**s)
        for step in range(1, total + 1):
            if step == steps_before_save + 1 and steps_before_save:
                saved = roundtrip({"o": optimizer.state_dict(), "s": scheduler.state_dict()})
                optimizer = case.make(param_groups(case, params))
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.8**s)
                optimizer.load_state_dict(saved["o"])
                scheduler.load_state_dict(saved["s"])
            train(case, optimizer, params, steps=1, start=step - 1)
            scheduler.step()
        return params, optimizer

    params, optimizer = run(0, 8)
    lr0 = case.make(make_params()).defaults["lr"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.8**8)
    resumed_params, _ = run(4, 8)
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_complex_parameters_are_refused_or_equal_view_as_real(case: OptimizerCase) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.complex128, generator=gen).requires_grad_()
    target = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
    if not case.cls.supports_complex:
        with pytest.raises(ValueError, match="complex"):
            case.make([z])
        optimizer = case.make([torch.zeros(2, dtype=torch.float64, requires_grad=True)])
        with pytest.raises(ValueError, match="complex"):
            optimizer.add_param_group({"params": [z]})
        return
    real = torch.view_as_real(z.detach().clone()).requires_grad_()
    opt_z, opt_r = case.make([z]), case.make([real])
    for _ in range(4):
        for opt, loss_fn in (
            (opt_z, lambda: (z - target).abs().pow(2).sum()),
            (opt_r, lambda: (real - torch.view_as_real(target)).pow(2).sum()),
        ):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step(loss=loss) if case.needs_loss else opt.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), real.detach())


def without_weight_decay(case: OptimizerCase, groups: list[dict]) -> tuple[list[dict], dict]:
    options = set(inspect.signature(case.cls.__init__).parameters)
    if "weight_decay" not in options:
        return groups, {}
    return [{**g, "weight_decay": 0.0} for g in groups], {"weight_decay": 0.0}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zero_gradients_move_nothing(case: OptimizerCase) -> None:
    if case.zero_grad_moves_reason:
        pytest.skip(case.zero_grad_moves_reason)
    params = make_params()
    groups, overrides = without_weight_decay(case, param_groups(case, params))
    optimizer = case.make(groups, **overrides)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step(loss=torch.tensor(0.5, dtype=torch.float64)) if case.needs_loss else (
            optimizer.step()
        )
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p.detach(), q)


# -- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("case,implementation", implementation_axis(CASES))
def test_dcp_state_initialisation_leaves_no_trace(case: OptimizerCase, implementation) -> None:
    """torch.distributed.checkpoint materialises a fresh optimizer's state by stepping it with
    zero gradients and lr 0 (no loss). That must create the state, move nothing, need no loss,
    and leave the trajectory exactly that of an optimizer never so initialised."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    params = make_params()
    optimizer = case.make(param_groups(case, params), implementation=implementation)
    groups_before = snapshot(optimizer)[1]
    before = [p.detach().clone() for p in params]
    _init_optim_state(optimizer)
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p.detach(), q), "the state-initialising step moved a parameter"
    assert all(p in optimizer.state for p in params), "every parameter gets its state"
    assert_same_structure(groups_before, snapshot(optimizer)[1], close=False, path="groups")
    train(case, optimizer, params, steps=8)

    reference_params = make_params()
    reference = case.make(param_groups(case, reference_params), implementation=implementation)
    train(case, reference, reference_params, steps=8)
    for p, q in zip(params, reference_params, strict=True):
        assert torch.equal(p, q)


def trained(case: OptimizerCase, dtype=torch.float64, steps: int = 3, **overrides):
    params = make_params(dtype)
    optimizer = case.make(param_groups(case, params), **overrides)
    train(case, optimizer, params, steps=steps)
    return params, optimizer


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_older_checkpoints_load(case: OptimizerCase) -> None:
    """A checkpoint without an option added later gets the option's default; one with the
    retired ``foreach`` entry and Python-number counters loads and continues exactly."""
    params, optimizer = trained(case)
    saved = roundtrip(optimizer.state_dict())
    set_by_case = set(case.kwargs) | set(case.second_group) | {"lr"}
    later = [k for k in optimizer.defaults if k not in set_by_case and k != "implementation"]
    assert later, "no option to drop"
    for group in saved["param_groups"]:
        group.pop(later[-1])
        group["foreach"] = None
    for state in saved["state"].values():
        for key in case.cls.counter_state_keys & set(state):
            state[key] = float(state[key])
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = case.make(param_groups(case, resumed_params))
    resumed.load_state_dict(saved)
    assert all("foreach" not in g for g in resumed.param_groups)
    train(case, optimizer, params, steps=4, start=3)
    train(case, resumed, resumed_params, steps=4, start=3)
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", FIRST_CASES, ids=FIRST_IDS)
def test_another_optimizers_state_is_refused(case: OptimizerCase) -> None:
    for other in FIRST_CASES:
        if other.cls is case.cls:
            continue
        _, theirs = trained(other)
        _, ours = trained(case)
        with pytest.raises(ValueError) as error:
            ours.load_state_dict(theirs.state_dict())
        message = str(error.value)
        assert case.cls.__name__ in message and other.cls.__name__ in message, message


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_partly_missing_state_is_refused(case: OptimizerCase) -> None:
    params, optimizer = trained(case)
    saved = roundtrip(optimizer.state_dict())
    index, state = next((i, s) for i, s in saved["state"].items() if len(s) > 1)
    state.pop(sorted(state)[0])
    fresh = case.make(param_groups(case, [p.detach().clone().requires_grad_() for p in params]))
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict(saved)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_state_loads_into_bfloat16_parameters(case: OptimizerCase) -> None:
    params, optimizer = trained(case, torch.float32)
    saved = roundtrip(optimizer.state_dict())
    narrow = [p.detach().to(torch.bfloat16).requires_grad_() for p in params]
    resumed = case.make(param_groups(case, narrow))
    resumed.load_state_dict(saved)
    train(case, resumed, narrow, steps=3, start=3)
    for p in narrow:
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    for p in narrow:
        for key, value in resumed.state.get(p, {}).items():
            if not torch.is_tensor(value) or not value.is_floating_point() or value.dim() == 0:
                continue
            expected = torch.float32 if key in case.cls.wide_state_keys else torch.bfloat16
            assert value.dtype == expected, (key, value.dtype)


# -- skipping non-finite steps ---------------------------------------------------------------
def without_skip_count(snap):
    states, groups = snap
    return states, [{k: v for k, v in g.items() if k != "skipped_steps"} for g in groups]


@pytest.mark.parametrize("case,implementation", implementation_axis(CASES))
def test_skip_nonfinite_leaves_params_and_state_as_before(case: OptimizerCase, implementation):
    options = {"skip_nonfinite": True, "implementation": implementation}
    params, optimizer = trained(case, **options)
    reference_params, reference = trained(case, **options)
    bad_steps = [("grad", float("nan")), ("grad", float("inf"))]
    if case.needs_loss:
        bad_steps.append(("loss", float("nan")))
    for what, value in bad_steps:
        snap = copy.deepcopy(snapshot(optimizer))
        values = [p.detach().clone() for p in params]
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(params, 99)
        loss.backward()
        if what == "grad":
            params[0].grad[0, 0] = value
        else:
            loss = torch.full_like(loss, value)
        optimizer.step(loss=loss) if case.needs_loss else optimizer.step()
        for p, q in zip(params, values, strict=True):
            assert torch.equal(p.detach(), q), f"a {what} of {value} moved a parameter"
        assert_same_structure(
            without_skip_count(snap), without_skip_count(snapshot(optimizer)), close=False
        )
    assert optimizer.statistics()["skipped_steps/group_0"] == len(bad_steps)
    train(case, optimizer, params, steps=3, start=3)
    train(case, reference, reference_params, steps=3, start=3)
    for p, q in zip(params, reference_params, strict=True):
        assert torch.equal(p, q), "skipped steps changed the rest of the run"
