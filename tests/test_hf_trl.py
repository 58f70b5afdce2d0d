"""TRL's stock trainers with optim=<hf-optim name> and no code change: SFT with every optimizer
(full and LoRA, via SFTTrainer's own peft_config), and Momo in SFTTrainer, DPOTrainer and
GRPOTrainer fed exactly the loss each backpropagates. Tiny GPT-2 built from a config, a
character tokenizer, in-memory data: offline and fast."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hf_common import (  # noqa: F401 - frozen_import_heap, one_thread: autouse fixtures
    LEARNING_RATES,
    NAMES,
    OPTIM_ARGS,
    char_tokenizer,
    expected_loss_average,
    frozen_import_heap,
    one_thread,
    tiny_char_gpt2,
    train_losses,
)

import hf_optim

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")


def _common(name: str, output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        optim=name,
        optim_args=OPTIM_ARGS[name] or None,
        learning_rate=LEARNING_RATES[name],
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        max_grad_norm=0.0,
        save_strategy="no",
        disable_tqdm=True,
        lr_scheduler_type="constant",
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def fed_losses(monkeypatch):
    """Record the loss every Momo/MomoAdam update receives."""
    received: list[float] = []
    for cls in (hf_optim.Momo, hf_optim.MomoAdam):
        if "_step" not in vars(cls):
            continue
        original = cls._step

        def spy(self, loss, _original=original):
            received.append(float(loss))
            return _original(self, loss)

        monkeypatch.setattr(cls, "_step", spy)
    return received


def _check_momo(trainer, fed: list[float]) -> None:
    logged = train_losses(trainer)
    assert fed == logged and len(logged) == trainer.args.max_steps
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    group = optimizer.param_groups[0]
    averages = [e["optim/loss_avg/group_0"] for e in trainer.state.log_history if "loss" in e]
    if isinstance(optimizer, hf_optim.MomoAdam):  # its average starts at zero, with betas[0]
        expected = expected_loss_average(logged, group["betas"][0], bias_correction=True)
    else:
        expected = expected_loss_average(logged, group["beta"], group["bias_correction"])
    assert averages == pytest.approx(expected, rel=1e-6)


def _text_dataset():
    return datasets.Dataset.from_dict(
        {"text": [f"the number {i} is {i * 7 % 13}." for i in range(24)]}
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", NAMES)
def test_sft_trainer(name, lora, fed_losses, tmp_path):
    model = tiny_char_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_config = None
    if lora:
        peft_config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
        )
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**_common(name, tmp_path), max_length=32),
        train_dataset=_text_dataset(),
        processing_class=char_tokenizer(),
        peft_config=peft_config,
    )
    trainer.train()
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    assert type(optimizer) is hf_optim.get_optimizer_class(name)
    assert all(math.isfinite(x) for x in train_losses(trainer))
    trained = dict(trainer.model.named_parameters())
    moved = {
        n for n, p in trained.items() if n in before and not torch.equal(p.detach(), before[n])
    }
    if lora:
        assert isinstance(trainer.model, peft.PeftModel)
        assert not moved  # base weights frozen (the adapters are new parameters)
        adapters = [p for n, p in trained.items() if "lora_B" in n]
        assert adapters and any(bool(p.detach().abs().sum() > 0) for p in adapters)
    else:
        assert len(moved) == len(before)
    if optimizer.needs_loss:
        _check_momo(trainer, fed_losses)


def test_dpo_trainer_feeds_momo_its_loss(fed_losses, tmp_path):
    rows = {
        "prompt": [f"q{i}:" for i in range(16)],
        "chosen": [f" yes {i}" for i in range(16)],
        "rejected": [f" no {i}" for i in range(16)],
    }
    trainer = trl.DPOTrainer(
        model=tiny_char_gpt2(),
        ref_model=tiny_char_gpt2(),
        args=trl.DPOConfig(
            **_common("momo", tmp_path, gradient_accumulation_steps=2), max_length=32
        ),
        train_dataset=datasets.Dataset.from_dict(rows),
        processing_class=char_tokenizer(),
    )
    trainer.train()
    _check_momo(trainer, fed_losses)


def test_grpo_trainer_feeds_momo_its_loss_and_warns_about_lb(fed_losses, tmp_path):
    def reward(completions, **kwargs):
        return [float(len(completion)) for completion in completions]

    config = trl.GRPOConfig(
        **_common("momo", tmp_path, max_steps=2), num_generations=2, max_completion_length=4
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = trl.GRPOTrainer(
            model=tiny_char_gpt2(),
            reward_funcs=reward,
            args=config,
            train_dataset=datasets.Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)]}),
            processing_class=char_tokenizer(),
        )
        trainer.train()
    assert any("use_fstar=true" in str(w.message) for w in caught)
    _check_momo(trainer, fed_losses)
