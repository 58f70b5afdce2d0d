"""AMaC beyond the shared battery: the anchors (AdamW plus heavy-ball, Lookahead over it, the
closed-form schedule), each fixed upstream bug, upstream's names, the noise generator's
statistics and its keying on global positions, SWA and the train/eval swap, old checkpoints.

Most tests run the eager reference (``implementation="eager"``): the battery proves the compiled
kernels equal it, and every other combination of switches would compile more kernels."""

from __future__ import annotations

import io
import math

import pytest
import torch
from cases import IMPLEMENTATIONS

import hf_optim
from hf_optim import amac as amac_module
from hf_optim.amac import AMaC as _AMaC
from hf_optim.amac import anneal_factor, lr_factor


def AMaC(*args, **kwargs) -> _AMaC:  # noqa: N802 - the class, on its reference path by default
    kwargs.setdefault("implementation", "eager")
    return _AMaC(*args, **kwargs)


# every extra feature off: AdamW plus heavy-ball momentum on the Adam direction
BASE = {
    "schedule": False,
    "centralize_gradients": False,
    "noise_factor": 0.0,
    "clip_value": None,
    "dynamic_weight_decay": False,
    "lookahead": False,
    "swa": False,
}


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (5,), (3, 5), (1,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def loss_of(params: list[torch.Tensor], step: int) -> torch.Tensor:
    w1, b1, w2, scalar = params
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    return ((torch.tanh(x @ w1.T + b1) @ w2.T * scalar - y) ** 2).mean()


def gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_of(params, step), params))


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0):
    for step in range(start + 1, start + steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss_of(params, step).backward()
        optimizer.step()


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- the reference recurrences, written from the spec independently of hf_optim ------------
def reference_run(
    params: list[torch.Tensor],
    steps: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    momentum: float,
    lookahead_k: int | None = None,
    lookahead_alpha: float = 0.5,
) -> list[torch.Tensor]:
    """Adam direction, decoupled decay, heavy-ball ``u = mu u - lr delta; p += u`` (upstream's
    form), and optionally Lookahead ``slow += alpha (p - slow); p = slow`` every k steps."""
    beta1, beta2 = betas
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    u = [torch.zeros_like(p) for p in theta]
    slow = [p.clone() for p in theta]
    for t in range(1, steps + 1):
        grads = gradients([p.clone().requires_grad_() for p in theta], t)
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t)
            v_hat = v[i] / (1 - beta2**t)
            delta = m_hat / (v_hat.sqrt() + eps)
            theta[i] = theta[i] * (1 - lr * weight_decay)
            u[i] = momentum * u[i] - lr * delta
            theta[i] = theta[i] + u[i]
        if lookahead_k is not None and t % lookahead_k == 0:
            for i in range(len(theta)):
                slow[i] = slow[i] + lookahead_alpha * (theta[i] - slow[i])
                theta[i] = slow[i].clone()
    return theta


HYPER = {"lr": 3e-2, "betas": (0.85, 0.99), "eps": 1e-8, "weight_decay": 0.1, "momentum": 0.7}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_features_off_is_adamw_plus_heavy_ball(implementation: str) -> None:
    params = make_params()
    expected = reference_run(params, 15, **HYPER)
    ours = clone(params)
    optimizer = AMaC(ours, **BASE, **HYPER, implementation=implementation)
    run(optimizer, ours, 15)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_momentum_it_is_torch_adamw(implementation: str) -> None:
    params = make_params()
    theirs = clone(params)
    adamw = torch.optim.AdamW(theirs, lr=3e-2, betas=(0.85, 0.99), eps=1e-8, weight_decay=0.1)
    ours = clone(params)
    amac = AMaC(
        ours,
        **BASE,
        lr=3e-2,
        betas=(0.85, 0.99),
        weight_decay=0.1,
        momentum=0.0,
        implementation=implementation,
    )
    run(adamw, theirs, 12)
    run(amac, ours, 12)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_lookahead_is_reference_lookahead_over_the_base(implementation: str) -> None:
    params = make_params()
    expected = reference_run(params, 14, **HYPER, lookahead_k=3, lookahead_alpha=0.6)
    ours = clone(params)
    optimizer = AMaC(
        ours,
        **{**BASE, "lookahead": True},
        **HYPER,
        lookahead_k=3,
        lookahead_alpha=0.6,
        implementation=implementation,
    )
    run(optimizer, ours, 14)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    # the control: without Lookahead the trajectory is a different one
    plain = reference_run(params, 14, **HYPER)
    assert not torch.allclose(plain[0], expected[0])


