"""optim= names with the stock TrainingArguments, the CLI, the fallback, import order, and the
typed optim_args schema."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim import OPTIMIZERS
from hf_optim.hf import OptimArgsError, argument_specs, parse_optim_args
from hf_optim.hf._build import optimizer_kwargs
from hf_optim.hf._schema import split_optim_args

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    HfArgumentParser,
    Seq2SeqTrainingArguments,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMES = list(OPTIMIZERS)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_stock_training_arguments_accept_name(name, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim=name)
    assert args.optim == name and args.optim is OptimizerNames(name)
    assert json.loads(args.to_json_string())["optim"] == name
    assert args.to_sanitized_dict()["optim"] == name
    (again,) = HfArgumentParser(TrainingArguments).parse_dict(args.to_dict())
    assert again.optim == name


def test_typo_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as error:
        TrainingArguments(output_dir=str(tmp_path), optim="casm0")
    for name in NAMES:
        assert repr(name) in str(error.value)


def test_command_line_parser(tmp_path, capsys):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "casmo", "--optim_args", "c_min=0.05"]
    )
    assert args.optim == "casmo" and args.optim_args == "c_min=0.05"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "casm0"])
    assert exit_info.value.code == 2
    assert "momo_adam" in capsys.readouterr().err


def test_subclasses_of_training_arguments(tmp_path):
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), optim="momo_adam")
    assert args.optim == "momo_adam"
    args.set_optimizer(name="amac", learning_rate=1e-3)
    assert args.optim == "amac"


def test_registration_is_idempotent():
    import transformers.trainer_optimizer

    before = (len(OptimizerNames), len(transformers.trainer_optimizer._OPTIMIZER_HANDLERS))
    hf_optim.register_hf_optimizers()
    hf_optim.register_hf_optimizers()
    after = (len(OptimizerNames), len(transformers.trainer_optimizer._OPTIMIZER_HANDLERS))
    assert before == after
    assert hf_optim.hf.registration_status() == {"names": "ok", "handlers": "ok", "trainer": "ok"}
    assert transformers.Trainer.create_optimizer._hf_optim_wrapped


def test_missing_internals_give_actionable_error():
    from hf_optim.hf._register import register_handlers, register_names

    fake = types.ModuleType("transformers.training_args")
    with pytest.raises(hf_optim.hf.HFOptimRegistrationError) as error:
        register_names(fake, strict=True)
    message = str(error.value)
    assert "supports transformers >=5.23,<6" in message and "hf_optim.TrainingArguments" in message
    fake.OptimizerNames = OptimizerNames
    with pytest.raises(hf_optim.hf.HFOptimRegistrationError, match="_OPTIMIZER_HANDLERS"):
        register_handlers(fake, strict=True)
    assert register_names(fake, strict=False) is True  # the real Enum: already registered


@pytest.fixture
def unregistered(monkeypatch):
    """OptimizerNames as if registration had never happened."""
    for attr in ("_value2member_map_", "_member_map_"):
        mapping = getattr(OptimizerNames, attr)
        kept = {k: v for k, v in mapping.items() if getattr(v, "value", v) not in OPTIMIZERS}
        monkeypatch.setattr(OptimizerNames, attr, kept)
    monkeypatch.setattr(
        OptimizerNames, "_member_names_", [n for n in OptimizerNames._member_names_ if n in kept]
    )


def test_fallback_needs_no_registration(unregistered, tmp_path):
    with pytest.raises(ValueError):
        TrainingArguments(output_dir=str(tmp_path), optim="casmo")
    args = hf_optim.TrainingArguments(
        output_dir=str(tmp_path), optim="casmo", optim_args="c_min=0.2"
    )
    assert args.optim == "casmo" and not isinstance(args.optim, OptimizerNames)
    assert json.loads(args.to_json_string())["optim"] == "casmo"
    (parsed,) = HfArgumentParser(hf_optim.TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "momo"]
    )
    assert parsed.optim == "momo"
    with pytest.raises(OptimArgsError, match="valid keys for casmo"):
        hf_optim.TrainingArguments(output_dir=str(tmp_path), optim="casmo", optim_args="cmin=1")
    stock = hf_optim.TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch")
    assert stock.optim == OptimizerNames.ADAMW_TORCH

    @dataclasses.dataclass
    class Seq2SeqArgs(hf_optim.hf.OptimNameArgumentsMixin, Seq2SeqTrainingArguments):
        pass

    seq2seq = Seq2SeqArgs(output_dir=str(tmp_path), optim="amac", predict_with_generate=True)
    assert seq2seq.optim == "amac" and seq2seq.predict_with_generate

    from hf_common import ToyLM, tiny_gpt2, train_losses, training_kwargs

    args = hf_optim.TrainingArguments(**training_kwargs("momo", str(tmp_path), max_steps=2))
    trainer = hf_optim.Trainer(model=tiny_gpt2(), args=args, train_dataset=ToyLM(8))
    trainer.train()
    assert type(hf_optim.hf.unwrap_optimizer(trainer.optimizer)) is hf_optim.Momo
    assert len(train_losses(trainer)) == 2


def test_lazy_top_level_exports():
    assert issubclass(hf_optim.Trainer, transformers.Trainer)
    assert issubclass(hf_optim.Trainer, hf_optim.OptimizerTrainerMixin)
    assert issubclass(hf_optim.TrainingArguments, TrainingArguments)
    assert issubclass(hf_optim.OptimizerStatsCallback, transformers.TrainerCallback)
    assert hf_optim.LossFeeder is hf_optim.hf.LossFeeder
    assert hf_optim.register_hf_optimizers is hf_optim.hf.register_hf_optimizers


# -- import order and fresh processes ------------------------------------------------------------

CLI = [
    "--optim",
    "casmo",
    "--optim_args",
    "c_min=0.05, granularity=group",
    "--max_steps",
    "4",
    "--save_steps",
    "4",
]


def test_cli_script_then_fresh_process_load(tmp_path):
    """A script that imports hf_optim before transformers trains with --optim casmo; a second
    process that imports transformers first refuses --optim autosgm until hf_optim is imported,
    then parses it and loads the first one's training_args.bin.

    The first process also checks the import hook: ``import hf_optim`` imports neither
    transformers nor accelerate, a bare ``find_spec`` does not use the hook up, the names,
    handlers and Trainer wrapper appear when transformers really loads, and the hook then
    leaves ``sys.meta_path``."""
    out = tmp_path / "run"
    first = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "hf_cli_train.py"), "--output_dir", str(out)]
        + CLI,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["imported_by_hf_optim"] == []
    assert report["handlers"] and report["trainer_wrapped"] and not report["hook_left"]
    assert report["optim"] == "casmo" and report["optimizer_class"] == "CASMO"
    assert report["c_min"] == 0.05
    assert len(report["losses"]) == 4 and all(math.isfinite(x) for x in report["losses"])

    code = f"""
