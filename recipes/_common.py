"""Code every recipe shares: arguments, config files, model/LoRA set-up, backend checks, logging,
resuming and the metrics file.

Kept out of the ``hf_optim`` package on purpose: it imports ``transformers``, ``datasets`` and
``peft`` at module level, which a library import must not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import hf_optim  # registers optim="casmo", ... before any TrainingArguments is parsed
except ImportError:  # running from a checkout without installing: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_optim

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger("hf_optim.recipes")

#: name of the file every recipe writes its final metrics to, in ``output_dir``
METRICS_FILE = "metrics.json"
#: one JSON object per Trainer log event (loss, lr, eval results), in ``output_dir``
LOG_HISTORY_FILE = "log_history.jsonl"
#: the text log of the run, in ``output_dir``
TEXT_LOG_FILE = "train.log"

#: ``--model_config`` presets for GPT-2 models trained from scratch (``GPT2Config`` fields).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # test-sized
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
    # CPU-sized, for measured runs on a laptop
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256),
    # nanoGPT's "baby GPT" of config/train_shakespeare_char.py (10.7 M parameters at vocab 65)
    "shakespeare-char": dict(
        n_layer=6,
        n_head=6,
        n_embd=384,
        n_positions=256,
        resid_pdrop=0.2,
        embd_pdrop=0.2,
        attn_pdrop=0.2,
    ),
    # GPT-2 small (124 M parameters at vocab 50257)
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}

#: ``optim`` names of hf-optim, from its registry (the stock transformers names are not checked)
HF_OPTIM_NAMES = frozenset(hf_optim.OPTIMIZERS)
#: hf-optim optimizers whose update needs no statistic across FSDP shards (warned, not refused)
FSDP_TOLERANT = frozenset({"amac"})


@dataclass
class ModelArguments:
    """Which causal LM to train: a pretrained one, or a fresh one built from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained causal LM: a hub name (e.g. gpt2) or a local directory. Leave unset "
            "to train from scratch with --model_config."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "GGUF file inside --model_name_or_path (dequantized on load; needs `gguf`)."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": f"From-scratch model: a preset ({', '.join(MODEL_PRESETS)}), a config.json path, "
            "or a directory/hub name holding one."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Overrides for --model_config, e.g. 'n_layer=4,n_embd=256,resid_pdrop=0.1'."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer: a hub name or local directory (default: --model_name_or_path). "
            "run_clm.py also accepts 'char' (character level, vocabulary built from the data)."
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load a pretrained model in (float32, bfloat16, float16, auto)."
        },
    )


@dataclass
class LoraArguments:
    """LoRA through PEFT; off unless ``--use_lora``."""

    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters instead of all weights."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt, e.g. c_attn (GPT-2) or q_proj v_proj (Llama). Default: "
            "PEFT's choice for the model type; 'all-linear' adapts every linear layer."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full beside the adapters, e.g. lm_head."},
    )


@dataclass
class RunArguments:
    """Recipe behaviour that is neither model nor data."""

    allow_sharded_statistics: bool = field(
        default=False,
        metadata={
            "help": "Run an hf-optim optimizer under FSDP although its cross-tensor statistics are "
            "computed per shard (not yet all-reduced): a warning instead of an error."
        },
    )


# --- arguments and config files ------------------------------------------------------------------


def parse_arguments(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None
) -> tuple[Any, ...]:
    """Parse ``argv`` into ``dataclass_types``. A first argument ending in .yaml/.yml/.json is a
    config file of ``key: value`` pairs; the flags after it override its values."""
    parser = HfArgumentParser(dataclass_types)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_to_argv(load_config_file(argv[0])) + argv[1:]
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe config (YAML or JSON) into a flat dict."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a recipe config must be a mapping of argument names to values")
    return config