# -- the schedule -----------------------------------------------------------------------------
def closed_form(t: int, lr: float, warmup: int, total: int, floor: float) -> float:
    if t < warmup:
        return lr * t / warmup
    progress = min(1.0, (t - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


@pytest.mark.parametrize("warmup", [0, 4])
def test_schedule_is_the_closed_form_and_holds_its_floor(warmup: int) -> None:
    total, lr, floor = 20, 0.1, 0.05
    params = make_params()
    optimizer = AMaC(
        params, total, lr=lr, warmup_steps=warmup, min_lr_ratio=floor, weight_decay=0.3
    )
    seen = []
    for step in range(1, 3 * total + 1):
        run(optimizer, params, 1, start=step - 1)
        group = optimizer.param_groups[0]
        seen.append(float(group["effective_lr"]))
        assert group["effective_lr"] == pytest.approx(closed_form(step, lr, warmup, total, floor))
        annealing = max(0.0, 1 - step / total)
        assert group["weight_decay_coefficient"] == pytest.approx(0.3 * annealing)
        assert group["noise_std"] == pytest.approx(0.01 * annealing)
        assert group["noise_std"] >= 0 and group["weight_decay_coefficient"] >= 0
    # the floor is reached at total_steps and held: no cycling (upstream's cosine rises again)
    assert seen[total - 1] == pytest.approx(lr * floor)
    assert all(value == pytest.approx(lr * floor) for value in seen[total - 1 :])
    if warmup:
        assert max(seen) == pytest.approx(lr) and seen[warmup - 1] == pytest.approx(lr)


def test_schedule_helpers_and_switches() -> None:
    assert lr_factor(5, warmup_steps=10, total_steps=100) == 0.5
    assert lr_factor(5, warmup_steps=10, total_steps=100, schedule=False) == 1.0
    assert lr_factor(50, warmup_steps=10, total_steps=100, cosine=False) == 1.0
    assert lr_factor(500, warmup_steps=10, total_steps=None) == 1.0
    assert anneal_factor(10**6, 100) == 0.0 and anneal_factor(10**6, None) == 1.0


def test_lr_and_weight_decay_are_read_from_the_group_every_step() -> None:
    params = make_params()
    optimizer = AMaC(params, **BASE, lr=1e-2, weight_decay=0.1)
    run(optimizer, params, 2)
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.param_groups[0]["weight_decay"] = 0.0
    run(optimizer, params, 1, start=2)
    assert optimizer.param_groups[0]["effective_lr"] == 0.5
    assert optimizer.param_groups[0]["weight_decay_coefficient"] == 0.0


def test_set_total_steps_reaches_every_group() -> None:
    params = make_params()
    optimizer = AMaC([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], warmup_steps=4)
    optimizer.set_total_steps(40)
    assert [g["total_steps"] for g in optimizer.param_groups] == [40, 40]
    with pytest.raises(ValueError, match="total_steps"):
        optimizer.set_total_steps(0)


# -- the upstream bugs ----------------------------------------------------------------------
def test_weights_never_grow_from_decay_long_after_warm_up() -> None:
    """Upstream's decay factor 1 - lr wd (1 - t/2W) exceeds 1 after 2W: weights grow."""
    param = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    optimizer = AMaC([param], 50, lr=0.1, warmup_steps=2, weight_decay=0.5, **_no_motion())
    norms = []
    for _ in range(200):
        param.grad = torch.zeros_like(param)
        optimizer.step()
        norms.append(param.detach().norm().item())
    assert all(b <= a for a, b in zip(norms, norms[1:], strict=False))
    assert norms[-1] == norms[60]  # decay reached zero at total_steps and stays there


def _no_motion() -> dict:
    return {"noise_factor": 0.0, "lookahead": False, "swa": False, "momentum": 0.0}


def test_centralization_is_per_output_channel_and_leaves_grad_alone() -> None:
    weight = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    scalar = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = AMaC([weight, scalar], 10, warmup_steps=0, noise_factor=0.0, swa=False)
    gen = torch.Generator().manual_seed(0)
    weight.grad = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    scalar.grad = torch.tensor([2.0], dtype=torch.float64)
    grad_before = weight.grad.clone()
    optimizer.step()
    assert torch.equal(weight.grad, grad_before), "p.grad must not be mutated"
    centred = grad_before - grad_before.mean(dim=1, keepdim=True)
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"], 0.1 * centred)
    # a one-element parameter is not centralized (upstream zeroes its gradient forever)
    torch.testing.assert_close(optimizer.state[scalar]["exp_avg"], 0.1 * scalar.grad)
    assert scalar.item() != 0.0


def test_counters_are_per_group_and_warmup_zero_works() -> None:
    params = make_params()
    optimizer = AMaC(
        [{"params": params[:2]}, {"params": params[2:]}], 10, warmup_steps=0, lookahead_k=2
    )
    for step in range(1, 6):
        optimizer.zero_grad(set_to_none=True)
        loss_of(params, step).backward()
        if step in (2, 3):
            params[1].grad = None  # a parameter that misses steps stays in phase
        optimizer.step()
    assert [g["step"] for g in optimizer.param_groups] == [5, 5]
    assert all(torch.isfinite(p).all() for p in params)


# -- upstream's names ---------------------------------------------------------------------
def test_upstream_names_are_aliases() -> None:
    upstream = AMaC(
        make_params(), 100, warmup_steps=10, beta1=0.8, beta2=0.95, mu=0.5, wd=0.2, alpha=0.7, k=3
    )
    readable = AMaC(
        make_params(),
        total_steps=100,
        warmup_steps=10,
        betas=(0.8, 0.95),
        momentum=0.5,
        weight_decay=0.2,
        lookahead_alpha=1 - 0.7,
        lookahead_k=3,
    )
    assert upstream.param_groups[0].keys() == readable.param_groups[0].keys()
    for key, value in readable.param_groups[0].items():
        if isinstance(value, (float, tuple)):
            assert upstream.param_groups[0][key] == pytest.approx(value), key
        elif key != "params":
            assert upstream.param_groups[0][key] == value, key
    for name in ("beta1", "beta2", "mu", "wd", "alpha", "k"):
        assert name not in upstream.param_groups[0]


@pytest.mark.parametrize(
    ("alias", "readable"),
    [
        ({"wd": 0.1}, {"weight_decay": 0.01}),
        ({"mu": 0.5}, {"momentum": 0.9}),
        ({"beta1": 0.8}, {"betas": (0.9, 0.999)}),
        ({"alpha": 0.5}, {"lookahead_alpha": 0.5}),
        ({"k": 3}, {"lookahead_k": 5}),
    ],
)
def test_alias_and_readable_name_together_is_an_error(alias: dict, readable: dict) -> None:
    # even when the readable value equals its default
    (alias_name,) = alias
    (readable_name,) = readable
    with pytest.raises(ValueError, match=f"'{alias_name}'.*'{readable_name}'.*not both"):
        AMaC(make_params(), **alias, **readable)


def test_upstream_names_in_param_groups() -> None:
    params = make_params()
    optimizer = AMaC([{"params": params[:2], "wd": 0.0, "mu": 0.3}, {"params": params[2:]}])
    first, second = optimizer.param_groups
    assert first["weight_decay"] == 0.0 and first["momentum"] == 0.3 and "wd" not in first
    assert second["weight_decay"] == 0.01 and second["momentum"] == 0.9
    with pytest.raises(ValueError, match="wd"):
        AMaC([{"params": params, "wd": -1.0}])
    with pytest.raises(ValueError, match="not both"):
        AMaC([{"params": params, "wd": 0.1, "weight_decay": 0.1}])


def test_total_steps_is_the_second_positional_argument() -> None:
    assert AMaC(make_params(), 123, warmup_steps=10).param_groups[0]["total_steps"] == 123
    with pytest.raises(ValueError, match="total_steps.*lr=... by keyword"):
        AMaC(make_params(), 1e-3)


def test_exported_through_the_registry() -> None:
    assert hf_optim.AMaC is _AMaC
    assert hf_optim.get_optimizer_class("amac") is _AMaC


# -- noise ----------------------------------------------------------------------------------
def noisy(seed: int, **overrides) -> tuple[AMaC, list[torch.Tensor]]:
    params = make_params()
    kwargs = {**BASE, "noise_factor": 0.5, "seed": seed, "total_steps": 10, **overrides}
    return AMaC(params, **kwargs), params


def test_noise_is_seeded_and_owned_by_the_optimizer() -> None:
    first, first_params = noisy(seed=1)
    second, second_params = noisy(seed=1)
    other, other_params = noisy(seed=2)
    torch.manual_seed(0)
    run(first, first_params, 4)
    torch.manual_seed(12345)  # the global generator plays no part
    run(second, second_params, 4)
    run(other, other_params, 4)
    assert all(torch.equal(a, b) for a, b in zip(first_params, second_params, strict=True))
    assert not torch.equal(first_params[0], other_params[0])
    quiet, quiet_params = noisy(seed=1, noise_factor=0.0)
    run(quiet, quiet_params, 4)
    assert not torch.equal(first_params[0], quiet_params[0]), "the noise is really there"


def test_noise_anneals_to_zero_at_total_steps() -> None:
    first, first_params = noisy(seed=1)
    other, other_params = noisy(seed=2)
    run(first, first_params, 10)
    run(other, other_params, 10)
    # from the same point, after total_steps the seed no longer matters
    for p, q in zip(first_params, other_params, strict=True):
        q.data.copy_(p.data)
    other.load_state_dict(roundtrip(first.state_dict()))
    other.param_groups[0]["seed"] = 2
    run(first, first_params, 3, start=10)
    run(other, other_params, 3, start=10)
    assert first.param_groups[0]["noise_std"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(first_params, other_params, strict=True))


def test_zero_learning_rate_step_is_a_no_op() -> None:
    """What torch.distributed.checkpoint runs to create state: lr=0, zero gradients."""
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = AMaC(params, 10, lr=0.0, warmup_steps=0, noise_factor=1.0, lookahead_k=1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))


def test_clipping_bounds_the_normalised_update() -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    optimizer = AMaC(params, **{**BASE, "clip_value": 0.1}, lr=1.0, momentum=0.0, weight_decay=0)
    for p in params:
        p.grad = torch.randn_like(p) * 100
    optimizer.step()
    moved = max((p - q).abs().max().item() for p, q in zip(params, before, strict=True))
    assert moved == pytest.approx(0.1)


# -- SWA and the train/eval swap ----------------------------------------------------------
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_swa_is_a_uniform_average_of_every_group(implementation: str) -> None:
    params = make_params()
    optimizer = AMaC(
        [{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}],
        **{**BASE, "swa": True},
        lookahead_k=3,
        swa_start=5,
        implementation=implementation,
    )
    samples: list[list[torch.Tensor]] = []
    for step in range(1, 17):
        run(optimizer, params, 1, start=step - 1)
        if step >= 5 and step % 3 == 0:
            samples.append([p.detach().clone() for p in params])
    assert len(samples) == 4  # steps 6, 9, 12, 15
    assert [g["swa_count"] for g in optimizer.param_groups] == [4, 4]
    for index, p in enumerate(params):
        mean = torch.stack([sample[index] for sample in samples]).mean(dim=0)
        torch.testing.assert_close(optimizer.state[p]["swa_average"], mean)


def trained(**overrides) -> tuple[AMaC, list[torch.Tensor]]:
    params = make_params()
    kwargs = {"total_steps": 30, "warmup_steps": 2, "lookahead_k": 3, "swa_start": 3, **overrides}
    optimizer = AMaC(params, **kwargs)
    run(optimizer, params, 10)
    return optimizer, params


def test_eval_swaps_the_average_in_and_train_swaps_it_back() -> None:
    optimizer, params = trained()
    fast = [p.detach().clone() for p in params]
    averages = [optimizer.state[p]["swa_average"].clone() for p in params]
    assert not torch.equal(fast[0], averages[0])
    optimizer.eval()
    optimizer.eval()  # idempotent
    assert all(torch.equal(p, a) for p, a in zip(params, averages, strict=True))
    with pytest.raises(RuntimeError, match="train()"):
        optimizer.step()
    optimizer.train()
    optimizer.train()  # idempotent
    assert all(torch.equal(p, f) for p, f in zip(params, fast, strict=True))
    assert all("fast_weights" not in optimizer.state[p] for p in params)


def test_eval_uses_lookahead_slow_weights_without_swa() -> None:
    optimizer, params = trained(swa=False)
    slow = [optimizer.state[p]["slow_weights"].clone() for p in params]
    optimizer.eval()
    assert all(torch.equal(p, s) for p, s in zip(params, slow, strict=True))
    optimizer.train()
    fast_only, fast_params = trained(eval_weights="fast")
    before = [p.detach().clone() for p in fast_params]
    fast_only.eval()
    assert all(torch.equal(p, b) for p, b in zip(fast_params, before, strict=True))


def test_checkpoint_saved_in_eval_mode_resumes_exactly() -> None:
    reference, reference_params = trained()
    run(reference, reference_params, 5, start=10)

    optimizer, params = trained()
    optimizer.eval()  # e.g. a checkpoint written during evaluation
    saved_model = [p.detach().clone() for p in params]  # holds the averaged weights
    saved_optimizer = roundtrip(optimizer.state_dict())
    assert all(g["averaged_in_model"] for g in saved_optimizer["param_groups"])

    resumed_params = [p.clone().requires_grad_() for p in saved_model]
    resumed = AMaC(resumed_params, total_steps=30, warmup_steps=2, lookahead_k=3, swa_start=3)
    resumed.load_state_dict(saved_optimizer)
    resumed.train()  # the Trainer calls this before every training step
    run(resumed, resumed_params, 5, start=10)
    assert all(torch.equal(p, q) for p, q in zip(resumed_params, reference_params, strict=True))


@pytest.mark.parametrize("method", ["write_averaged_weights", "swap_swa_weights"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_write_averaged_weights_for_export(method: str, mode: str) -> None:
    optimizer, params = trained()
    averages = [optimizer.state[p]["swa_average"].clone() for p in params]
    getattr(optimizer, mode)()
    getattr(optimizer, method)()
    assert all(torch.equal(p, a) for p, a in zip(params, averages, strict=True))
    assert not any(g["averaged_in_model"] for g in optimizer.param_groups)
    assert all("fast_weights" not in optimizer.state[p] for p in params)
    optimizer.train()  # no fast weights to restore: the export stays
    assert all(torch.equal(p, a) for p, a in zip(params, averages, strict=True))


def test_statistics_report_the_live_schedule() -> None:
    optimizer, _ = trained()
    statistics = optimizer.statistics()
    for key in ("effective_lr", "noise_std", "weight_decay_coefficient", "swa_count"):
        assert f"{key}/group_0" in statistics
    assert statistics["swa_count/group_0"] == 3.0  # steps 3, 6, 9


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        {"noise_factor": 0.3, "clip_value": None},
        {"noise_factor": 0.0, "clip_value": 0.2},
        {"noise_factor": 0.0, "clip_value": 0.2, "centralize_gradients": False},
        {"noise_factor": 0.3, "clip_value": 0.2, "momentum": 0.0, "lookahead": False},
        {"noise_factor": 0.3, "swa": False, "skip_nonfinite": True},
    ],
    ids=["noise-no-clip", "clip-no-noise", "clip-no-centralization", "no-momentum", "skip"],
)
def test_every_switch_combination_compiles_like_the_reference(options: dict) -> None:
    """The battery's cases cover every feature on and every feature off; these cover the
    combinations in between (each one compiles its own kernels, hence slow)."""
    runs = []
    for implementation in ("eager", "compiled"):
        params = make_params()
        kwargs = {"total_steps": 12, "lr": 1e-2, "warmup_steps": 2, "lookahead_k": 3}
        optimizer = AMaC(params, **kwargs, **options, implementation=implementation)
        run(optimizer, params, 9)
        runs.append((params, optimizer))
    (ref_params, ref), (fast_params, fast) = runs
    for p, q in zip(ref_params, fast_params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
        for key, value in ref.state[p].items():
            torch.testing.assert_close(fast.state[q][key], value, rtol=1e-9, atol=1e-11)
    assert not torch.equal(ref_params[0], make_params()[0])


def test_train_in_train_mode_touches_nothing() -> None:
    optimizer, params = trained()
    versions = [p._version for p in params]
    state_keys = [set(optimizer.state[p]) for p in params]
    for _ in range(3):
        optimizer.train()
    assert [p._version for p in params] == versions  # no in-place write to any parameter
    assert [set(optimizer.state[p]) for p in params] == state_keys


def test_one_element_channels_are_not_centralized() -> None:
    """A Linear(1, n) weight (n, 1) has one element per output channel: centring it would zero
    its gradient for good, so it is left alone (like 1-D tensors)."""
    weight = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    optimizer = AMaC([weight], **{**BASE, "centralize_gradients": True}, momentum=0.0)
    weight.grad = torch.arange(1.0, 5.0, dtype=torch.float64).reshape(4, 1)
    optimizer.step()
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"], 0.1 * weight.grad)


# -- issue 9: lengths, schedulers, old checkpoints ----------------------------------------------
def test_warmup_longer_than_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match="warmup_steps .*total_steps"):
        AMaC(make_params(), 100, warmup_steps=200)
    optimizer = AMaC(make_params(), warmup_steps=200)  # no total_steps yet: fine
    with pytest.raises(ValueError, match="warmup_steps .*total_steps"):
        optimizer.set_total_steps(150)
    assert optimizer.param_groups[0]["total_steps"] is None
    optimizer.set_total_steps(200)  # a warm-up as long as the run is allowed
    with pytest.raises(ValueError, match="warmup_steps"):
        optimizer.add_param_group(
            {"params": [torch.zeros(2, requires_grad=True)], "warmup_steps": 201}
        )


def test_own_schedule_under_a_changing_scheduler_warns_once() -> None:
    params = make_params()
    optimizer = AMaC(params, 50, warmup_steps=5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9**s)
    with pytest.warns(UserWarning, match="multiply") as record:
        for step in range(1, 5):
            run(optimizer, params, 1, start=step - 1)
            scheduler.step()
    assert sum("multiply" in str(w.message) for w in record) == 1
    # a constant scheduler (what the Trainer installs for AMaC) and schedule=False are silent
    import warnings

    for options in ({}, {"schedule": False}):
        quiet = AMaC(make_params(), 50, warmup_steps=5, **options)
        factor = (lambda s: 1.0) if not options else (lambda s: 0.9**s)
        quiet_scheduler = torch.optim.lr_scheduler.LambdaLR(quiet, factor)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for step in range(1, 4):
                run(quiet, quiet.param_groups[0]["params"], 1, start=step - 1)
                quiet_scheduler.step()


def test_checkpoint_of_the_previous_version_loads_and_continues() -> None:
    """The previous AMaC kept the group step as a Python int, the statistics as floats, and
    created a parameter's SWA average at its first SWA event (no per-parameter count)."""
    params = make_params()
    optimizer = AMaC(params, 30, warmup_steps=2, lookahead_k=3, swa_start=3)
    run(optimizer, params, 7)  # SWA events at 3 and 6
    saved = roundtrip(optimizer.state_dict())
    old = {"state": {}, "param_groups": []}
    for group in saved["param_groups"]:
        group = dict(group)
        group["step"] = int(group["step"])
        group["swa_count"] = int(group["swa_count"])
        for key in ("effective_lr", "noise_std", "weight_decay_coefficient"):
            group[key] = float(group[key])
        for key in ("skipped_steps", "implementation", "skip_nonfinite"):
            group.pop(key)
        group["foreach"] = None
        old["param_groups"].append(group)
    for index, state in saved["state"].items():
        state = dict(state)
        state.pop("swa_samples")
        if index == 1:
            state.pop("swa_average")  # as if it had joined after the last SWA event
        old["state"][index] = state
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = AMaC(resumed_params, 30, warmup_steps=2, lookahead_k=3, swa_start=3)
    resumed.load_state_dict(old)
    group = resumed.param_groups[0]
    assert torch.is_tensor(group["step"]) and float(group["step"]) == 7.0
    assert float(resumed.state[resumed_params[0]]["swa_samples"]) == 2.0
    assert float(resumed.state[resumed_params[1]]["swa_samples"]) == 0.0
    run(resumed, resumed_params, 2, start=7)  # step 9 is an SWA event
    run(optimizer, params, 2, start=7)
    assert torch.equal(resumed_params[0], params[0])
    # the parameter whose average was missing restarts its average at the next event
    torch.testing.assert_close(resumed.state[resumed_params[1]]["swa_average"], resumed_params[1])


# -- the noise generator ------------------------------------------------------------------------
def draw(
    seed=0, group_index=0, param_index=0, step=1, count=1 << 20, offset=0, dtype=torch.float64
):
    keys = amac_module._noise_keys(
        seed, group_index, [param_index], [(offset, count)], torch.tensor(float(step)), "cpu"
    )
    positions = offset + torch.arange(count, dtype=torch.int32)
    return amac_module._standard_normal(positions, keys[0], dtype)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std() * b.std()))


