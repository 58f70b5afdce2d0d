"""The library's backend policy (issue 12 item 4): registry rules, the start-up refusal and the
per-step check, including DeepSpeed's ZeRO optimizer found on the call stack."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import hf_optim
from hf_optim import _backends, _reduce
from hf_optim._backends import BACKENDS, refusal

NAMES = hf_optim.list_optimizers()
CLASS_NAMES = {
    "casmo": "CASMO",
    "autosgm": "AutoSGM",
    "amac": "AMaC",
    "momo": "Momo",
    "momo_adam": "MomoAdam",
}

# (name, options, backend) -> refused?
EXPECTED = [
    # what runs right everywhere it is offered
    *[(name, {}, "ddp", False) for name in NAMES],
    *[(name, {}, "fsdp2", False) for name in NAMES],
    *[(name, {}, "fsdp1", True) for name in NAMES],
    *[(name, {}, "zero3", True) for name in NAMES],
    # ZeRO-1/2: group statistics are reduced exactly; per-tensor ones are refused
    ("casmo", {}, "zero2", False),
    ("casmo", {"granularity": "group"}, "zero1", False),
    ("casmo", {"granularity": "parameter"}, "zero2", True),
    ("casmo", {"granularity": "parameter"}, "zero1", True),
    ("casmo", {"granularity": "parameter"}, "fsdp2", False),
    ("autosgm", {}, "zero2", False),
    ("autosgm", {"num_lrc": 2}, "zero2", True),
    ("autosgm", {"num_lrc": 4, "per_tensor": False}, "zero2", False),
    ("autosgm", {"lr_cfg": (True, 1e-2, 3)}, "zero1", True),  # the upstream tuple form
    ("amac", {}, "zero2", True),  # gradient centralization and noise are on by default
    ("amac", {"centralize_gradients": False}, "zero2", True),
    ("amac", {"noise_factor": 0.0}, "zero2", True),
    ("amac", {"centralize_gradients": False, "noise_factor": 0.0}, "zero2", False),
    ("momo", {}, "zero2", False),
    ("momo", {"param_groups": 2}, "zero2", True),
    ("momo_adam", {"param_groups": 2, "use_fstar": True}, "zero1", True),
    ("momo_adam", {"use_fstar": True}, "zero1", False),
    ("momo", {"param_groups": 2}, "fsdp2", False),
]


@pytest.mark.parametrize(("name", "options", "backend", "refused"), EXPECTED)
def test_refusal_policy(name, options, backend, refused):
    message = refusal(name, backend, options)
    assert (message is not None) == refused, message
    if message is None:
        return
    # names the optimizer, the backend, why, and what works instead
    assert CLASS_NAMES[name] in message and f"optim='{name}'" in message
    assert f"cannot run under {BACKENDS[backend]}: " in message
    assert "What works instead: " in message
    # never recommends a backend that is refused for the same options
    advice = message.split("What works instead: ", 1)[1]
    for other, label in BACKENDS.items():
        if label in advice and other != backend:
            assert refusal(name, other, options) is None, (other, message)


def test_every_refusal_offers_a_working_alternative():
    for name in NAMES:
        for backend in BACKENDS:
            message = refusal(name, backend, {})
            if message is not None:
                assert "none of the supported backends" not in message, message
                assert BACKENDS["ddp"] in message


def test_refusal_accepts_a_record_and_rejects_unknown_backends():
    info = hf_optim.get_optimizer_info("casmo")
    assert refusal(info, "zero2", {"granularity": "parameter"}) == refusal(
        "casmo", "zero2", {"granularity": "parameter"}
    )
    with pytest.raises(ValueError, match="valid backends: ddp, fsdp1, fsdp2, zero1"):
        refusal("casmo", "zero4")
    with pytest.raises(ValueError, match="valid names"):
        refusal("adam", "ddp")


def test_every_fix_is_named():
    message = refusal("amac", "zero2", {})
    assert "centralize_gradients=False and noise_factor=0 under DeepSpeed ZeRO-2" in message
    assert refusal("amac", "zero2", {"centralize_gradients": False, "noise_factor": 0}) is None


def test_fix_is_named():
    message = refusal("casmo", "zero2", {"granularity": "parameter"})
    assert "granularity='group' under DeepSpeed ZeRO-2" in message
    message = refusal("momo", "zero2", {"param_groups": 2})
    assert "a single parameter group" in message and "two groups" in message


# -- the per-step check ----------------------------------------------------------------------
def _casmo(params, **kwargs):
    return hf_optim.get_optimizer_class("casmo")(params, lr=1e-2, **kwargs)


def test_fsdp1_flattened_parameters_are_refused_at_the_first_step():
    p = torch.nn.Parameter(torch.randn(6))
    p._fsdp_flattened = True  # what FullyShardedDataParallel marks its flat views with
    optimizer = _casmo([p])
    p.grad = torch.randn(6)
    with pytest.raises(RuntimeError, match=r"CASMO \(optim='casmo'\) cannot run under FSDP1"):
        optimizer.step()


def test_plain_parameters_pass_and_the_verdict_is_cached():
    p = torch.nn.Parameter(torch.randn(6))
    optimizer = _casmo([p])
    p.grad = torch.randn(6)
    optimizer.step()
    assert optimizer in _backends._CHECKED
    assert len(_backends._CHECKED[optimizer]) == 1
    optimizer.step()
    assert len(_backends._CHECKED[optimizer]) == 1


_ZERO_STEP = """
def _optimizer_step(self, group_no):
    original_param_groups = self.optimizer.param_groups
    self.optimizer.param_groups = [original_param_groups[group_no]]
    try:
        self.optimizer.step()
    finally:
        self.optimizer.param_groups = original_param_groups
