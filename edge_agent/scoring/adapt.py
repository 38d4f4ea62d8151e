"""Opt-in drift adaptation: on windows judged normal, the normalisation's centre follows slow drift, within a bound.

A model calibrated on a few minutes of operation sees the hours after them drift (temperatures,
wear) and alarms on the drift itself. With `models[].adapt` (or `replay --adapt`) the centre each
tag is normalised with moves towards the mean of every window that scored well below the threshold
while no anomaly was open, by an exponentially weighted moving average of rate `rate` per window.
A fault that raises the score is never learnt (its windows are not "well below"), and once any
tag's centre has moved `max_shift` calibrated scales from where calibration put it the adaptation
stops and says so (a log line, the events' `adaptation.stopped`): drift that large calls for a new
calibration, not for more following. The scale is not adapted: a growing spread is what faults look like.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # the config (and with it the driver registry) is not imported to score a CSV
    from edge_agent.config import ModelAdaptation
    from edge_agent.scoring.bundle import Bundle


log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]


class Adapter:
    """The adapted centre of one model's normalisation, and how far it has moved."""

    def __init__(
        self, inputs: Sequence[str], mean: Sequence[float], scale: Sequence[float], spec: ModelAdaptation, model: str
    ) -> None:
        self.inputs = tuple(inputs)
        self.spec = spec
        self.model = model
        self._origin = np.asarray(mean, dtype=np.float64)
        self._scale = np.asarray(scale, dtype=np.float64)
        self.centre = self._origin.copy()
        self.windows = 0  # windows adapted on
        self.shift = 0.0  # the largest |centre − calibrated centre| / calibrated scale over the tags
        self.tag = self.inputs[0]  # the tag with that shift
        self.stopped = False

    def update(
        self, values: npt.NDArray[np.float32], good: npt.NDArray[np.bool_], score: float, threshold: float, open_: bool
    ) -> F64 | None:
        """Learn from one window (window × inputs) if it is judged normal; the new centre, or None if unchanged.

        `score` is the larger of the window's own and the smoothed score, so neither a sudden jump nor
        a slow climb is learnt; NaN (not scored) is never normal.
        """
        if self.stopped or open_ or not score < self.spec.below * threshold:
            return None
        n = good.sum(axis=0)
        if not n.all():  # a tag without a good value in this window keeps its centre
            seen = np.where(good, values, 0.0).sum(axis=0, dtype=np.float64) / np.maximum(n, 1)
            target = np.where(n > 0, seen, self.centre)
        else:
            target = values.mean(axis=0, dtype=np.float64)
        centre = self.centre + self.spec.rate * (target - self.centre)
        moved = np.abs(centre - self._origin) / self._scale
        worst = int(np.argmax(moved))
        if moved[worst] > self.spec.max_shift:
            bound = self.spec.max_shift * self._scale
            centre = np.clip(centre, self._origin - bound, self._origin + bound)
            self.stopped = True
            log.warning(
                "model %s: drift adaptation stopped after %d windows: %s moved %.3g scales from its calibration "
                "(max_shift %g); recalibrate the model on recent normal operation",
                self.model,
                self.windows + 1,
                self.inputs[worst],
                moved[worst],
                self.spec.max_shift,
            )
            moved = np.abs(centre - self._origin) / self._scale
        self.centre = centre
        self.windows += 1
        self.shift, self.tag = float(moved[worst]), self.inputs[worst]
        return centre

    def state(self) -> dict[str, float | int | bool | str]:
        """What an event records: windows adapted, the largest current shift (in scales) and its tag, stopped."""
        return {
            "windows": self.windows,
            "shift": round(self.shift, 6) if math.isfinite(self.shift) else 0.0,
            "tag": self.tag,
            "max_shift": self.spec.max_shift,
            "stopped": self.stopped,
        }


def adapter_for(bundle: Bundle, spec: ModelAdaptation | None, model: str) -> Adapter | None:
    """An adapter starting from the bundle's normalisation, or None when the model does not adapt."""
    if spec is None:
        return None
    norm = bundle.metadata.normalisation
    return Adapter(bundle.metadata.inputs, norm.mean, norm.scale, spec, model)
