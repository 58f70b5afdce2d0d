"""The evidence scripts (scripts/evidence/): each smoke mode runs, writes every variant and seed,
finite numbers, a plot, and learns; B2's fast model equals the plain encoder layer."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts" / "evidence"))

PNG = b"\x89PNG\r\n\x1a\n"


def _script(name: str):
    return importlib.import_module(name)


def _check_outputs(out: Path, payload: dict, variants: list[str], seeds: list[int], png: str):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"].keys() == payload["variants"].keys()
    assert sorted(summary["variants"]) == sorted(variants)
    for variant in variants:
        entry = summary["variants"][variant]
        assert sorted(entry["seeds"]) == sorted(seeds), variant
        for key, metric in entry["metrics"].items():
            assert len(metric["values"]) == len(seeds), (variant, key)
            assert all(math.isfinite(v) for v in metric["values"]), (variant, key)
            assert metric["min"] <= metric["mean"] <= metric["max"]
    assert (out / png).read_bytes()[:8] == PNG
    return summary


def test_casmo_b2_fast_model_equals_the_encoder_layer():
    import torch
    import torch.nn.functional as F

    b2 = _script("casmo_b2")
    torch.manual_seed(3)
    model = b2.LastPositionEncoder()
    data = b2.make_data(0.3, 0)
    x, y = data["train_x"][:256], data["train_y"][:256]
    fast, reference = model(x), model.reference_forward(x)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    params = list(model.parameters())
    fast_grads = torch.autograd.grad(F.cross_entropy(fast, y), params)
    reference_grads = torch.autograd.grad(F.cross_entropy(reference, y), params)
    for a, b in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_casmo_b2_data_matches_the_benchmark():
    b2 = _script("casmo_b2")
    data = b2.make_data(0.3, 0)
    assert len(data["train_y"]) == 4704 and len(data["val_y"]) == 4705
    a, b = data["val_x"][:, 0], data["val_x"][:, 1]
    assert bool(((a + b) % 97 == data["val_y"]).all()) and bool((data["val_x"][:, 2] == 97).all())
    wrong = data["train_y"] != data["train_true"]
    assert bool((wrong == data["noisy"]).all())  # a replaced label is never the true class
    assert 0.27 < wrong.float().mean().item() < 0.33


def test_casmo_b2_smoke(tmp_path):
    b2 = _script("casmo_b2")
    variants = ["casmo", "casmo_fixed_floor", "adamw", "casmo_frozen"]
    payload = b2.main(["--smoke", "--seeds", "0", "1", "--variants", *variants,
                       "--out", str(tmp_path)])
    _check_outputs(tmp_path, payload, variants, [0, 1], "casmo_b2.png")
    run = json.loads((tmp_path / "runs" / "casmo__s0.json").read_text())
    confidences = run["confidence_trajectory"]["values"]
    assert all(0.1 - 1e-6 <= c <= 1.0 + 1e-6 for c in confidences)
    frozen = json.loads((tmp_path / "runs" / "casmo_frozen__s0.json").read_text())
    assert frozen["frozen_confidence"] == pytest.approx(run["mean_confidence"])
    losses = [point["train_loss"] for point in run["curve"]]
    assert losses[-1] < losses[0]  # it learns (the noisy training loss falls)


def test_momo_lr_sweep_smoke(tmp_path):
    momo = _script("momo_lr_sweep")
    payload = momo.main(["--smoke", "--seeds", "0", "1", "--out", str(tmp_path)])
    variants = [momo.variant_name(o, lr) for o in momo.OPTIMIZERS for lr in (1e-3, 1e-1, 10.0)]
    summary = _check_outputs(tmp_path, payload, variants, [0, 1], "momo_lr_sweep.png")
    # two epochs are enough to learn the digits well above chance at a good lr
    assert payload["plateaus"]["best_overall"] > 0.5
    assert summary["plateaus"]["optimizers"].keys() == set(momo.OPTIMIZERS)


def test_amac_ablation_smoke(tmp_path):
    amac = _script("amac_ablation")
    variants = ["amac_all", "no_momentum", "no_lookahead", "adamw"]
    payload = amac.main(["--smoke", "--seeds", "0", "1", "--variants", *variants,
                         "--out", str(tmp_path)])
    _check_outputs(tmp_path, payload, variants, [0, 1], "amac_ablation.png")
    assert payload["variants"]["adamw"]["metrics"]["test_acc"]["mean"] > 0.5
    assert payload["delta_test_acc_vs_all_on"]["amac_all"] == 0.0


def test_autosgm_numerator_smoke(tmp_path, data_dir):
    autosgm = _script("autosgm_numerator")
    payload = autosgm.main(["--smoke", "--seeds", "0", "1", "--num-lrc", "0", "3",
                            "--gammas", "0", "0.9", "--out", str(tmp_path),
                            "--data", str(data_dir / "tinyshakespeare" / "input.txt")])
    variants = [autosgm.variant_name(n, g) for g in (0.0, 0.9) for n in (0, 3)]
    _check_outputs(tmp_path, payload, variants, [0, 1], "autosgm_numerator.png")
    # the Adam numerator learns within 30 steps (uniform over 65 characters is 4.17)
    assert payload["variants"]["num_lrc0_gamma0"]["metrics"]["val_loss"]["mean"] < 4.0
    assert set(payload["difference_vs_num_lrc0"]) == {"num_lrc3_gamma0", "num_lrc3_gamma0.9"}


def test_casmo_instruction_sorted_batches_are_pure_and_keep_the_noise_rate():
    script = _script("casmo_instruction")
    noisy = [i % 10 < 3 for i in range(2000)]  # 600 wrong-label examples
    sampler = script.SortedBatches(noisy, batch_size=64, seed=0)
    for _ in range(2):  # a fresh order per epoch, the same composition
        order = list(sampler)
        assert len(order) == len(sampler) == (1400 // 64 + 600 // 64) * 64
        assert len(set(order)) == len(order)
        batches = [order[k:k + 64] for k in range(0, len(order), 64)]
        shares = [sum(noisy[i] for i in batch) / 64 for batch in batches]
        assert set(shares) == {0.0, 1.0}
        assert sum(shares) == 600 // 64


def test_casmo_instruction_smoke(tmp_path):
    script = _script("casmo_instruction")
    variants = ["casmo_sorted", "casmo_mixed", "adamw_sorted"]
    payload = script.main(["--smoke", "--seeds", "0", "--variants", *variants,
                           "--out", str(tmp_path)])
    _check_outputs(tmp_path, payload, variants, [0], "casmo_instruction.png")
    sorted_run = json.loads((tmp_path / "runs" / "casmo_sorted__s0.json").read_text())
    trace = sorted_run["trace"]
    assert set(trace["share"]) == {0.0, 1.0}  # the Trainer consumed the sampler's batches
    assert all(0.1 - 1e-6 <= c <= 1 + 1e-6 for c in trace["confidence"])
    mixed = json.loads((tmp_path / "runs" / "casmo_mixed__s0.json").read_text())
    assert 0 < sum(mixed["trace"]["share"]) / len(mixed["trace"]["share"]) < 1
    final = sorted_run["final"]
    assert final["batch_loss_noisy"] > final["batch_loss_clean"]  # the wrong labels are harder
    curve = sorted_run["curve"]
    assert curve[-1]["eval_train_clean_loss"] < curve[0]["eval_train_clean_loss"]
