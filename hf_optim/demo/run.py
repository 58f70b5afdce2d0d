"""Train the demo's small GPT-2 once per contender and collect what the report needs."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .contenders import Contender
from .metrics import answer_budget, exact_match, greedy_answers
from .task import CharTokenizer, PadCollator, TaskSplits, build_task, encode_example

__all__ = ["DemoConfig", "QUICK", "run_contender", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines one demo run except the list of optimizers."""

    steps: int = 1000
    noise_rate: float = 0.3
    seed: int = 0
    train_size: int = 2000
    eval_size: int = 512
    #: size of the clean and noisy training subsets scored during training
    probe_size: int = 256
    batch_size: int = 64
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    evaluations: int = 10
    logging_points: int = 50
    threads: int = 1
    output_dir: str = "hf-optim-demo"

    @property
    def eval_steps(self) -> int:
        return max(1, self.steps // self.evaluations)

    @property
    def logging_steps(self) -> int:
        return max(1, self.steps // self.logging_points)


#: the reduced size the test suite runs (a few seconds per optimizer)
QUICK = DemoConfig(
    steps=40, train_size=400, eval_size=64, probe_size=32, batch_size=16, evaluations=2
)


@dataclass
class ContenderResult:
    name: str
    optim: str
    optim_args: str | None
    learning_rate: float
    eval_loss: float
    exact_match: float
    #: loss and greedy agreement on training examples whose label is wrong (memorisation)
    train_noisy_loss: float | None
    noisy_memorized: float | None
    train_clean_loss: float
    final_train_loss: float
    #: wall time and process CPU time of training plus scoring
    time_s: float
    cpu_s: float
    train_runtime_s: float
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    #: the optimizer's live statistics (CASMO's confidence, Momo's step size...) as last logged
    #: by hf_optim.Trainer under ``optim/<key>/group_<i>``
    optimizer_statistics: dict[str, float] = field(default_factory=dict)


def _build_model(tokenizer: CharTokenizer, config: DemoConfig, max_length: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    model_config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=max(32, max_length),
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(model_config)
    # transformers derives the loss from the class name, which "GPT2LMHeadModel" does not
    # match; name it to skip a warning (the loss is the same causal-LM cross-entropy).
    model.loss_type = "ForCausalLM"
    return model


def _trainer_class() -> type:
    # hf_optim.Trainer builds the hf-optim optimizers from ``optim``/``optim_args``, feeds
    # Momo/MomoAdam the loss, tells schedule-owning optimizers the run's length and logs the
    # optimizers' statistics; for ``adamw_torch`` it is the stock Trainer.
    from hf_optim import Trainer

    return Trainer


def _curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Step-indexed series from the Trainer's log history (last value wins per step)."""
    series: dict[str, dict[int, float]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        for key in ("loss", "eval_clean_loss", "eval_train_noisy_loss", "eval_train_clean_loss"):
            if key in entry and isinstance(entry[key], (int, float)):
                series.setdefault(key, {})[step] = float(entry[key])
    return {key: sorted(values.items()) for key, values in series.items()}


def _last_optimizer_statistics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    statistics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("optim/") and isinstance(value, (int, float)):
                statistics[key] = float(value)
    return statistics


def run_contender(
    contender: Contender, splits: TaskSplits, config: DemoConfig, run_dir: Path
) -> ContenderResult:
    """Train a fresh model (same seed, same data order as every other contender) and score it."""
    from transformers import PrinterCallback, TrainingArguments, set_seed

    tokenizer = CharTokenizer()
    train_features = [encode_example(tokenizer, example) for example in splits.train]
    eval_sets = {"clean": [encode_example(tokenizer, example) for example in splits.eval]}
    clean_train = [example for example in splits.train if not example.noisy][: config.probe_size]
    noisy_train = [example for example in splits.train if example.noisy][: config.probe_size]
    eval_sets["train_clean"] = [encode_example(tokenizer, example) for example in clean_train]
    if noisy_train:
        eval_sets["train_noisy"] = [encode_example(tokenizer, example) for example in noisy_train]
    max_length = max(len(f["input_ids"]) for f in train_features + eval_sets["clean"])

    set_seed(config.seed)
    model = _build_model(tokenizer, config, max_length)
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(len(dataset) for dataset in eval_sets.values()),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        eval_on_start=True,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **contender.training_arguments(config.steps),
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=eval_sets,
        data_collator=PadCollator(tokenizer.pad_token_id, max_length),
    )
    trainer.remove_callback(PrinterCallback)

    start, cpu_start = time.perf_counter(), time.process_time()
    train_output = trainer.train()
    final = trainer.evaluate()
    # Optimizers that evaluate other weights than they train on (averaging, Lookahead) swap
    # them in with optimizer.eval(), as the Trainer does around evaluate().
    optimizer_eval = getattr(trainer.optimizer, "eval", None)
    if callable(optimizer_eval):
        optimizer_eval()
    budget = answer_budget(splits.eval)
    predictions = greedy_answers(model, tokenizer, [e.prompt for e in splits.eval], budget)
    noisy_predictions = greedy_answers(model, tokenizer, [e.prompt for e in noisy_train], budget)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    curves = _curves(trainer.state.log_history)
    train_losses = curves.get("loss", [])
    return ContenderResult(
        name=contender.name,
        optim=contender.optim,
        optim_args=contender.resolved_optim_args(config.steps),
        learning_rate=contender.learning_rate,
        eval_loss=final["eval_clean_loss"],
        exact_match=exact_match(predictions, [e.answer for e in splits.eval]),
        train_noisy_loss=final.get("eval_train_noisy_loss"),
        noisy_memorized=(
            exact_match(noisy_predictions, [e.target for e in noisy_train]) if noisy_train else None
        ),
        train_clean_loss=final["eval_train_clean_loss"],
        final_train_loss=train_losses[-1][1] if train_losses else math.nan,
        time_s=elapsed,
        cpu_s=cpu,
        train_runtime_s=float(train_output.metrics["train_runtime"]),
        curves=curves,
        optimizer_statistics=_last_optimizer_statistics(trainer.state.log_history),
    )


def run_demo(
    contenders: list[Contender], config: DemoConfig, *, echo: bool = True
) -> dict[str, Any]:
    """Build the data once, train every contender, write ``results.json``; return the results."""
    torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = build_task(config.train_size, config.eval_size, config.noise_rate, config.seed)
    results = []
    for contender in contenders:
        if echo:
            print(f"training {contender.name} ({config.steps} steps) ...", flush=True)
        result = run_contender(contender, splits, config, output_dir / "runs" / contender.name)
        if echo:
            print(
                f"  {contender.name}: clean-eval loss {result.eval_loss:.3f}, "
                f"exact match {result.exact_match:.1%}, {result.time_s:.1f} s",
                flush=True,
            )
        results.append(result)
    report = {
        "config": asdict(config),
        # The numbers are deterministic for a seed on one kernel path: AVX2 and AVX-512 kernels
        # (ATEN_CPU_CAPABILITY) round differently, and the runs diverge from there.
        "machine": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
        "data": {
            "train_size": len(splits.train),
            "eval_size": len(splits.eval),
            "noise_rate": splits.noise_rate,
            "noisy_train_examples": splits.noisy_count,
            "noisy_eval_examples": sum(example.noisy for example in splits.eval),
        },
        "results": [asdict(result) for result in results],
    }
    (output_dir / "results.json").write_text(json.dumps(report, indent=1))
    return report
