"""Model, tokenizer, LoRA and data helpers shared by the recipes.

Everything else (argument parsing, logging, checkpoints, metrics) is written out in each
recipe, as in transformers' example scripts. Kept out of the ``hf_optim`` package: it imports
``transformers`` and ``peft`` at module level, which a library import must not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger("hf_optim.recipes")

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