def test_noise_is_standard_normal() -> None:
    z = draw()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    kurtosis = float((z**4).mean() / z.var() ** 2)
    assert abs(kurtosis - 3) < 0.05  # the fit gives 2.98; a bare sum of four uniforms 2.7
    assert abs(float((z**3).mean())) < 5 * math.sqrt(15 / n)
    # Kolmogorov-Smirnov distance to N(0, 1): sampling (1.63/sqrt(n) at 1 %) + the fit (2.7e-4)
    ordered = z.sort().values
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = float((torch.special.ndtr(ordered) - empirical).abs().max())
    assert distance < 1.63 / math.sqrt(n) + 2.7e-4
    assert float(z.abs().max()) > 3.5  # real tails, not a clipped distribution


def test_noise_streams_are_uncorrelated() -> None:
    n = 1 << 18
    bound = 5 / math.sqrt(n)
    base = draw(count=n)
    assert abs(correlation(base[1:], base[:-1])) < bound  # neighbours
    assert abs(correlation(base[::2], base[1::2])) < bound
    for other in (
        draw(count=n, step=2),
        draw(count=n, step=1 + 1 << 20),
        draw(count=n, param_index=1),
        draw(count=n, group_index=1),
        draw(count=n, seed=1),
        draw(count=n, seed=1 << 40),
    ):
        assert abs(correlation(base, other)) < bound
        assert not torch.equal(base, other)
    # the same element over 200 steps: a white sequence
    sequence = torch.stack([draw(count=64, step=step) for step in range(1, 201)])
    for lag in (1, 2, 5):
        assert abs(correlation(sequence[lag:], sequence[:-lag])) < 5 / math.sqrt(
            sequence[lag:].numel()
        )
    # nor between one step and shifted positions of the next
    first, second = draw(count=1 << 16, step=10), draw(count=(1 << 16) + 64, step=11)
    for shift in (1, 2, 3, 64):
        assert abs(correlation(first, second[shift : shift + (1 << 16)])) < 5 / 2**8