"""


def _fake_zero(module: str, **attributes):
    """A stand-in for DeepSpeed's ZeRO optimizer: a class from a ``deepspeed.runtime.zero``
    module whose ``_optimizer_step`` calls the client optimizer's ``step()`` as DeepSpeed does
    (one group at a time). The method is compiled into that module's namespace: the check
    reads the locals only of frames running DeepSpeed's code."""
    namespace = {"__name__": module}
    exec(_ZERO_STEP, namespace)  # noqa: S102 - a fixed source, defined below
    cls = type(
        "FakeZero", (), {"_optimizer_step": namespace["_optimizer_step"], "__module__": module}
    )
    zero = cls()
    for key, value in attributes.items():
        setattr(zero, key, value)
    return zero


@pytest.fixture
def fake_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))


def test_zero3_is_refused_from_the_call_stack(fake_deepspeed):
    flat = torch.randn(8, requires_grad=True)
    optimizer = _casmo([flat])
    zero = _fake_zero("deepspeed.runtime.zero.stage3", optimizer=optimizer)
    flat.grad = torch.randn(8)
    with pytest.raises(RuntimeError, match="cannot run under DeepSpeed ZeRO-3"):
        zero._optimizer_step(0)


def test_zero2_per_tensor_statistics_are_refused(fake_deepspeed):
    flat = torch.randn(8, requires_grad=True)
    optimizer = _casmo([flat], granularity="parameter")
    zero = _fake_zero(
        "deepspeed.runtime.zero.stage_1_and_2", optimizer=optimizer, partition_gradients=True
    )
    flat.grad = torch.randn(8)
    with pytest.raises(RuntimeError, match="cannot run under DeepSpeed ZeRO-2: granularity="):
        zero._optimizer_step(0)


def test_zero1_multi_group_momo_is_refused(fake_deepspeed):
    a, b = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
    optimizer = hf_optim.get_optimizer_class("momo")([{"params": [a]}, {"params": [b]}])
    zero = _fake_zero(
        "deepspeed.runtime.zero.stage_1_and_2", optimizer=optimizer, partition_gradients=False
    )
    a.grad, b.grad = torch.randn(4), torch.randn(3)
    optimizer.set_loss(1.0)
    with pytest.raises(RuntimeError, match="Momo .* cannot run under DeepSpeed ZeRO-1: .* all "):
        zero._optimizer_step(0)


def test_register_flat_partition_counts_real_elements_only():
    flat = torch.zeros(10)
    _reduce.register_flat_partition(flat, "group", 7)
    assert _reduce.valid_numel(flat) == 7
    assert _reduce.reduction_group([flat]) == "group"
    assert _reduce.counts(flat, "group")
    other = torch.zeros(3)
    assert _reduce.valid_numel(other) == 3 and _reduce.reduction_group([other]) is None
    _reduce.register_flat_partition(other, "another group", 3)
    with pytest.raises(RuntimeError, match="one process group"):
        _reduce.reduction_group([flat, other])


def test_flat_partition_lookup_traces_without_a_graph_break():
    """``torch.compile(optimizer.step)`` traces the partition lookup of every step."""
    import torch._dynamo

    flat, plain = torch.zeros(10), torch.zeros(3)
    _reduce.register_flat_partition(flat, "group", 7)

    def lookup(params):
        return params[0] + _reduce.valid_numel(params[-1]), _reduce.reduction_group(params[1:])

    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(lookup)([plain, flat])
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons


ZERO_GROUPS_RUN = [
    ("casmo", {"tau_init_steps": 2}),
    ("autosgm", {"num_lrc": 0}),
    ("amac", {"centralize_gradients": False, "noise_factor": 0.0, "warmup_steps": 0}),
]


@pytest.mark.parametrize(("name", "options"), ZERO_GROUPS_RUN, ids=[n for n, _ in ZERO_GROUPS_RUN])
def test_zero_state_linking_leaves_no_broken_state(fake_deepspeed, monkeypatch, name, options):
    """After stepping the first group, ZeRO reads ``optimizer.state[partition]`` of every group
    (leaving ``{}`` behind); the other groups must still start fresh and the run equal one
    without ZeRO (AutoSGM raised KeyError 'step' and AMaC 'exp_avg' at the second group)."""
    monkeypatch.setattr(_backends, "_register_zero_partitions", lambda zero: None)
    cls = hf_optim.get_optimizer_class(name)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2)]
    grads = [[torch.randn(6, generator=gen, dtype=torch.float64) for _ in start] for _ in range(3)]

    def groups(params):
        return [{"params": [params[0]]}, {"params": [params[1]], "lr": 5e-3}]

    plain = [t.clone().requires_grad_() for t in start]
    flat = [t.clone().requires_grad_() for t in start]
    expected = cls(groups(plain), implementation="eager", **options)
    optimizer = cls(groups(flat), implementation="eager", **options)
    zero = _fake_zero(
        "deepspeed.runtime.zero.stage_1_and_2", optimizer=optimizer, partition_gradients=True
    )
    for step_grads in grads:
        for p, q, g in zip(plain, flat, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        expected.step()
        for group_no in range(2):
            zero._optimizer_step(group_no)
            for p in flat:  # DeepSpeed's _lazy_init_hp_params_optimizer_state
                optimizer.state[p]
    for p, q in zip(plain, flat, strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(flat[1], start[1])
