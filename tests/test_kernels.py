"""The kernel machinery itself (hf_optim/_kernels.py): what makes a compiled kernel recompile."""

from __future__ import annotations

import torch

from hf_optim._kernels import kernel


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