import contextlib, io, json, sys, torch
from transformers import TrainingArguments, HfArgumentParser
argv = ["--output_dir", "x", "--optim", "autosgm"]
with contextlib.redirect_stderr(io.StringIO()) as refusal:
    try:
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    except SystemExit:
        pass
assert "invalid choice: 'autosgm'" in refusal.getvalue(), refusal.getvalue()
import hf_optim
args = torch.load({str(out / "checkpoint-4" / "training_args.bin")!r}, weights_only=False)
fresh = TrainingArguments(output_dir="x", optim="momo")
(parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
assert all(name in _OPTIMIZER_HANDLERS for name in hf_optim.OPTIMIZERS)
print(json.dumps([args.optim.value, args.optim_args, fresh.optim.value, parsed.optim.value]))
"""
    second = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1]) == [
        "casmo",
        "c_min=0.05, granularity=group",
        "momo",
        "autosgm",
    ]


# -- the typed optim_args schema -----------------------------------------------------------------


def _format(value):
    if isinstance(value, (tuple, list)):
        return ":".join(_format(v) for v in value)
    return "none" if value is None else str(value)


@pytest.mark.parametrize("name", NAMES)
def test_schema_round_trips_every_default(name):
    """Every hyperparameter, written on a command line as its effective default, parses back to
    the same value and type, and building the optimizer from those strings changes nothing."""
    cls = hf_optim.get_optimizer_class(name)
    specs = argument_specs(cls)
    assert specs and "params" not in specs
    reference = cls(torch.nn.Linear(2, 2).parameters())
    pairs = {
        key: value
        for key, value in reference.defaults.items()
        if key in specs and isinstance(value, (bool, int, float, str, tuple, type(None)))
    }
    assert len(pairs) >= 4
    text = ",".join(f"{key}={_format(value)}" for key, value in pairs.items())
    parsed, glue = parse_optim_args(name, text)
    assert glue == {}
    for key, value in pairs.items():
        if value == "none" and parsed[key] is None:  # ``none`` reads as None for ``str | None``
            continue
        assert parsed[key] == value, key
        assert isinstance(parsed[key], (bool, str, tuple)) == isinstance(value, (bool, str, tuple))
    rebuilt = cls(torch.nn.Linear(2, 2).parameters(), **parsed)
    assert rebuilt.defaults == reference.defaults


@pytest.mark.parametrize("name", NAMES)
def test_schema_rejects_unknown_key_and_bad_value(name):
    with pytest.raises(OptimArgsError) as error:
        parse_optim_args(name, "no_such_key=1")
    assert f"valid keys for {name}" in str(error.value) and "lr" in str(error.value)
    with pytest.raises(OptimArgsError, match="bad optim_args value lr"):
        parse_optim_args(name, "lr=fast")


def test_schema_types_and_syntax():
    parsed, glue = parse_optim_args(
        "casmo",
        " c_min = 0.05 , betas=0.9:0.99, tau_init_steps=7, adaptive_c_min=yes, agar_clamp_factor=none,"
        "center=mean",
    )
    assert parsed == {
        "c_min": 0.05,
        "betas": (0.9, 0.99),
        "tau_init_steps": 7,
        "adaptive_c_min": True,
        "agar_clamp_factor": None,
        "center": "mean",
    }
    assert glue == {}
    assert type(parsed["tau_init_steps"]) is int
    with pytest.raises(OptimArgsError, match="key=value"):
        split_optim_args("betas=0.9,0.999")
    with pytest.raises(OptimArgsError, match="bad optim_args value adaptive_c_min"):
        parse_optim_args("casmo", "adaptive_c_min=maybe")
    with pytest.raises(OptimArgsError, match="bad optim_args value tau_init_steps"):
        parse_optim_args("casmo", "tau_init_steps=1.5")
    with pytest.raises(OptimArgsError, match="bad optim_args value betas"):
        parse_optim_args("casmo", "betas=0.9")


def test_glue_options_only_where_they_apply():
    assert parse_optim_args("amac", "schedule_owner=trainer")[1] == {"schedule_owner": "trainer"}
    assert parse_optim_args("amac", "save_averaged=yes")[1] == {"save_averaged": True}
    with pytest.raises(OptimArgsError, match="expected one of"):
        parse_optim_args("autosgm", "schedule_owner=both")
    with pytest.raises(OptimArgsError, match="unknown optim_args key 'schedule_owner'"):
        parse_optim_args("casmo", "schedule_owner=trainer")
    with pytest.raises(OptimArgsError, match="unknown optim_args key 'save_averaged'"):
        parse_optim_args("momo", "save_averaged=true")


def test_training_arguments_mapping(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=3e-3,
        weight_decay=0.1,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
    )
    for name, info in OPTIMIZERS.items():
        mapped, _ = optimizer_kwargs(name, args)
        specs = argument_specs(info.load())
        assert mapped.get("lr") == (3e-3 if "lr" in specs else None)
        if "betas" in specs and "adam_beta1" in info.hf_arguments:
            assert mapped["betas"] == (0.8, 0.95)
        if "eps" in specs and "adam_epsilon" in info.hf_arguments:
            assert mapped["eps"] == 1e-6
        assert set(mapped) <= set(specs)
