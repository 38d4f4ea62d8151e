"""Warm-up is not a fault: INFO until the first scored window, WARNING for insufficient data after it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge_agent.buffers import Buffers
from edge_agent.config import ModelSection
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.monitor import LoadedModel, ModelMonitor
from edge_agent.types import Score

INT8 = Path(__file__).parents[1] / "fixtures" / "pump-i8.tflite"


class _Raw:
    """A scorer stand-in whose window scores are given: the monitor's logging is under test, not the model."""

    def __init__(self, scores: list[float], n_inputs: int) -> None:
        self.scores, self.n = iter(scores), n_inputs

    def score(self, values: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([next(self.scores)]), np.full((1, self.n), 1.0 / self.n)


def test_warm_up_is_info_and_a_later_gap_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    bundle = load_bundle(INT8)
    buffers = Buffers(retention=60.0, max_samples=1000)
    buffers.register(tuple(bundle.metadata.inputs), 0.2)
    published: list[Score] = []
    monitor = ModelMonitor(
        LoadedModel(ModelSection(name="pump", file=INT8), bundle),
        buffers,
        lambda e: None,
        agent="a",
        site="s",
        on_score=published.append,
    )
    nan = float("nan")
    monitor.scorer = _Raw([nan, nan, 0.1, nan, 0.1], len(monitor.inputs))  # type: ignore[assignment]
    caplog.set_level(logging.INFO, logger="edge_agent.scoring.monitor")
    for k in range(5):
        monitor.step(100.0 + 0.2 * k)
    lines = [(r.levelno, r.getMessage().split(" (")[0].split(";")[0]) for r in caplog.records]
    assert lines == [
        (logging.INFO, "model pump: warming up"),
        (logging.INFO, "model pump: warmed up"),
        (logging.WARNING, "model pump: insufficient data"),
        (logging.INFO, "model pump: enough data again"),
    ]
    # no score, no shares of it: the scores topic carries an empty contributions list then
    assert [bool(p.contributions) for p in published] == [False, False, True, False, True]
