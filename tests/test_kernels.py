"""The kernel machinery itself (hf_optim/_kernels.py): what makes a compiled kernel recompile."""

from __future__ import annotations

import torch

from hf_optim._kernels import kernel, wide_sum


@kernel
def _scaled_step(param, grad, lr):
    return param.sub_(grad * lr)


def test_items_sharing_a_zero_dim_tensor_do_not_recompile_when_the_sharing_changes():
    """The items of one compiled chunk share a group's 0-d learning rate; the next step's
    chunk may pair parameters of two groups. Neither may cost a recompile."""
    from torch._dynamo.utils import counters

    params = [torch.randn(6) for _ in range(4)]
    grads = [torch.randn(6) for _ in range(4)]
    lr_a, lr_b = torch.tensor(0.1), torch.tensor(0.2)
    expected = [p - g * 0.1 for p, g in zip(params, grads, strict=True)]
    _scaled_step.map([(p, g, lr_a) for p, g in zip(params, grads, strict=True)], compiled=True)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e)
    graphs = counters["stats"]["unique_graphs"]
    lrs = [lr_a, lr_b, lr_a, lr_b]
    expected = [p - g * lr for p, g, lr in zip(params, grads, lrs, strict=True)]
    _scaled_step.map(list(zip(params, grads, lrs, strict=True)), compiled=True)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e)
    assert counters["stats"]["unique_graphs"] == graphs, "sharing another 0-d tensor recompiled"


@kernel
def _stored_sums(param, grad, avg, weight):
    new = torch.lerp(avg, grad, weight)
    avg.copy_(new)
    return torch.stack([wide_sum(param * grad), wide_sum(new * new)])


def test_sums_compile_once_for_any_mix_of_tensor_sizes():
    """One compiled graph serves chunks mixing tensors of 3 and 70 000 elements, in either
    order (a float32 ``.sum()`` would guard each size against inductor's cascade-summation
    threshold, 4096, and compile again), and it equals the eager reference."""
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(0)
    sizes = [3, 70_000, 5000, 10, 4096, 4097]
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    avgs = [torch.randn(n, generator=gen) for n in sizes]
    weight = torch.tensor(0.1)
    graphs = None
    for order in (range(6), reversed(range(6)), [1, 3, 0, 5, 2, 4]):
        order = list(order)
        eager_avgs = [avgs[i].clone() for i in order]
        items = [(params[i], grads[i], avgs[i], weight) for i in order]
        expected = _stored_sums.map(
            [(params[i], grads[i], a, weight) for i, a in zip(order, eager_avgs, strict=True)]
        )
        got = _stored_sums.map(items, compiled=True)
        for i, e, g, a in zip(order, expected, got, eager_avgs, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(avgs[i], a)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "another mix of sizes recompiled"


def _decay_scalars(param, grad, beta, step):
    return (1 - beta**step,)


@kernel(scalars=_decay_scalars)
def _bias_corrected_step(param, grad, beta, step, correction):
    return param.sub_(grad / correction)


def test_scalars_reach_the_body_and_compiled_equals_eager():
    params = [torch.randn(4099, dtype=torch.float64) for _ in range(3)]
    grads = [torch.randn(4099, dtype=torch.float64) for _ in range(3)]
    beta = torch.tensor(0.9, dtype=torch.float64)
    steps = [torch.tensor(float(t), dtype=torch.float64) for t in (1, 2, 7)]
    eager = [p.clone() for p in params]
    expected = [p - g / (1 - 0.9**t) for p, g, t in zip(params, grads, (1, 2, 7), strict=True)]
    items = list(zip(params, grads, [beta] * 3, steps, strict=True))
    _bias_corrected_step.map(items, compiled=True)
    _bias_corrected_step.map(list(zip(eager, grads, [beta] * 3, steps, strict=True)))
    for p, e, x in zip(params, eager, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-14, atol=0)
        torch.testing.assert_close(p, x, rtol=1e-12, atol=1e-12)  # each its own correction


def test_aliases_are_reused_while_the_tensor_keeps_its_memory():
    import gc

    from hf_optim import _kernels

    param = torch.randn(8)
    first = _kernels._cached_alias(param, True)
    assert _kernels._cached_alias(param, True) is first
    assert _kernels._cached_alias(param, True, 1) is not first  # a second distinct alias
    param.data = torch.randn(8)  # new memory: a new alias on it
    second = _kernels._cached_alias(param, True)
    assert second is not first and second.data_ptr() == param.data_ptr()
    param.resize_(16)  # a new layout (and memory)
    assert _kernels._cached_alias(param, True).shape == (16,)
    key = (id(param), True, 0)
    del param
    gc.collect()
    assert key not in _kernels._ALIASES  # the entry (and its hold on the memory) went with it
