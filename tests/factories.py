"""Test data factories shared by the test modules (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import numpy as np


def random_vectors(seed: int = 0, k: int = 2, width: int = 32, scale: float = 1.0) -> np.ndarray:
    """[k, width] float32 rows drawn from `seed`; scale 5 gives norms ~30, like real learned vectors."""
    return (np.random.default_rng(seed).standard_normal((k, width)) * scale).astype(np.float32)
