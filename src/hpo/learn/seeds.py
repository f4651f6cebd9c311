"""Seeds: one derivation for workers, trials, finalizer members and benchmarks; no torch."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that depends on every part, so nearby trials get unrelated streams."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] >> 1)
