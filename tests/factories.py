"""Test data factories shared by the test modules (the fixtures that use them are in conftest.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from crossinit_cli.store import Library


def random_vectors(seed: int = 0, k: int = 2, width: int = 32, scale: float = 1.0) -> np.ndarray:
    """[k, width] float32 rows drawn from `seed`; scale 5 gives norms ~30, like real learned vectors."""
    return (np.random.default_rng(seed).standard_normal((k, width)) * scale).astype(np.float32)


def stock_alice_and_bob(library: Library, width: int = 32) -> Library:
    """alice (SD 2.x, tagged `fam`, with a start, vectors from seeds 1 and 2) and Bob (SD 1.x, seed 3): the
    library the export and delivery tests start from."""
    from crossinit_cli.store import Identity

    alice = Identity(name="alice", tokens=2, width=width, tags=["fam"], family="sd2")
    library.add(alice, random_vectors(1, width=width), random_vectors(2, width=width))
    library.add(Identity(name="Bob", tokens=2, width=width, family="sd1"), random_vectors(3, width=width))
    return library
