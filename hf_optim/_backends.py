"""Which optimizer runs right under which training backend (FSDP, DeepSpeed ZeRO, ...).

Filled in by the sharded-training work; until then every combination passes the check.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_backend"]


def check_backend(optimizer: Any) -> None:
    """Raise at once when ``optimizer`` runs under a backend it cannot serve correctly."""
    return None
