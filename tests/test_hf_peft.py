"""LoRA through PEFT with every optimizer, via optim= and via peft's create_loraplus_optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from hf_common import NAMES, ToyLM, frozen_import_heap, tiny_gpt2, train_losses, training_kwargs  # noqa: F401

import hf_optim

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402
from transformers import TrainingArguments  # noqa: E402


def lora_model() -> peft.PeftModel:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    return peft.get_peft_model(tiny_gpt2(), config)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_only_adapters_changed(model, before) -> None:
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        if p.requires_grad:
            assert "lora_" in name
            assert changed, f"trainable {name} did not move"
        else:
            assert not changed, f"frozen {name} moved"


@pytest.mark.parametrize("name", NAMES)
def test_lora_with_optim_name(name, tmp_path):
    model = lora_model()
    before = _snapshot(model)
    args = TrainingArguments(**training_kwargs(name, str(tmp_path), max_steps=3))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ToyLM(8))
    trainer.train()
    assert all(math.isfinite(x) for x in train_losses(trainer))
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    assert [len(g["params"]) for g in optimizer.param_groups] == [4, 0]  # empty no-decay group
    _assert_only_adapters_changed(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_loraplus_with_hf_optim_classes(name, tmp_path):
    model = lora_model()
    before = _snapshot(model)
    cls, kwargs = hf_optim.hf.optimizer_cls_and_kwargs(
        TrainingArguments(**training_kwargs(name, str(tmp_path)))
    )
    assert cls is hf_optim.get_optimizer_class(name)
    lr = kwargs.pop("lr")
    optimizer = create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=4.0, **kwargs)
    assert isinstance(optimizer, cls) and len(optimizer.param_groups) == 4
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[2] == 4.0 * lrs[0]
    args = TrainingArguments(
        **training_kwargs(name, str(tmp_path), max_steps=3, optim="adamw_torch", optim_args=None)
    )
    trainer = hf_optim.Trainer(
        model=model, args=args, train_dataset=ToyLM(8), optimizers=(optimizer, None)
    )
    trainer.train()
    assert hf_optim.hf.unwrap_optimizer(trainer.optimizer) is optimizer
    assert all(math.isfinite(x) for x in train_losses(trainer))
    _assert_only_adapters_changed(model, before)
