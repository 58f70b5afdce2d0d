"""Trainer runs through optim=: progress, bitwise resume, loss plumbing, schedules, clipping
warnings, statistics, averaged weights."""

from __future__ import annotations

import logging
import math
import shutil
import warnings

import pytest
import torch
from hf_common import (
    NAMES,
    ToyLM,
    frozen_import_heap,  # noqa: F401 - autouse fixture
    one_thread,  # noqa: F401 - autouse fixture
    parameters_vector,
    tiny_gpt2,
    train_losses,
    training_kwargs,
)

import hf_optim

transformers = pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

STOCK = transformers.Trainer


def _trainer(cls, name, output_dir, dataset=None, model=None, **overrides):
    args = TrainingArguments(**training_kwargs(name, str(output_dir), **overrides))
    return cls(model=model or tiny_gpt2(), args=args, train_dataset=dataset or ToyLM(8))


@pytest.mark.parametrize("name", NAMES)
def test_stock_trainer_one_word_change(name, tmp_path):
    """optim=name with the stock Trainer: finite, decreasing loss; statistics in the logs."""
    trainer = _trainer(STOCK, name, tmp_path)
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    assert type(optimizer) is hf_optim.get_optimizer_class(name)
    assert [len(g["params"]) for g in optimizer.param_groups][1] > 0  # decay / no-decay groups
    statistics = optimizer.statistics()
    if statistics:
        logged = trainer.state.log_history[0]
        assert {f"optim/{key}" for key in statistics} <= set(logged)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bitwise(name, tmp_path):
    """hf_optim.Trainer: a run resumed from checkpoint-3 ends bitwise equal to the
    uninterrupted run; without optimizer.pt it does not; optimizer.pt is weights_only-safe."""
    full = _trainer(hf_optim.Trainer, name, tmp_path / "a", save_strategy="steps", save_steps=3)
    full.train()
    reference = parameters_vector(full.model)
    statistics = hf_optim.hf.unwrap_optimizer(full.optimizer).statistics()
    assert {f"optim/{key}" for key in statistics} <= set(full.state.log_history[0])
    checkpoint = tmp_path / "a" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["state"], "optimizer.pt holds per-parameter state"

    resumed = _trainer(hf_optim.Trainer, name, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(parameters_vector(resumed.model), reference)

    control_checkpoint = tmp_path / "control-3"
    shutil.copytree(checkpoint, control_checkpoint)
    (control_checkpoint / "optimizer.pt").unlink()
    control = _trainer(hf_optim.Trainer, name, tmp_path / "c")
    control.train(resume_from_checkpoint=str(control_checkpoint))
    assert not torch.equal(parameters_vector(control.model), reference)


class PlainLM(torch.nn.Module):
    """A model without loss kwargs: the Trainer divides its loss by the accumulation steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_gpt2()

    def forward(self, input_ids, labels=None):
        return {"loss": self.inner(input_ids=input_ids, labels=labels).loss}


@pytest.fixture
def fed_losses(monkeypatch):
    """Record the loss every Momo/MomoAdam update receives."""
    received: list[float] = []
    for name in ("momo", "momo_adam"):
        cls = hf_optim.get_optimizer_class(name)
        if "_step" not in vars(cls):  # inherited: already wrapped through its base
            continue
        original = cls._step

        def spy(self, loss, _original=original):
            received.append(float(loss))
            return _original(self, loss)

        monkeypatch.setattr(cls, "_step", spy)
    return received


@pytest.mark.parametrize("trainer_cls", [STOCK, hf_optim.Trainer], ids=["stock", "hf_optim"])
@pytest.mark.parametrize("plain", [False, True], ids=["loss_kwargs", "plain_module"])
def test_momo_gets_the_logged_loss_with_accumulation(trainer_cls, plain, fed_losses, tmp_path):
    model = PlainLM() if plain else tiny_gpt2()
    trainer = _trainer(
        trainer_cls,
        "momo",
        tmp_path,
        dataset=ToyLM(32),
        model=model,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
    )
    trainer.train()
    assert trainer.model_accepts_loss_kwargs is not plain
    assert len(fed_losses) == 4
    assert fed_losses == train_losses(trainer)


def test_skipped_step_leaves_no_loss_behind(fed_losses, monkeypatch, tmp_path):
    """A step the mixed-precision scaler skips (the inner step never runs) must not leak its
    loss into the next window."""
    from accelerate.optimizer import AcceleratedOptimizer

    original = AcceleratedOptimizer.step
    calls = {"n": 0}

    def skipping_step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 2:
            return None  # what GradScaler does on inf/NaN gradients
        return original(self, closure)

    monkeypatch.setattr(AcceleratedOptimizer, "step", skipping_step)
    trainer = _trainer(
        hf_optim.Trainer,
        "momo",
        tmp_path,
        dataset=ToyLM(32),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
    )
    trainer.train()
    logged = train_losses(trainer)
    assert fed_losses == logged[:1] + logged[2:]


class DoubledLoss(STOCK):
    """A Trainer subclass with its own compute_loss (as TRL's trainers have)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize(
    ("trainer_cls", "overrides"),
    [(STOCK, {"label_smoothing_factor": 0.1}), (DoubledLoss, {})],
    ids=["label_smoothing", "custom_compute_loss"],
)
def test_any_trainer_feeds_the_loss_it_backpropagates(trainer_cls, overrides, fed_losses, tmp_path):
    """The loss is taken at accelerator.backward, so a loss the model never computes (label
    smoothing, an overridden compute_loss) reaches Momo too, and equals the logged loss."""
    trainer = _trainer(
        trainer_cls,
        "momo",
        tmp_path,
        dataset=ToyLM(16),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        **overrides,
    )
    trainer.train()
    logged = train_losses(trainer)
    assert len(fed_losses) == 2 and fed_losses == logged
    if trainer_cls is DoubledLoss:
        assert logged[0] > 2 * 4.0  # twice the cross-entropy of a fresh 96-token model


def test_no_hook_and_no_trainer_kept_alive(tmp_path):
    """Issue 9 item 12: Trainers with Momo leave nothing on the model (the old forward hook held
    the Trainer and its optimizer), and a Trainer and its optimizer are freed once dropped.

    The Trainers are locals of this function on purpose: each step looks for DeepSpeed's ZeRO
    optimizer on the call stack, and reading a caller's ``f_locals`` there used to snapshot this
    frame's locals into a dict that kept the last Trainer alive."""
    import gc
    import weakref

    model = tiny_gpt2()
    references = []
    for index in range(3):
        trainer = _trainer(STOCK, "momo", tmp_path / str(index), model=model, max_steps=1)
        trainer.train()
        references += [weakref.ref(trainer), weakref.ref(trainer.optimizer)]
        references.append(weakref.ref(hf_optim.hf.unwrap_optimizer(trainer.optimizer)))
        del trainer
    assert not model._forward_hooks and not model._forward_pre_hooks
    gc.collect()
    assert [ref() for ref in references] == [None] * 9


@pytest.mark.parametrize("trainer_cls", [STOCK, hf_optim.Trainer], ids=["stock", "hf_optim"])
@pytest.mark.parametrize("name", NAMES)
def test_every_optim_args_key_wins(name, trainer_cls, tmp_path):
    """Issue 9 item 2: lr, weight_decay, betas and eps from optim_args win over the Trainer's
    arguments; weight decay applies to the decay group only."""
    specs = hf_optim.hf.argument_specs(hf_optim.get_optimizer_class(name))
    wanted = {"lr": 0.02, "weight_decay": 0.3, "betas": (0.7, 0.8), "eps": 1e-5}
    given = {key: value for key, value in wanted.items() if key in specs}
    text = ",".join(
        f"{k}={':'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in given.items()
    )
    base = training_kwargs(name, "")["optim_args"]
    trainer = _trainer(
        trainer_cls,
        name,
        tmp_path,
        optim_args=_joined(base, text),
        weight_decay=0.05,
        adam_beta1=0.85,
        adam_beta2=0.9,
        adam_epsilon=1e-7,
    )
    trainer.create_optimizer()
    decay, no_decay = hf_optim.hf.unwrap_optimizer(trainer.optimizer).param_groups
    for key, value in given.items():
        assert decay[key] == pytest.approx(value), key
        if key != "weight_decay":
            assert no_decay[key] == pytest.approx(value), key
    if "weight_decay" in given:
        assert no_decay["weight_decay"] == 0.0
    assert "lr" in given and "weight_decay" in given


def test_amac_upstream_alias_wins(tmp_path):
    """Issue 9 item 13: AMaC's upstream name wd in optim_args replaces the Trainer's
    weight_decay (it used to fail with "give either 'wd' or 'weight_decay', not both")."""
    trainer = _trainer(STOCK, "amac", tmp_path, optim_args="warmup_steps=1,wd=0.2")
    trainer.create_optimizer()
    decay, no_decay = hf_optim.hf.unwrap_optimizer(trainer.optimizer).param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("name", "optim_args", "message"),
    [
        ("casmo", "c_min=5", "c_min"),
        ("casmo", "granularity=grup", "granularity"),
        ("amac", "warmup_steps=-5", "warmup_steps"),
        ("momo", "beta=1.5", "beta"),
    ],
)
def test_hf_optim_training_arguments_check_values_at_construction(
    name, optim_args, message, tmp_path
):
    """Issue 9 item 13: bad values fail when the arguments are built, not at train()."""
    with pytest.raises(ValueError, match=message):
        hf_optim.TrainingArguments(output_dir=str(tmp_path), optim=name, optim_args=optim_args)