def config_to_argv(config: dict[str, Any]) -> list[str]:
    """Command-line form of a config dict (booleans as true/false, lists as several values,
    dicts as JSON)."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            argv.extend(str(item) for item in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def data_files(path: str) -> str | list[str]:
    """``path`` itself, or every file in it (sorted) when it is a directory."""
    folder = Path(path)
    if folder.is_dir():
        files = sorted(
            str(f) for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(f"{path} holds no data files")
        return files
    return path


# --- logging, resuming, metrics -----------------------------------------------------------------


_RECIPE_HANDLERS: list[logging.Handler] = []


def setup_logging(training_args: TrainingArguments) -> None:
    """Log to stderr and to ``output_dir/train.log`` (main process: info; others: warnings)."""
    root = logging.getLogger()
    for handler in _RECIPE_HANDLERS:  # a second run in the same process replaces the first's
        root.removeHandler(handler)
        handler.close()
    _RECIPE_HANDLERS.clear()
    _RECIPE_HANDLERS.append(logging.StreamHandler(sys.stderr))
    if training_args.should_save:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        _RECIPE_HANDLERS.append(logging.FileHandler(Path(training_args.output_dir) / TEXT_LOG_FILE))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in _RECIPE_HANDLERS:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    # The Trainer's own chatter follows --log_level (default: warnings only).
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    logging.captureWarnings(True)


def teardown_logging() -> None:
    """Undo :func:`setup_logging` (for callers that run recipes inside a longer process)."""
    root = logging.getLogger()
    for handler in _RECIPE_HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _RECIPE_HANDLERS.clear()
    logging.captureWarnings(False)
    transformers.utils.logging.disable_propagation()
    transformers.utils.logging.enable_default_handler()


class JsonlLogCallback(TrainerCallback):
    """Append every Trainer log event (train loss, lr, eval metrics) to ``log_history.jsonl``."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / LOG_HISTORY_FILE

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - Trainer API
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, **logs}
            logger.info("step %d: %s", state.global_step, logs)
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record, default=str) + "\n")


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: a path, ``auto`` (the latest one in ``output_dir`` if
    any, else a fresh start) or ``latest`` (the latest one, which must exist)."""
    requested = training_args.resume_from_checkpoint
    if requested in (None, "", "none", "false"):
        return None
    if requested in ("auto", "latest", "true"):
        last = (
            get_last_checkpoint(training_args.output_dir)
            if os.path.isdir(training_args.output_dir)
            else None
        )
        if last is None and requested != "auto":
            raise FileNotFoundError(
                f"--resume_from_checkpoint {requested}: no checkpoint in {training_args.output_dir}"
            )
        if last is not None:
            logger.info("resuming from %s", last)
        return last
    if not os.path.isdir(requested):
        raise FileNotFoundError(f"--resume_from_checkpoint: {requested} is not a directory")
    return requested


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite where it overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def add_perplexities(metrics: dict[str, Any]) -> dict[str, Any]:
    """Add ``*_perplexity`` beside every ``*_loss`` entry."""
    for key, value in list(metrics.items()):
        if key.endswith("_loss") and isinstance(value, (int, float)):
            metrics[key[: -len("_loss")] + "_perplexity"] = perplexity(float(value))
    return metrics


def write_metrics(trainer: Any, metrics: dict[str, Any]) -> Path | None:
    """Write ``metrics.json`` (main process) and return its path."""
    if not trainer.is_world_process_zero():
        return None
    path = Path(trainer.args.output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    logger.info("metrics written to %s", path)
    return path


def run_description(training_args: TrainingArguments, model: torch.nn.Module) -> dict[str, Any]:
    """What was run: optimizer, world size, device and parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "optim_args": training_args.optim_args,
        "learning_rate": training_args.learning_rate,
        "world_size": training_args.world_size,
        "device": str(training_args.device),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_trainable_parameters": trainable,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


# --- trainer class and backend checks -----------------------------------------------------------


def prepare_training_arguments(training_args: TrainingArguments) -> None:
    """Recipe-wide settings: evaluation computes the loss only (the recipes have no
    ``compute_metrics``; without this the Trainer would gather every logit, vocab-sized per
    token, for nothing)."""
    training_args.prediction_loss_only = True


def trainer_class() -> type:
    """``hf_optim.Trainer``: the stock Trainer plus what the hf-optim optimizers need (the
    loss fed to Momo/MomoAdam, averaged over ranks; their own schedules; their statistics
    in the logs). Stock ``optim=`` names train exactly as with ``transformers.Trainer``."""
    return hf_optim.Trainer


