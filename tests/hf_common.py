"""Shared pieces of the Hugging Face integration tests: one tiny GPT-2, a learnable synthetic
dataset, and per-optimizer settings that make a few steps visibly reduce the loss.

Imported by tests/test_hf_*.py and by the scripts those tests launch in fresh processes.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch

VOCAB = 96
SEQ = 16

#: optim_args that let each optimizer make progress within a handful of steps on the toy task
#: (short calibrations and warm-ups; AMaC's noise off so runs are comparable).
OPTIM_ARGS: dict[str, str] = {
    "casmo": "tau_init_steps=2",
    "autosgm": "",
    "amac": "warmup_steps=1",
    "momo": "",
    "momo_adam": "",
}

#: learning rates on the scale each optimizer expects (Momo's lr caps its Polyak step).
LEARNING_RATES: dict[str, float] = {
    "casmo": 1e-2,
    "autosgm": 1e-2,
    "amac": 1e-2,
    "momo": 1.0,
    "momo_adam": 1e-2,
}

NAMES = tuple(OPTIM_ARGS)


def tiny_gpt2(seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


class ToyLM(torch.utils.data.Dataset):
    """Sequences that repeat a short pattern: a causal LM learns them within a few steps."""

    def __init__(self, n: int = 32, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(2, VOCAB - 8, (n, 1), generator=generator)
        self.ids = (starts + torch.arange(SEQ) % 4).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "labels": ids.clone()}


def training_kwargs(name: str, output_dir: str, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        optim=name,
        optim_args=OPTIM_ARGS[name] or None,
        learning_rate=LEARNING_RATES[name],
        per_device_train_batch_size=8,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["ddp_backend"] = "gloo"
    kwargs.update(overrides)
    return kwargs


def train_losses(trainer: Any) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parameters_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def freeze_import_heap() -> None:
    """Move everything allocated so far (torch, transformers, peft...) out of the garbage
    collector's reach. ``Trainer.train()`` runs a full ``gc.collect()`` (Accelerate's
    ``free_memory``), which otherwise walks that whole heap, ~0.4 s per run."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module", autouse=True)
def frozen_import_heap():
    """:func:`freeze_import_heap` for the tests of one module only (imported into a test module,
    pytest uses it there)."""
    freeze_import_heap()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine their
    synchronisation makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- TRL: a tokenizer and a model that need no download ------------------------------------------

CHAR_VOCAB = {"<eos>": 0, "<pad>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}


def char_tokenizer() -> Any:
    """A character-level fast tokenizer over printable ASCII, with eos and pad tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=CHAR_VOCAB, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def tiny_char_gpt2(seed: int = 0) -> Any:
    """A tiny GPT-2 for :func:`char_tokenizer` (context 64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(CHAR_VOCAB),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return GPT2LMHeadModel(config)


def save_tiny_char_model(path: str) -> str:
    """Save :func:`tiny_char_gpt2` and its tokenizer to ``path`` (loadable by name)."""
    tiny_char_gpt2().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def expected_loss_average(losses: list[float], beta: float, bias_correction: bool) -> list[float]:
    """Momo's loss average after each step, from the losses it was given: an exponential
    average that starts at the first loss (or at 0 with bias correction)."""
    averages, average = [], None
    for loss in losses:
        if average is None:
            average = 0.0 if bias_correction else loss
            if not bias_correction:
                averages.append(average)
                continue
        average = beta * average + (1 - beta) * loss
        averages.append(average)
    return averages