def test_malformed_optim_args_get_hf_optim_message_with_stock_arguments(tmp_path):
    """Issue 9 item 13: transformers' own splitter says "not enough values to unpack"."""
    trainer = _trainer(STOCK, "casmo", tmp_path, optim_args="betas=0.9,0.999")
    with pytest.raises(hf_optim.hf.OptimArgsError, match="not of the form key=value"):
        trainer.create_optimizer()


def test_negative_loss_trainers_warn_about_momo_lower_bound(tmp_path):
    """GRPO-style losses can be negative: Momo's lb=0 then zeroes its step (warned at start)."""

    class GRPOTrainer(STOCK):  # the name is what identifies a policy-gradient Trainer
        pass

    with pytest.warns(UserWarning, match="use_fstar=true"):
        _trainer(GRPOTrainer, "momo", tmp_path).create_optimizer()
    trainer = _trainer(GRPOTrainer, "momo", tmp_path, optim_args="lb=-10")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.create_optimizer()
    assert not [w for w in caught if "lower bound" in str(w.message)]


def _joined(*parts: str | None) -> str:
    return ",".join(part for part in parts if part)


@pytest.mark.parametrize(
    ("name", "own_schedule", "trainer_schedule"),
    [("amac", "", "schedule_owner=trainer"), ("autosgm", "window=cosine", "")],
)
def test_schedule_rule(name, own_schedule, trainer_schedule, tmp_path, caplog):
    """An optimizer running its own schedule learns the run's total steps and the Trainer's
    scheduler becomes constant (logged); with its schedule off the Trainer's scheduler drives."""
    info = hf_optim.get_optimizer_info(name)
    base_args = training_kwargs(name, "")["optim_args"]
    with caplog.at_level(logging.WARNING, logger="hf_optim.hf"):
        trainer = _trainer(
            hf_optim.Trainer,
            name,
            tmp_path,
            lr_scheduler_type="linear",
            optim_args=_joined(base_args, own_schedule),
        )
        trainer.train()
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    assert optimizer.defaults[info.total_steps_argument] == 6
    assert "replaced by a constant one" in caplog.text
    logs = trainer.state.log_history[:6]
    assert len({entry["learning_rate"] for entry in logs}) == 1
    # ... while the optimizer's own schedule moves its effective learning rate.
    effective = {"amac": "optim/effective_lr/group_0", "autosgm": "optim/lr_effective/group_0"}[
        name
    ]
    assert len({entry[effective] for entry in logs}) > 1

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_optim.hf"):
        trainer = _trainer(
            STOCK,
            name,
            tmp_path,
            lr_scheduler_type="linear",
            optim_args=_joined(base_args, trainer_schedule) or None,
        )
        trainer.train()
    assert "the Trainer's 'linear' scheduler drives" in caplog.text
    rates = [entry["learning_rate"] for entry in trainer.state.log_history[:6]]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    for key, value in info.schedule_off:
        assert all(group[key] == value for group in optimizer.param_groups)


