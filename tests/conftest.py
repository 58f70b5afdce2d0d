from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

#: ``../shared/data`` beside the checkout, or HF_OPTIM_DATA.
DATA_DIR = Path(os.environ.get("HF_OPTIM_DATA", REPO_ROOT.parent / "shared" / "data"))
#: where scripts/install_upstream.sh puts the upstream packages that cannot share one venv
UPSTREAM_DIR = Path(os.environ.get("HF_OPTIM_UPSTREAM", REPO_ROOT / ".upstream"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {DATA_DIR} (set HF_OPTIM_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    return UPSTREAM_DIR
