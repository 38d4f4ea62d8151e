"""Live: a model's tags arriving much slower than its bundle's sample_interval, said once and counted.

The buffers resample every window onto the model's grid, holding the last sample; tags polled every 5 s for a
model of 1 s samples fill its windows with repeated values (or leave them insufficient) and its scores mean
little. Faster polling is not a problem (the grid takes the latest sample at each point), nor are pushed
tags (they arrive on change): only polled tags slower than SPACING_LIMITS[1] × sample_interval are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from edge_agent.scoring.table import SPACING_LIMITS

log = logging.getLogger(__name__)
CHECK_EVERY = 10.0  # seconds of sample time between checks: a median over a ring's recent rows, not per batch


@dataclass(frozen=True, slots=True)
class SpacingStats:
    """A model's input spacing at the last check, and how often it went far over the bundle's interval."""

    model: str
    expected: float  # the bundle's sample_interval
    spacing: float | None  # the slowest polled input's median spacing (None before there were samples to measure)
    slow: bool  # spacing > SPACING_LIMITS[1] × expected now
    warnings: int  # times it became slow (each time one warning, and one line when it ended)


class SpacingWatch:
    """One model's check: fed each input's median spacing, it logs when the slowest goes far over the interval."""

    def __init__(self, model: str, inputs: tuple[str, ...], sample_interval: float) -> None:
        self.model, self.inputs, self.expected = model, inputs, sample_interval
        self.spacing: float | None = None
        self.slow = False
        self.warnings = 0

    def update(self, spacings: Mapping[str, float]) -> None:
        """Take each polled input's median spacing (Buffers.spacing); warn when it becomes far too slow."""
        if not spacings:
            return
        tag, worst = max(spacings.items(), key=lambda kv: kv[1])
        self.spacing = worst
        slow = worst > SPACING_LIMITS[1] * self.expected
        if slow and not self.slow:
            self.warnings += 1
            log.warning(
                "model %s: %s arrives every %.3gs (median), but the bundle samples every %.3gs: its windows hold "
                "repeated values; poll the model's tags at least every %.3gs",
                self.model,
                tag,
                worst,
                self.expected,
                self.expected,
            )
        elif self.slow and not slow:
            log.info("model %s: its tags arrive every %.3gs or faster again", self.model, worst)
        self.slow = slow

    def stats(self) -> SpacingStats:
        """A snapshot."""
        return SpacingStats(self.model, self.expected, self.spacing, self.slow, self.warnings)
