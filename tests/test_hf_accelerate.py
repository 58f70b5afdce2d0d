"""A raw Accelerate loop with every optimizer: prepare(), accumulation, LR schedulers, and the
documented way to hand Momo its loss (hf_optim.LossFeeder)."""

from __future__ import annotations

import math

import pytest
import torch
from hf_common import LEARNING_RATES, NAMES, ToyLM, one_thread, tiny_gpt2  # noqa: F401

import hf_optim

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

ACCUMULATION = 2
MICRO_BATCHES = 8


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("name", NAMES)
def test_raw_accelerate_loop(name, accelerator, monkeypatch):
    cls = hf_optim.get_optimizer_class(name)
    received: list[float | None] = []
    original = cls._step

    def spy(self, loss):
        received.append(None if loss is None else float(loss))
        return original(self, loss)

    monkeypatch.setattr(cls, "_step", spy)

    model = tiny_gpt2()
    windows = MICRO_BATCHES // ACCUMULATION
    length = hf_optim.get_optimizer_info(name).total_steps_argument  # a raw loop passes it
    optimizer = cls(
        model.parameters(),
        lr=LEARNING_RATES[name],
        **({length: windows} if length else {}),
        **({"warmup_steps": 1} if name == "amac" else {}),  # a warm-up inside the short run
    )
    loader = torch.utils.data.DataLoader(ToyLM(4 * MICRO_BATCHES), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert isinstance(optimizer, AcceleratedOptimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    feeder = hf_optim.LossFeeder(optimizer, accelerator)

    micro_losses: list[float] = []
    window_means: list[float] = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            micro_losses.append(loss.item())
            handed = feeder.add(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if handed is not None:
            window_means.append(float(handed))

    assert len(received) == windows  # one update per accumulation window
    assert all(math.isfinite(x) for x in micro_losses)
    if cls.needs_loss:
        expected = [
            (torch.tensor(micro_losses[i]) + torch.tensor(micro_losses[i + 1])).item() / 2
            for i in range(0, MICRO_BATCHES, ACCUMULATION)
        ]
        assert received == window_means
        assert received == pytest.approx(expected, rel=1e-6)
    else:
        assert window_means == []
    assert micro_losses[-1] < micro_losses[0]


def test_step_with_loss_keyword_is_not_forwarded_by_accelerate(accelerator):
    """Why LossFeeder exists: AcceleratedOptimizer.step takes no loss= keyword."""
    model = torch.nn.Linear(3, 1)
    optimizer = accelerator.prepare(hf_optim.get_optimizer_class("momo")(model.parameters()))
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(TypeError, match="loss"):
        optimizer.step(loss=torch.tensor(1.0))
    optimizer.step(lambda: torch.tensor(1.0))  # a loss-returning closure is forwarded


def test_loss_feeder_without_accelerator():
    model = torch.nn.Linear(3, 1)
    optimizer = hf_optim.get_optimizer_class("momo")(model.parameters())
    feeder = hf_optim.LossFeeder(optimizer, gradient_accumulation_steps=2)
    assert feeder.add(torch.tensor(1.0)) is None
    assert float(feeder.add(torch.tensor(3.0))) == 2.0
    feeder.add(torch.tensor(5.0))
    feeder.reset()
    assert feeder.add(torch.tensor(7.0)) is None  # a fresh window after reset()
    assert float(feeder.add(torch.tensor(9.0))) == 8.0
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        hf_optim.LossFeeder(optimizer, gradient_accumulation_steps=0)


def test_missing_loss_error_names_loss_feeder(accelerator):
    """Issue 9 item 14: in an Accelerate loop the error points to LossFeeder (step(loss=...)
    would raise TypeError there), and step(closure, loss=x) is refused, not silently resolved."""
    model = torch.nn.Linear(3, 1)
    inner = hf_optim.Momo(model.parameters())
    optimizer = accelerator.prepare(inner)
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(ValueError, match="LossFeeder"):
        optimizer.step()
    with pytest.raises(ValueError, match="not both"):
        inner.step(lambda: torch.tensor(1.0), loss=torch.tensor(2.0))


def test_backward_capture_hands_the_loss_over_before_backward():
    """Under DeepSpeed the engine steps the optimizer inside accelerator.backward, so the window
    loss must be with the optimizer before the original backward runs."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_optim.hf._loss import BackwardLossCapture

    optimizer = hf_optim.Momo(torch.nn.Linear(2, 1).parameters())
    seen = []

    def original_backward(loss, **kwargs):  # what the DeepSpeed engine would do: step now
        seen.append(None if optimizer._pending_loss is None else float(optimizer._pending_loss))

    accelerator = SimpleNamespace(
        backward=original_backward,
        distributed_type=DistributedType.DEEPSPEED,
        gradient_accumulation_steps=2,
        sync_gradients=False,
        reduce=None,
    )
    BackwardLossCapture.install(accelerator, optimizer)
    accelerator.backward(torch.tensor(1.5), scale_wrt_gas=False)
    accelerator.sync_gradients = True
    accelerator.backward(torch.tensor(2.0), scale_wrt_gas=False)
    assert seen == [None, 3.5]  # the Trainer's micro-batch losses, summed over the window