def optim_name(training_args: TrainingArguments) -> str:
    return str(getattr(training_args.optim, "value", training_args.optim))


def parse_optim_args_string(optim_args: str | None) -> dict[str, str]:
    """``"a=1, b=x"`` as ``{"a": "1", "b": "x"}`` (values stay strings)."""
    pairs: dict[str, str] = {}
    for item in (optim_args or "").split(","):
        if item.strip():
            key, _, value = item.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def detect_backend(training_args: TrainingArguments) -> str:
    """``deepspeed``, ``fsdp`` or ``ddp_or_single`` for this run."""
    if training_args.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if training_args.fsdp or _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp_or_single"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in {"1", "true", "yes", "on"}


class UnsupportedBackendError(RuntimeError):
    """An optimizer that cannot run correctly under the chosen distributed backend."""


def check_backend(training_args: TrainingArguments, run_args: RunArguments | None = None) -> str:
    """Refuse (raise) or warn at start-up when the optimizer cannot run correctly under the
    backend; return the backend name.

    DeepSpeed ZeRO hands the optimizer one flat partition per parameter group and calls
    ``step()`` once per group, without a loss:

    * refused: CASMO with ``granularity=group`` (its AGAR statistic would cover this rank's
      flat partition only), Momo and MomoAdam (their inner products span all groups, which
      ZeRO never shows one ``step()`` at once, and the loss never reaches them);
    * warned: CASMO ``granularity=parameter``, AutoSGM and AMaC (their per-tensor statistics
      become statistics of the flat partition; AMaC's gradient centralization sees 1-D
      tensors and does nothing).

    FSDP shards every tensor across ranks. CASMO, Momo, MomoAdam and AutoSGM build statistics
    that span tensors or whole tensors from partial sums, and hf-optim does not yet pass a
    process group to ``hf_optim._reduce.finish_sums`` to all-reduce them over the shard group:
    each rank would apply confidences / step sizes / learning rates computed from its own shard,
    which is not the algorithm. Refused unless ``--allow_sharded_statistics`` turns the error
    into a warning. AMaC only warns: its update is elementwise and its gradient centralization
    is per output channel, which FSDP2's row sharding keeps whole; with FSDP1's flat 1-D shards
    the centralization is skipped.
    """
    backend = detect_backend(training_args)
    name = optim_name(training_args)
    if name not in HF_OPTIM_NAMES or backend == "ddp_or_single":
        return backend
    if backend == "deepspeed":
        granularity = parse_optim_args_string(training_args.optim_args).get("granularity", "group")
        if name in ("momo", "momo_adam"):
            raise UnsupportedBackendError(
                f"optim={name} cannot run under DeepSpeed ZeRO: its step size uses inner products "
                "over all parameter groups, but ZeRO calls step() once per group on a flat "
                "partition, and DeepSpeed's own step never passes the loss Momo needs. Use DDP "
                "(recipes/accelerate/multi_gpu.yaml) instead."
            )
        if name == "casmo" and granularity == "group":
            raise UnsupportedBackendError(
                "optim=casmo with granularity=group cannot run under DeepSpeed ZeRO: the group "
                "AGAR statistic would be computed over this rank's flat partition only, so ranks "
                "would disagree. Use DDP, or optim_args='granularity=parameter' (see the warning "
                "it gives)."
            )
        warnings.warn(
            f"optim={name} under DeepSpeed ZeRO: ZeRO passes one flat 1-D partition per group, "
            "so per-tensor statistics (CASMO parameter AGAR, AutoSGM per-layer means, AMaC "
            "gradient centralization) are computed over that partition, not per tensor.",
            RuntimeWarning,
            stacklevel=2,
        )
        return backend
    if name in FSDP_TOLERANT:
        warnings.warn(
            f"optim={name} under FSDP: its update is elementwise and its gradient centralization "
            "per output channel, which FSDP2's row sharding keeps whole; with FSDP1's flat "
            "1-D shards the centralization is skipped.",
            RuntimeWarning,
            stacklevel=2,
        )
        return backend
    message = (
        f"optim={name} under FSDP: hf-optim does not yet all-reduce the partial sums behind its "
        "cross-element statistics (CASMO's AGAR, Momo/MomoAdam inner products, AutoSGM's "
        "means) across shards, so every rank would use statistics of its own shard only."
    )
    if run_args is not None and run_args.allow_sharded_statistics:
        warnings.warn(
            message + " Running anyway (--allow_sharded_statistics).", RuntimeWarning, stacklevel=2
        )
        return backend
    raise UnsupportedBackendError(
        message + " Use DDP (recipes/accelerate/multi_gpu.yaml), or pass "
        "--allow_sharded_statistics true to run with per-shard statistics."
    )


