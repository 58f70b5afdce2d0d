"""CASMO on the noisy instruction task: does its confidence tell wrong-label batches apart?

The CASMO README's mechanism: AGAR, and so the confidence, falls when the gradients are
inconsistent (memorising wrong labels) and rises when they are consistent (generalising). This
script asks that of CASMO on the demo's noisy instruction task (``hf_optim.demo``: answers to
``rev``/``sort`` instructions over short words, 30% of the 2000 training examples given another
example's answer, a clean held-out split), trained through ``hf_optim.Trainer`` with
``optim="casmo"`` and the demo's settings (lr 1e-2, linear schedule with 5% warm-up, weight
decay 0.01, ``max_grad_norm`` 1, ``tau_init_steps`` 5% of the steps, 1000 steps of 64).

Variants (``--variants``):

* ``casmo_sorted``: every batch is all clean or all wrong-label (30% of the batches, in random
  order), so each step's confidence can be compared between the two kinds of batch.
* ``casmo_parameter_sorted``: the same with ``granularity='parameter'`` (one confidence per
  tensor; the reported confidence is their mean over the weight-decay group).
* ``casmo_mixed``: the demo's ordinary shuffled batches (about 30% wrong labels in each); the
  confidence is compared with each batch's wrong-label share.
* ``adamw_sorted``, ``adamw_mixed``: the demo's AdamW on either kind of batches, the
  baselines for the losses.

Reported per run: the loss on clean and on wrong-label training examples (as labelled: a low
loss on the wrong labels is memorisation) and on the clean held-out split, exact match on it;
and for CASMO, after calibration, the mean confidence of the weight-decay group on clean and on
wrong-label batches, their difference, the difference of each wrong-label step from the step
before it, and (mixed batches) the correlation of the confidence with the wrong-label share.

    python scripts/evidence/casmo_instruction.py                 # 3 seeds, about 10 CPU-minutes
    python scripts/evidence/casmo_instruction.py --smoke         # seconds, for the tests
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402

import hf_optim  # noqa: E402
from hf_optim.demo.contenders import get_contender  # noqa: E402
from hf_optim.demo.metrics import answer_budget, exact_match, greedy_answers  # noqa: E402
from hf_optim.demo.run import QUICK, DemoConfig, _build_model  # noqa: E402
from hf_optim.demo.task import CharTokenizer, PadCollator, build_task, encode_example  # noqa: E402

VARIANTS = ("casmo_sorted", "casmo_parameter_sorted", "casmo_mixed", "adamw_sorted",
            "adamw_mixed")


class SortedBatches(torch.utils.data.Sampler):
    """Batches of only clean or only wrong-label examples, in random order, a fresh draw per
    epoch; incomplete batches are dropped, so the share of wrong-label batches is the noise
    rate up to rounding."""

    def __init__(self, noisy: list[bool], batch_size: int, seed: int) -> None:
        self.groups = [torch.tensor([i for i, n in enumerate(noisy) if bool(n) == flag])
                       for flag in (False, True)]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def _batches(self) -> list[torch.Tensor]:
        batches = []
        for group in self.groups:
            shuffled = group[torch.randperm(len(group), generator=self.generator)]
            whole = len(shuffled) // self.batch_size * self.batch_size
            batches += list(shuffled[:whole].split(self.batch_size))
        return [batches[k] for k in torch.randperm(len(batches), generator=self.generator)]

    def __iter__(self):
        for batch in self._batches():
            yield from batch.tolist()

    def __len__(self) -> int:
        return sum(len(group) // self.batch_size * self.batch_size for group in self.groups)


class ShareCollator(PadCollator):
    """The demo's collator; training batches also carry their wrong-label share."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        if "noisy" in features[0]:
            batch["noisy_share"] = torch.tensor(
                sum(feature["noisy"] for feature in features) / len(features))
        return batch


