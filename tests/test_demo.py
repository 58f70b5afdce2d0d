"""The demo (``python -m hf_optim.demo``): its data, its decoding, and a reduced end-to-end run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from hf_optim.demo.cli import main  # noqa: E402
from hf_optim.demo.contenders import DEFAULT_CONTENDERS  # noqa: E402
from hf_optim.demo.metrics import exact_match, greedy_answers  # noqa: E402
from hf_optim.demo.run import QUICK  # noqa: E402
from hf_optim.demo.task import (  # noqa: E402
    INSTRUCTIONS,
    CharTokenizer,
    build_task,
    encode_example,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("noise_rate", [0.0, 0.3, 0.55])
def test_noise_hits_the_requested_share_of_the_training_split_only(noise_rate):
    splits = build_task(train_size=1000, eval_size=300, noise_rate=noise_rate, seed=3)
    assert len(splits.train) == 1000 and len(splits.eval) == 300
    assert splits.noisy_count == round(noise_rate * 1000)
    answers = {example.answer for example in splits.train}
    for example in splits.train:
        assert example.answer == INSTRUCTIONS[example.instruction](example.word)
        assert (example.target != example.answer) == example.noisy
        # a wrong label is another example's answer, so it looks like a real one
        assert example.target in answers
    for example in splits.eval:
        assert not example.noisy and example.target == example.answer
    train_prompts = {example.prompt for example in splits.train}
    assert not train_prompts & {example.prompt for example in splits.eval}


def test_task_is_deterministic_in_its_seed():
    first = build_task(200, 50, 0.3, seed=7)
    assert first == build_task(200, 50, 0.3, seed=7)
    assert first != build_task(200, 50, 0.3, seed=8)


def test_prompt_tokens_are_masked_out_of_the_loss():
    tokenizer = CharTokenizer()
    example = build_task(20, 1, 0.5, seed=0).train[0]
    features = encode_example(tokenizer, example)
    prompt_length = 1 + len(example.prompt)
    assert features["labels"][:prompt_length] == [-100] * prompt_length
    assert features["labels"][prompt_length:] == features["input_ids"][prompt_length:]
    assert tokenizer.decode(features["input_ids"][prompt_length:]) == example.target


def test_padded_greedy_decoding_matches_one_prompt_at_a_time():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    prompts = [example.prompt for example in build_task(1, 12, 0.0, seed=1).eval]
    assert len({len(prompt) for prompt in prompts}) > 1
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=6)
    one_by_one = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt)]])
            start = ids.shape[1]
            for _ in range(6):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            one_by_one.append(tokenizer.decode(ids[0, start:].tolist()))
    assert batched == one_by_one
    assert exact_match(batched, one_by_one) == 1.0
    assert exact_match(["abc", "abd"], ["abc", "abc"]) == 0.5


def test_unknown_optimizer_is_rejected_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        main(["--optimizers", "adamw,not_an_optimizer"])
    assert "adamw" in capsys.readouterr().err


def test_console_entry_lists_the_contenders():
    completed = subprocess.run(
        [sys.executable, "-m", "hf_optim.demo", "--list"],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        check=True,
    )
    for name in DEFAULT_CONTENDERS:
        assert f"| {name} |" in completed.stdout


def test_demo_runs_end_to_end_in_reduced_size(tmp_path, capsys):
    optimizers = list(DEFAULT_CONTENDERS)
    assert (
        main(["--quick", "--optimizers", ",".join(optimizers), "--output-dir", str(tmp_path)]) == 0
    )
    printed = capsys.readouterr().out

    report = json.loads((tmp_path / "results.json").read_text())
    assert report["data"]["noisy_train_examples"] == round(0.3 * QUICK.train_size)
    assert report["data"]["noisy_eval_examples"] == 0
    assert [result["name"] for result in report["results"]] == optimizers
    for result in report["results"]:
        for key in ("eval_loss", "train_clean_loss", "train_noisy_loss", "final_train_loss"):
            assert math.isfinite(result[key]) and result[key] > 0, (result["name"], key)
        assert 0.0 <= result["exact_match"] <= 1.0
        assert 0.0 <= result["noisy_memorized"] <= 1.0
        assert result["time_s"] > 0
        eval_curve = result["curves"]["eval_clean_loss"]
        assert [step for step, _ in eval_curve][0] == 0 and eval_curve[-1][0] == QUICK.steps
        assert all(math.isfinite(value) for _, value in eval_curve)
        assert (tmp_path / "runs" / result["name"] / "log_history.json").is_file()
        assert f"| {result['name']} |" in printed

    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0].startswith("| optimizer |")
    assert len(table.splitlines()) == 2 + len(optimizers)
    png = (tmp_path / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_is_deterministic_in_its_seed(tmp_path):
    runs = []
    for name in ("first", "second"):
        main(["--quick", "--optimizers", "adamw", "--output-dir", str(tmp_path / name)])
        runs.append(json.loads((tmp_path / name / "results.json").read_text())["results"][0])
    for key in ("eval_loss", "exact_match", "train_noisy_loss", "curves"):
        assert runs[0][key] == runs[1][key], key


def test_demo_over_several_seeds_reports_mean_and_spread(tmp_path, capsys):
    assert (
        main(
            [
                "--quick",
                "--optimizers",
                "adamw,momo",
                "--seeds",
                "0,1",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["seeds"] == [0, 1]
    assert [r["config"]["seed"] for r in report["reports"]] == [0, 1]
    assert report["reports"][0]["machine"]["cpu_capability"]
    for row, name in zip(report["summary"], ["adamw", "momo"], strict=True):
        assert row["name"] == name
        em = row["metrics"]["exact_match"]
        per_seed = [
            r["results"][report["summary"].index(row)]["exact_match"] for r in report["reports"]
        ]
        assert em["values"] == per_seed
        assert em["min"] <= em["mean"] <= em["max"]
        assert em["std"] >= 0
    for seed in (0, 1):
        assert (tmp_path / f"seed_{seed}" / "results.json").is_file()
    # different seeds give different data and runs
    losses = row["metrics"]["eval_loss"]["values"]
    assert losses[0] != losses[1]
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("2 seeds (0, 1)") and "| adamw |" in table and "±" in table
    assert "| momo |" in printed
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_implementation_choice_reaches_the_optimizers_and_is_undone(tmp_path, monkeypatch):
    seen = []
    import hf_optim.demo.run as demo_run

    real = demo_run.run_demo

    def spy(contenders, config):
        seen.append(os.environ.get("HF_OPTIM_IMPLEMENTATION"))
        return real(contenders, config)

    monkeypatch.setattr(demo_run, "run_demo", spy)
    monkeypatch.setenv("HF_OPTIM_IMPLEMENTATION", "compiled")
    args = ["--quick", "--steps", "2", "--optimizers", "momo", "--output-dir", str(tmp_path)]
    assert main([*args, "--implementation", "eager"]) == 0
    assert seen == ["eager"] and os.environ["HF_OPTIM_IMPLEMENTATION"] == "compiled"
    with pytest.raises(SystemExit):
        main([*args, "--implementation", "fast"])