def test_schedule_owner_contradiction(tmp_path):
    args = TrainingArguments(
        **training_kwargs(
            "autosgm", str(tmp_path), optim_args="window=cosine,schedule_owner=trainer"
        )
    )
    with pytest.raises(hf_optim.hf.OptimArgsError, match="contradicts window='cosine'"):
        hf_optim.hf.optimizer_kwargs("autosgm", args)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_clipping_warning(name, tmp_path, recwarn):
    """A warning where max_grad_norm distorts the optimizer's statistics, none otherwise."""
    _trainer(STOCK, name, tmp_path, max_grad_norm=0.0).create_optimizer()
    assert not [w for w in recwarn if "max_grad_norm" in str(w.message)]
    trainer = _trainer(STOCK, name, tmp_path, max_grad_norm=1.0)
    if hf_optim.get_optimizer_info(name).clipping_note:
        with pytest.warns(UserWarning, match="max_grad_norm=1.0"):
            trainer.create_optimizer()
    else:
        trainer.create_optimizer()
        assert not [w for w in recwarn if "max_grad_norm" in str(w.message)]


def test_amac_averaged_weights_for_eval_and_save(tmp_path):
    """Evaluation runs on AMaC's averaged weights, save_model and every checkpoint export them
    (save_averaged=true), and training resumes on the training weights."""
    from safetensors.torch import load_file

    optim_args = _joined(training_kwargs("amac", "")["optim_args"], "save_averaged=true")
    trainer = _trainer(
        hf_optim.Trainer,
        "amac",
        tmp_path / "run",
        optim_args=optim_args,
        save_strategy="steps",
        save_steps=6,
    )
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-6"
    averaged = load_file(checkpoint / "averaged" / "model.safetensors")
    trained = load_file(checkpoint / "model.safetensors")
    assert averaged.keys() == trained.keys()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)
    training_weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(training_weights[k], trained[k]) for k in trained)

    seen = {}

    def record(module, args):
        seen.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    handle = trainer.model.register_forward_pre_hook(record)
    trainer.evaluate(eval_dataset=ToyLM(8))
    handle.remove()
    assert all(torch.equal(seen[k], averaged[k]) for k in averaged)

    trainer.save_model(str(tmp_path / "final"))
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(final[k], averaged[k]) for k in averaged)
    hf_optim.hf.unwrap_optimizer(trainer.optimizer).train()
    assert all(torch.equal(trainer.model.state_dict()[k], training_weights[k]) for k in trained)


