"""Live scoring: each configured model scores windows from the buffers on its own grid and feeds its detector."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edge_agent.buffers import Buffers
from edge_agent.config import CalibrateMode, Config, ModelSection
from edge_agent.errors import ConfigError, ConfigIssue
from edge_agent.scoring.adapt import adapter_for
from edge_agent.scoring.bundle import Bundle, ModelError, load_bundle, save_bundle
from edge_agent.scoring.calibrate import calibrate
from edge_agent.scoring.detector import Detector, WindowScorer
from edge_agent.types import AnomalyEvent, Score

log = logging.getLogger(__name__)
SETTLE = 0.05  # score a grid point this long after it, so the read at that deadline has landed


@dataclass(frozen=True)
class LoadedModel:
    """A config's model section with its bundle, checked against the configured tags."""

    section: ModelSection
    bundle: Bundle  # what scores: the configured bundle, or its startup calibration saved earlier
    calibrate: bool = False  # startup calibration still has to run (on the configured bundle)
    stale: str = ""  # why calibrate.save_to was not reused ('' when it was, or when there is none yet)
    file_sha256: str = ""  # of the configured file (`bundle` may be its saved calibration); '' when it is `bundle`

    @property
    def identity(self) -> tuple[ModelSection, str]:
        """What makes two loads of a model the same model: its config section and its configured file's sha256."""
        return self.section, self.file_sha256 or self.bundle.sha256

    def describe(self) -> str:
        """Which file scores and why: `check` prints it, the agent logs it."""
        c, file = self.section.calibrate, self.section.file
        if c.mode is not CalibrateMode.STARTUP:
            return str(file)
        if not self.calibrate:
            return f"{c.save_to} (the startup calibration of {file} saved earlier)"
        text = f"{file}, calibrated at startup" + (f" and saved to {c.save_to}" if c.save_to else "")
        return text + (f"; not reusing the saved file: {self.stale}" if self.stale else "")


def _saved_calibration(section: ModelSection, base: Bundle) -> tuple[Bundle | None, str]:
    """The bundle at calibrate.save_to if it is a calibration of `base`; otherwise None and why not ('' if absent)."""
    saved = section.calibrate.save_to
    if saved is None or not saved.exists():
        return None, ""
    try:
        copy = load_bundle(saved)
    except ModelError as exc:
        return None, str(exc)
    # a file left by an older model (an upgrade) or by another model must not silently replace the configured one
    made_from = copy.metadata.threshold.base_sha256
    if made_from == base.sha256:
        return copy, ""
    if not made_from:
        return None, f"{saved} does not record which bundle it was calibrated from"
    return None, f"{saved} was calibrated from sha256 {made_from[:12]}…, not from {section.file} ({base.sha256[:12]}…)"


def load_models(cfg: Config) -> list[LoadedModel]:
    """Load and check every configured bundle; a ConfigError names the config line of each problem."""
    tags = {t.name for d in cfg.devices for t in d.tags}
    issues: list[ConfigIssue] = []
    loaded: list[LoadedModel] = []

    def issue(loc: tuple[str | int, ...], message: str) -> None:
        base = cfg.where(*loc)
        issues.append(ConfigIssue(base.source, base.path, message))

    for i, section in enumerate(cfg.models):
        try:
            bundle = load_bundle(section.file)
            configured = bundle.sha256
            needs, stale = section.calibrate.mode is CalibrateMode.STARTUP, ""
            if needs:
                saved, stale = _saved_calibration(section, bundle)
                if saved is not None:
                    bundle, needs = saved, False
            WindowScorer(bundle)  # the runtime must be able to load it, now rather than at the first window
        except ModelError as exc:
            issue(("models", i, "file"), str(exc))
            continue
        meta = bundle.metadata
        missing = [t for t in meta.inputs if t not in tags]
        if missing:
            issue(("models", i, "file"), f"the model reads {', '.join(missing)}, which no device provides")
        if section.inputs is not None and list(section.inputs) != list(meta.inputs):
            issue(("models", i, "inputs"), f"the bundle's inputs are {meta.inputs}, in that order")
        if section.sample_interval is not None and not math.isclose(section.sample_interval, meta.sample_interval):
            issue(("models", i, "sample_interval"), f"the bundle was made for {meta.sample_interval:g}s")
        loaded.append(LoadedModel(section, bundle, needs, stale, configured))
    if issues:
        raise ConfigError(issues)
    return loaded


