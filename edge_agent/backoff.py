"""Reconnect delays shared by every stage that retries a peer (devices, the broker)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Capped exponential delay with jitter: uniform in [d/2, d] where d = min(cap, initial·2^attempt)."""
    d = min(cap, initial * (2 ** min(attempt, 30)))
    return rng.uniform(d / 2, d)
