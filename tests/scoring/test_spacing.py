"""Live: a model's tags arriving far slower than its bundle's sample_interval are said once and counted."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge_agent.buffers import Buffers
from edge_agent.scoring.spacing import SpacingWatch
from edge_agent.types import SampleBatch

TAGS = ("a", "b")


def filled(interval: float, rows: int = 40, *, hold: bool = False) -> Buffers:
    buffers = Buffers(retention=600, max_samples=1000)
    buffers.register(TAGS, interval, hold=hold)
    for i in range(rows):
        buffers.write(SampleBatch("d", 1000.0 + i * interval, TAGS, np.ones(2), np.zeros(2, np.uint8)))
    return buffers


def test_buffers_measure_polled_tags_only() -> None:
    assert filled(0.5).spacing(TAGS) == {"a": 0.5, "b": 0.5}
    assert filled(0.5, rows=2).spacing(TAGS) == {}  # too few samples to tell
    assert filled(0.5, hold=True).spacing(TAGS) == {}  # pushed on change: no spacing to expect
    assert filled(0.5).spacing(("a", "not-registered")) == {"a": 0.5}


def test_slow_tags_warn_once_per_episode_and_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    watch = SpacingWatch("pump", TAGS, 0.2)
    caplog.set_level(logging.INFO, logger="edge_agent.scoring.spacing")
    watch.update(filled(0.2).spacing(TAGS))
    watch.update(filled(0.1).spacing(TAGS))  # faster than the grid: resampled, fine
    assert watch.stats().warnings == 0 and not watch.stats().slow and caplog.records == []
    for _ in range(3):
        watch.update(filled(0.5).spacing(TAGS))
    stats = watch.stats()
    assert stats.slow and stats.warnings == 1 and stats.spacing == 0.5 and stats.expected == 0.2
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        "model pump: a arrives every 0.5s (median), but the bundle samples every 0.2s: its windows hold repeated "
        "values; poll the model's tags at least every 0.2s"
    )
    watch.update(filled(0.2).spacing(TAGS))
    assert (
        not watch.stats().slow
        and caplog.records[-1].getMessage() == "model pump: its tags arrive every 0.2s or faster again"
    )
    watch.update(filled(1.0).spacing(TAGS))
    assert watch.stats().warnings == 2 and len(caplog.records) == 3