def _trainer_class():
    class RecordingTrainer(hf_optim.Trainer):
        """Records, per optimizer step, the batch's wrong-label share, its loss and the
        confidence the step used (read after the step: CASMO's confidence of step t is the one
        its update applied)."""

        def __init__(self, *args, sampler=None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.sampler = sampler
            self.trace: dict[str, list[float]] = {"share": [], "loss": [], "confidence": []}

        def _get_train_sampler(self, train_dataset=None):
            return self.sampler or super()._get_train_sampler(train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.trace["share"].append(float(inputs.pop("noisy_share")))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.trace["loss"].append(float(loss))
            return loss

    return RecordingTrainer


def _confidence(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    if group.get("granularity") == "parameter":
        values = [optimizer.state[p]["confidence"] for p in group["params"]
                  if "confidence" in optimizer.state.get(p, {})]
        return float(torch.stack(values).float().mean()) if values else float("nan")
    return float(group["confidence"])


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def confidence_summary(trace: dict[str, list[float]], calibration: int) -> dict[str, float]:
    """Confidence after calibration on clean vs wrong-label batches."""
    share = torch.tensor(trace["share"][calibration:], dtype=torch.float64)
    confidence = torch.tensor(trace["confidence"][calibration:], dtype=torch.float64)
    summary = {"mean_confidence": float(confidence.mean()),
               "confidence_share_correlation": _correlation(confidence, share)}
    clean, noisy = share == 0, share == 1
    if clean.any() and noisy.any():
        summary["confidence_clean_batches"] = float(confidence[clean].mean())
        summary["confidence_noisy_batches"] = float(confidence[noisy].mean())
        summary["confidence_noisy_minus_clean"] = (summary["confidence_noisy_batches"]
                                                  - summary["confidence_clean_batches"])
        # A wrong-label step against the step before it (when that one was clean): the
        # confidence's reaction to one batch, free of its slow drift.
        after_clean = noisy[1:] & clean[:-1]
        jumps = confidence[1:][after_clean] - confidence[:-1][after_clean]
        summary["confidence_jump_at_noisy_batch"] = float(jumps.mean())
        summary["confidence_step_to_step_std"] = float(confidence.diff().std())
        losses = torch.tensor(trace["loss"][calibration:], dtype=torch.float64)
        summary["batch_loss_clean"] = float(losses[clean].mean())
        summary["batch_loss_noisy"] = float(losses[noisy].mean())
    return summary


def train_one(variant: str, seed: int, config: DemoConfig) -> dict[str, Any]:
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

    splits = build_task(config.train_size, config.eval_size, config.noise_rate, seed)
    tokenizer = CharTokenizer()
    train = [{**encode_example(tokenizer, e), "noisy": e.noisy} for e in splits.train]
    clean_probe = [e for e in splits.train if not e.noisy][: config.probe_size]
    noisy_probe = [e for e in splits.train if e.noisy][: config.probe_size]
    eval_sets = {name: [encode_example(tokenizer, e) for e in examples] for name, examples in
                 (("clean", splits.eval), ("train_clean", clean_probe),
                  ("train_noisy", noisy_probe))}
    max_length = max(len(f["input_ids"]) for f in train + eval_sets["clean"])

    contender = get_contender("adamw" if variant.startswith("adamw") else "casmo")
    arguments = contender.training_arguments(config.steps)
    if variant == "casmo_parameter_sorted":
        arguments["optim_args"] = f"{arguments['optim_args']},granularity=parameter"
    set_seed(seed)
    model = _build_model(tokenizer, config, max_length)
    args = TrainingArguments(
        output_dir=str(config.output_dir), max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(len(d) for d in eval_sets.values()),
        eval_strategy="steps", eval_steps=config.eval_steps, logging_steps=config.logging_steps,
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, data_seed=seed,
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, **arguments)
    sampler = (SortedBatches([e.noisy for e in splits.train], config.batch_size, seed)
               if variant.endswith("_sorted") else None)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train,
                               eval_dataset=eval_sets, sampler=sampler,
                               data_collator=ShareCollator(tokenizer.pad_token_id, max_length))
    trainer.remove_callback(PrinterCallback)
    is_casmo = variant.startswith("casmo")

    class ConfidenceCallback(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if is_casmo:
                trainer.trace["confidence"].append(_confidence(trainer.optimizer))

    trainer.add_callback(ConfidenceCallback())
    trainer.train()
    final = trainer.evaluate()
    budget = answer_budget(splits.eval)
    predictions = greedy_answers(model, tokenizer, [e.prompt for e in splits.eval], budget)
    memorised = greedy_answers(model, tokenizer, [e.prompt for e in noisy_probe], budget)
    trace = trainer.trace
    assert len(trace["share"]) == config.steps, "one recorded batch per optimizer step"
    result_final = {
        "eval_clean_loss": final["eval_clean_loss"],
        "train_clean_loss": final["eval_train_clean_loss"],
        "train_noisy_loss": final["eval_train_noisy_loss"],
        "exact_match": exact_match(predictions, [e.answer for e in splits.eval]),
        "wrong_labels_memorised": exact_match(memorised, [e.target for e in noisy_probe]),
    }
    by_step: dict[int, dict[str, float]] = {}
    for entry in trainer.state.log_history:  # one entry per evaluation set and step
        for key in ("eval_clean_loss", "eval_train_clean_loss", "eval_train_noisy_loss"):
            if key in entry:
                by_step.setdefault(entry["step"], {"step": entry["step"]})[key] = entry[key]
    curve = [by_step[step] for step in sorted(by_step)]
    result: dict[str, Any] = {"final": result_final, "curve": curve}
    if is_casmo:
        calibration = contender.optim_args(config.steps)["tau_init_steps"]
        result_final.update(confidence_summary(trace, calibration))
        result["calibration_steps"] = calibration
        stride = max(1, config.steps // 500)
        result["trace"] = {"stride": stride,
                           **{key: values[::stride] for key, values in trace.items()}}
    return result


def plot(out: Path, runs: list[dict[str, Any]]) -> Path:
    plt = _evidence.pyplot()

    figure, (trace_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    example = next((r for r in runs if r["variant"] == "casmo_sorted" and "trace" in r), None)
    if example is not None:
        trace, stride = example["trace"], example["trace"]["stride"]
        steps = [i * stride for i in range(len(trace["confidence"]))]
        colours = ["tab:red" if s == 1 else "tab:blue" for s in trace["share"]]
        trace_axis.scatter(steps, trace["confidence"], c=colours, s=4)
        trace_axis.axvline(example["calibration_steps"], color="grey", linestyle=":")
        trace_axis.set(xlabel="step", ylabel="confidence (weight-decay group)",
                       title=f"casmo_sorted seed {example['seed']}: clean (blue) and "
                             "wrong-label (red) batches")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, variant in enumerate(VARIANTS):
        mine = [r for r in runs if r["variant"] == variant]
        for number, run in enumerate(mine):
            steps = [p["step"] for p in run["curve"]]
            style = dict(color=colours[index % len(colours)], alpha=0.8)
            loss_axis.plot(steps, [p["eval_train_noisy_loss"] for p in run["curve"]],
                           label=f"{variant} ({len(mine)} seeds)" if number == 0 else None,
                           **style)
            loss_axis.plot(steps, [p["eval_train_clean_loss"] for p in run["curve"]],
                           linestyle=":", **style)
    loss_axis.set(xlabel="step", ylabel="loss",
                  title="training loss: wrong labels (solid), clean (dotted)")
    loss_axis.legend(fontsize=8)
    return _evidence.save_figure(figure, out / "casmo_instruction.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--out", type=Path, default=Path("results/evidence/casmo_instruction"))
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)
    config = replace(QUICK if args.smoke else DemoConfig(), output_dir=str(args.out / "trainer"))
    if args.smoke:
        config = replace(config, steps=60)
    elif args.steps != config.steps:
        config = replace(config, steps=args.steps)
    _evidence.one_thread()
    fingerprint = {key: getattr(config, key) for key in
                   ("steps", "noise_rate", "train_size", "batch_size", "n_layer", "n_embd")}
    if not args.summarise_only:
        _evidence.run_all(args.out, args.variants, args.seeds,
                          lambda v, s: train_one(v, s, config), config=fingerprint)
    runs = _evidence.load_runs(args.out, fingerprint)
    variants = [v for v in VARIANTS if any(run["variant"] == v for run in runs)]
    table = _evidence.summarise(runs, variants)
    payload = {"claim": "casmo_instruction", "config": fingerprint, "variants": table,
               "machine": _evidence.machine()}
    _evidence.write_summary(args.out, payload)
    plot(args.out, runs)
    print(_evidence.markdown_table(table, [
        "train_clean_loss", "train_noisy_loss", "eval_clean_loss", "exact_match",
        "confidence_clean_batches", "confidence_noisy_batches", "confidence_jump_at_noisy_batch",
        "confidence_share_correlation"]))
    return payload


if __name__ == "__main__":
    main()