def retention_needed(models: list[LoadedModel]) -> float:
    """Seconds of history the models need (window, or startup calibration samples), with slack."""
    need = 0.0
    for m in models:
        meta = m.bundle.metadata
        samples = max(
            meta.window, m.section.calibrate.samples if m.section.calibrate.mode is CalibrateMode.STARTUP else 0
        )
        need = max(need, 1.2 * samples * meta.sample_interval + 5.0)
    return need


@dataclass(frozen=True, slots=True)
class MonitorStats:
    """A snapshot of one model's monitor: its state, latest score and counters."""

    model: str
    state: str  # calibrating | insufficient | normal | anomaly
    active: bool  # an anomaly is open
    last_score: float | None
    threshold: float
    windows_scored: int
    windows_insufficient: int
    bundle_sha256: str
    windows_adapted: int = 0  # drift adaptation (models[].adapt): windows its normalisation's centre learnt from
    adapt_shift: float = 0.0  # the largest current move of a tag's centre from its calibration, in calibrated scales
    adapt_stopped: bool = False  # the move reached adapt.max_shift: adaptation stopped


class ModelMonitor:
    """Scores one model's windows on its grid and turns scores into events."""

    def __init__(
        self,
        model: LoadedModel,
        buffers: Buffers,
        emit: Callable[[AnomalyEvent], None],
        *,
        agent: str,
        site: str,
        counter: Iterator[int] | None = None,
        on_score_seconds: Callable[[float], None] | None = None,
        on_score: Callable[[Score], None] | None = None,
    ) -> None:
        self.section = model.section
        self.buffers = buffers
        self.emit = emit
        self.name = model.section.name
        self._agent, self._site = agent, site
        self._counter = counter or itertools.count(1)
        self._install(model.bundle)
        self.windows_scored = 0
        self.windows_insufficient = 0
        self.last_score: float | None = None
        self.score_seconds = 0.0
        self._on_score_seconds = on_score_seconds
        self._on_score = on_score
        self.calibrating = model.calibrate
        if model.stale:
            log.warning("model %s: recalibrating: %s", self.name, model.stale)
        elif model.section.calibrate.mode is CalibrateMode.STARTUP and not model.calibrate:
            log.info("model %s: using %s", self.name, model.describe())

    def stats(self) -> MonitorStats:
        """A snapshot (no I/O)."""
        active = self.detector.active
        if self.calibrating:
            state = "calibrating"
        elif self.detector.insufficient:
            state = "insufficient"
        else:
            state = "anomaly" if active else "normal"
        return MonitorStats(
            model=self.name,
            state=state,
            active=active,
            last_score=self.last_score,
            threshold=self.threshold,
            windows_scored=self.windows_scored,
            windows_insufficient=self.windows_insufficient,
            bundle_sha256=self.bundle.sha256,
            windows_adapted=self.adapter.windows if self.adapter else 0,
            adapt_shift=self.adapter.shift if self.adapter else 0.0,
            adapt_stopped=self.adapter.stopped if self.adapter else False,
        )

    def _install(self, bundle: Bundle) -> None:
        meta, s = bundle.metadata, self.section
        self.bundle = bundle
        self.inputs = tuple(meta.inputs)
        self.interval = meta.sample_interval
        self.hop = s.hop or meta.sample_interval
        self.threshold = meta.threshold.value if s.threshold == "auto" else float(s.threshold)
        self.scorer = WindowScorer(bundle, min_good=s.min_good)
        self.detector = Detector(
            model=s.name,
            model_version=meta.version,
            model_sha256=bundle.sha256,
            inputs=self.inputs,
            threshold=self.threshold,
            exit_ratio=s.hysteresis.exit_ratio if s.hysteresis else meta.detector.exit_ratio,
            min_duration=s.hysteresis.min_duration if s.hysteresis else meta.detector.min_duration,
            smoothing=meta.score.smoothing,
            agent=self._agent,
            site=self._site,
            counter=self._counter,
        )
        # a new bundle (startup calibration, reload) starts adapting afresh from its own normalisation
        self.adapter = adapter_for(bundle, s.adapt, s.name)
        if self.adapter is not None:
            self.detector.adaptation = self.adapter.state

    async def run(self) -> None:
        """Score until cancelled; on cancellation an open anomaly is closed, so every start gets its end."""
        try:
            if self.calibrating:
                await self._calibrate()
            k = math.floor(time.time() / self.hop) + 1
            while True:
                delay = k * self.hop + SETTLE - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self.step(k * self.hop)
                k = max(k + 1, math.floor(time.time() / self.hop))  # after a stall, skip to the present
        finally:
            self.close("shutdown")

    def close(self, reason: str) -> None:
        """End an open anomaly now (reason `shutdown`, or `reconfigured` when the model is replaced or removed)."""
        if not self.detector.active:
            return
        for event in self.detector.close(time.time(), self._latest(), reason):
            self.emit(event)

    def step(self, t_end: float) -> None:
        """Score the window ending at `t_end` and emit what the detector decides."""
        meta = self.bundle.metadata
        started = time.perf_counter()
        w = self.buffers.window(self.inputs, t_end=t_end, interval=self.interval, n_samples=meta.window)
        scores, contrib = self.scorer.score(np.nan_to_num(w.values)[None], w.good[None])
        seconds = time.perf_counter() - started
        self.score_seconds += seconds
        if self._on_score_seconds is not None:
            self._on_score_seconds(seconds)
        raw = float(scores[0])
        was_insufficient = self.detector.insufficient
        values = {t: (None if not w.good[-1, j] else float(w.values[-1, j])) for j, t in enumerate(self.inputs)}
        events = self.detector.update(
            t_end=t_end, window_start=float(w.times[0]), score=raw, contributions=contrib[0], values=values
        )
        # what is reported is what the detector compared with the threshold: the smoothed score
        score = self.detector.last_score
        if self.adapter is not None:
            centre = self.adapter.update(w.values, w.good, max(raw, score), self.threshold, self.detector.active)
            if centre is not None:
                self.scorer.recentre(centre)
        if math.isnan(score):
            self.windows_insufficient += 1
            if not was_insufficient:
                # before the first scored window this is warm-up (the buffers are filling), not a fault
                log.log(
                    logging.INFO if self.windows_scored == 0 else logging.WARNING,
                    "model %s: %s (%.0f%% of the window good, %.0f%% needed); not scoring",
                    self.name,
                    "warming up" if self.windows_scored == 0 else "insufficient data",
                    100 * w.good_fraction,
                    100 * self.section.min_good,
                )
        else:
            self.windows_scored += 1
            self.last_score = score
            if was_insufficient:
                log.info(
                    "model %s: %s; scoring", self.name, "warmed up" if self.windows_scored == 1 else "enough data again"
                )
        if self._on_score is not None:
            shares = {} if math.isnan(score) else dict(zip(self.inputs, map(float, contrib[0]), strict=True))
            self._on_score(
                Score(
                    model=self.name,
                    t_end=t_end,
                    score=None if math.isnan(score) else score,
                    threshold=self.threshold,
                    contributions=shares,  # shares of a score: none while there is no score
                    good_fraction=w.good_fraction,
                )
            )
        for event in events:
            self.emit(event)

    def _latest(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for t in self.inputs:
            latest = self.buffers.latest(t) if t in self.buffers else None
            out[t] = None if latest is None or latest[2] != 0 else latest[1]
        return out

    async def _calibrate(self) -> None:
        c = self.section.calibrate
        log.info(
            "model %s: calibrating on the next %d samples (%.0fs) of operation, assumed normal",
            self.name,
            c.samples,
            c.samples * self.interval,
        )
        await asyncio.sleep(c.samples * self.interval + SETTLE)
        while True:
            t_end = math.floor(time.time() / self.interval) * self.interval
            w = self.buffers.window(self.inputs, t_end=t_end, interval=self.interval, n_samples=c.samples)
            rows = w.good.all(axis=1)
            if rows.mean() >= 0.9:
                break
            log.warning("model %s: only %.0f%% of calibration samples good; waiting", self.name, 100 * rows.mean())
            await asyncio.sleep(c.samples * self.interval / 4)
        data = w.values[rows].astype(np.float64)
        new = await asyncio.to_thread(
            calibrate,
            self.bundle,
            data,
            quantile=c.quantile,
            margin=c.margin,
            source=f"startup, {int(rows.sum())} live samples",
            what="threshold" if c.threshold_only else "all",
            scaling=c.scaling,
            floor=c.threshold_floor,
        )
        if c.save_to:
            save_bundle(new, c.save_to)
        self._install(new)
        self.calibrating = False
        log.info(
            "model %s: calibrated: threshold %.6g%s",
            self.name,
            self.threshold,
            f", saved to {c.save_to}" if c.save_to else "",
        )