# --- models, tokenizers, LoRA -------------------------------------------------------------------


def load_tokenizer(model_args: ModelArguments) -> Any:
    """The tokenizer named by ``--tokenizer_name_or_path`` (or the model's), with a pad token."""
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source is None:
        raise ValueError("give --tokenizer_name_or_path (or --model_name_or_path)")
    kwargs: dict[str, Any] = {}
    if model_args.gguf_file and source == model_args.model_name_or_path:
        kwargs["gguf_file"] = model_args.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_config(model_args: ModelArguments, *, vocab_size: int, min_positions: int = 0) -> Any:
    """A from-scratch config: a preset or a config file, with overrides and ``vocab_size``."""
    source = model_args.model_config or "gpt2-tiny"
    if source in MODEL_PRESETS:
        config = transformers.GPT2Config(**MODEL_PRESETS[source])
    else:
        config = AutoConfig.from_pretrained(source)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    config.vocab_size = vocab_size
    for positions in ("n_positions", "max_position_embeddings"):
        if hasattr(config, positions) and getattr(config, positions) < min_positions:
            setattr(config, positions, min_positions)
    # Keep bos/eos inside the vocabulary (GPT2Config defaults to 50256).
    for token in ("bos_token_id", "eos_token_id"):
        if getattr(config, token, None) is not None and getattr(config, token) >= vocab_size:
            setattr(config, token, vocab_size - 1)
    return config


def load_model(
    model_args: ModelArguments, *, vocab_size: int, min_positions: int = 0
) -> torch.nn.Module:
    """A pretrained causal LM (``--model_name_or_path``), or a fresh one from a config."""
    if model_args.model_name_or_path:
        kwargs: dict[str, Any] = {}
        if model_args.gguf_file:
            kwargs["gguf_file"] = model_args.gguf_file
        if model_args.dtype:
            kwargs["dtype"] = (
                model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
            )
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
        if model_args.gguf_file and getattr(model, "hf_quantizer", None) is not None:
            # transformers dequantizes GGUF weights into ordinary float tensors on load, but
            # leaves the model marked "quantized", which the Trainer refuses to train.
            model.hf_quantizer.remove_quantization_config(model)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    config = build_config(model_args, vocab_size=vocab_size, min_positions=min_positions)
    return AutoModelForCausalLM.from_config(config)


def apply_lora(model: torch.nn.Module, lora_args: LoraArguments) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters when ``--use_lora`` (else return it unchanged)."""
    if not lora_args.use_lora:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    targets: list[str] | str | None = lora_args.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        modules_to_save=lora_args.lora_modules_to_save,
        # GPT-2 stores its projections as Conv1D (weight transposed).
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA: %d trainable parameters", trainable)
    return model


_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return _SAFE_NAME.sub("_", text).strip("_")


def start_run(
    argument_classes: tuple[type, ...], argv: list[str] | None
) -> tuple[tuple[Any, ...], str]:
    """What every recipe does first: parse the arguments (the last class is the
    TrainingArguments), set up logging, check the distributed backend against the optimizer,
    log the choice and seed everything. Returns the parsed dataclasses and the backend."""
    parsed = parse_arguments(argument_classes, argv)
    training_args = parsed[-1]
    run_args = next((a for a in parsed if isinstance(a, RunArguments)), None)
    setup_logging(training_args)
    prepare_training_arguments(training_args)
    backend = check_backend(training_args, run_args)
    logger.info(
        "optim=%s optim_args=%s backend=%s",
        optim_name(training_args),
        training_args.optim_args,
        backend,
    )
    transformers.set_seed(training_args.seed)
    return parsed, backend