def test_amac_evaluation_before_a_checkpoint_keeps_resume_bitwise(tmp_path):
    """Evaluating (averaged weights swapped in) right before a checkpoint is saved must neither
    change the training trajectory nor break an exact resume."""
    evaluated = dict(eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3)
    plain = _trainer(hf_optim.Trainer, "amac", tmp_path / "plain")
    plain.train()
    args = TrainingArguments(**training_kwargs("amac", str(tmp_path / "a"), **evaluated))
    full = hf_optim.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=ToyLM(8), eval_dataset=ToyLM(8)
    )
    full.train()
    assert any("eval_loss" in entry for entry in full.state.log_history)
    # The last evaluation (step 6) left the averaged weights in the model, as the Trainer's
    # train()/eval() convention does; train() swaps the training weights back.
    hf_optim.hf.unwrap_optimizer(full.optimizer).train()
    reference = parameters_vector(full.model)
    assert torch.equal(reference, parameters_vector(plain.model))
    resumed = _trainer(hf_optim.Trainer, "amac", tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert torch.equal(parameters_vector(resumed.model), reference)


def test_stock_trainer_with_a_momo_the_user_built(fed_losses, tmp_path):
    """optimizers=(Momo(...), None) with the stock Trainer: the loss still arrives."""
    model = tiny_gpt2()
    overrides = dict(optim="adamw_torch", optim_args=None, max_steps=3)
    args = TrainingArguments(**training_kwargs("momo", str(tmp_path), **overrides))
    optimizer = hf_optim.Momo(model.parameters(), lr=1.0)
    trainer = STOCK(model=model, args=args, train_dataset=ToyLM(8), optimizers=(optimizer, None))
    trainer.train()
    assert len(fed_losses) == 3 and fed_losses == train_losses(trainer)