def test_noise_hash_bits_are_balanced() -> None:
    values = amac_module._mix32(torch.arange(1 << 18, dtype=torch.int32))
    bits = torch.stack([(values >> b) & 1 for b in range(32)]).double().mean(dim=1)
    assert float((bits - 0.5).abs().max()) < 5 * 0.5 / math.sqrt(1 << 18)
    assert torch.unique(values).numel() == values.numel()  # a bijection on 32-bit words


def test_noise_depends_on_the_global_position_only() -> None:
    """A piece of a tensor (a shard) draws the values the whole tensor draws at the same
    positions: rows starting at global row r (FSDP2's Shard(0)) and column blocks (Shard(1))."""
    rows, row_length = 33, 7
    whole = draw(count=rows * row_length, step=4).reshape(rows, row_length)
    shard = draw(count=16 * row_length, step=4, offset=17 * row_length).reshape(16, row_length)
    assert torch.equal(shard, whole[17:])
    # a column block of rows: the rows kernel's positions offset + r * row_length + c
    keys = amac_module._noise_keys(0, 0, [0], [(3, row_length)], torch.tensor(4.0), "cpu")
    r = torch.arange(rows, dtype=torch.int32).unsqueeze(1)
    c = torch.arange(4, dtype=torch.int32)
    block = amac_module._standard_normal(3 + r * row_length + c, keys[0], torch.float64)
    assert torch.equal(block, whole[:, 3:7])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_update_of_a_shard_equals_that_of_the_whole(implementation: str) -> None:
    """The row kernel on a block of rows or columns, given the block's global position, makes
    the update the whole tensor gets there (noise, centralization by global row means)."""
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    grad = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    optimizer = _AMaC([param.clone().requires_grad_()], 20, warmup_steps=0, noise_factor=0.5)
    c, _ = optimizer._coefficients(optimizer.param_groups[0], param, torch.ones(()))
    compiled = implementation == "compiled"

    def update(rows, columns, whole_means):
        p, g = param[rows, columns].clone(), grad[rows, columns].clone()
        m, v, u = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
        offset = rows.start * 6 + columns.start
        keys = amac_module._noise_keys(0, 0, [0], [(offset, 6)], torch.tensor(1.0), "cpu")
        means = whole_means[rows]
        scalars = amac_module._kernel_scalars(c, keys[0])
        amac_module._update_rows(
            p, g, means, m, v, u, None, None, None, *scalars, True, compiled=compiled
        )
        return p

    means = grad.mean(dim=1, keepdim=True)
    whole = update(slice(0, 9), slice(0, 6), means)
    assert torch.equal(update(slice(5, 9), slice(0, 6), means), whole[5:9])
    assert torch.equal(update(slice(0, 9), slice(2, 6), means), whole[:, 2:6])


def test_an_empty_state_entry_is_no_state() -> None:
    """DeepSpeed ZeRO steps one parameter group at a time and, after the first, reads
    ``optimizer.state[partition]`` for every group (a defaultdict: it leaves ``{}`` behind).
    A parameter whose entry is empty starts as a fresh one (a KeyError 'exp_avg' before)."""
    params = make_params()
    fresh, touched = clone(params), clone(params)
    options = {**BASE, **HYPER}
    expected = AMaC([{"params": fresh[:2]}, {"params": fresh[2:], "lr": 1e-2}], **options)
    optimizer = AMaC([{"params": touched[:2]}, {"params": touched[2:], "lr": 1e-2}], **options)
    for p in touched:
        assert optimizer.state[p] == {}  # what DeepSpeed's state linking does
    run(expected, fresh, 3)
    run(optimizer, touched, 3)
    for got, want in zip(touched, fresh, strict=True):
        assert torch.equal(got, want)
    assert set(optimizer.state[touched[0]]) == set(expected.state[fresh[0]])
