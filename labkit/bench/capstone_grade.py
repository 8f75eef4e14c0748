"""The grader's side of the capstone (lab 07): recompute the figures, never trust them.

The rubric's recomputations (data/rubrics/lab07.toml) call these with the student's own
definitions, on an engine the grader builds itself (``grader_engine``: a submission's engine
object is not trusted), measuring the baseline and the student's app in the same process:

- ``grade_final(build_final_app, profile)``: the final app's speed-up over the baseline (median
  requests/s over ``GRADER_TRIALS`` trials of the final app and ``GRADER_BASELINE_TRIALS`` of
  the baseline, the slowest and so the costliest to repeat) and the quality gate:
  ``FinalGrade.speed_ok`` needs every answer to agree and the profile's ``SPEEDUP_THRESHOLDS``,
  ``high_ok`` ``HIGH_TIER`` times that. The grade is fair on any machine: both sides run on it.
- ``verify_ledger(record, definitions, profile)``: how many documented steps of a recorded
  ledger (``Ledger.to_record()``) hold when each step's factory, looked up by name in
  ``definitions``, is measured again: the same gate outcome, a throughput within
  ``VERIFY_FACTOR`` of the recorded one (wide: a shared machine's load changes between the two
  runs), and a speed-up that is the recorded throughputs' ratio. A row written or edited by hand
  does not verify, so a forged ledger earns nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from labkit.bench.capstone import (
    SPEEDUP_THRESHOLDS,
    AppFactory,
    baseline_measurement,
    capstone_engine,
    capstone_workload,
    default_engine,
    measure,
    quality_gate,
    speedup_range,
    spread,
)
from labkit.bench.ledger import BASELINE, row_counts
from labkit.engines.base import Engine

VERIFY_FACTOR = 4.0  # a recorded throughput verifies within this factor of its re-measurement
GRADER_TRIALS = {"ci": 2, "full": 3}  # trials of the final app when the grader measures it
GRADER_BASELINE_TRIALS = {"ci": 1, "full": 2}  # trials of the baseline (once per process)
HIGH_TIER = 2.0  # the second speed tier is this multiple of the profile's threshold
_ENGINES: dict[str, Engine] = {}  # profile -> the grader's own engine
_FINALS: dict[tuple, FinalGrade] = {}  # (build_final_app, profile, engine) -> its grade


def grader_engine(profile: str) -> Engine:
    """The grader's own engine for a profile (``capstone_engine(default_engine(profile))``: the
    bundled model in ``ENGINE_DTYPE``), built once per process and warmed up."""
    if profile not in _ENGINES:
        _ENGINES[profile] = capstone_engine(default_engine(profile))
        _ENGINES[profile].warmup()
    return _ENGINES[profile]


@dataclass(frozen=True)
class FinalGrade:
    """The final app against the baseline, measured by ``grade_final``; requests/s medians."""

    implemented: bool
    threshold: float
    baseline_requests_per_s: float = math.nan
    final_requests_per_s: float = math.nan
    speedup: float = 0.0
    speedup_worst: float = 0.0
    quality: str = "not measured"
    quality_ok: bool = False

    @property
    def speed_ok(self) -> bool:
        """Implemented, every answer agrees, and the median speed-up reaches the threshold."""
        return self.implemented and self.quality_ok and self.speedup >= self.threshold

    @property
    def high_ok(self) -> bool:
        """``speed_ok`` at ``HIGH_TIER`` times the threshold."""
        return self.speed_ok and self.speedup >= HIGH_TIER * self.threshold

    def __str__(self) -> str:
        if not self.implemented:
            return "the final app is not implemented"
        return (f"final {self.final_requests_per_s:.3g} req/s vs baseline "
                f"{self.baseline_requests_per_s:.3g} req/s: {self.speedup:.2f}x (worst trials "
                f"{self.speedup_worst:.2f}x; threshold {self.threshold:g}x); answers "
                f"{self.quality}")


def grade_final(build_final_app: AppFactory, profile: str = "ci",
                engine: Engine | None = None) -> FinalGrade:
    """Measure ``build_final_app`` and the baseline on one engine in this process and grade the
    speed-up (module doc). ``engine``: None, the grader's own; the notebook passes its engine
    to preview its grade (against its ledger's baseline). Measured once per factory, profile and
    engine; a final app that raises NotImplementedError is graded as not implemented."""
    eng = engine or grader_engine(profile)
    key = (build_final_app, profile, eng)
    if key in _FINALS:
        return _FINALS[key]
    workload, trials = capstone_workload(profile), GRADER_TRIALS[profile]
    threshold = SPEEDUP_THRESHOLDS[profile]
    try:
        final = measure(build_final_app, eng, workload, trials)
    except NotImplementedError:
        return FinalGrade(False, threshold)
    base = baseline_measurement(eng, workload, GRADER_BASELINE_TRIALS[profile])
    quality = quality_gate(final.answers, base.answers, eng, workload.requests)
    worst, median, _ = speedup_range(base.values("requests_per_s"), final.values("requests_per_s"))
    grade = FinalGrade(True, threshold, spread(base.values("requests_per_s")).median,
                       spread(final.values("requests_per_s")).median, median, worst,
                       str(quality), quality.ok)
    _FINALS[key] = grade
    return grade


def _within(claimed, real: float, factor: float) -> bool:
    """Whether a claimed positive figure is within ``factor`` of the measured one."""
    return isinstance(claimed, int | float) and claimed > 0 and real > 0 \
        and 1 / factor <= claimed / real <= factor


def _median(values) -> float:
    """The median of a recorded list of throughputs; NaN when it is not one."""
    try:
        return spread(values).median
    except (TypeError, ValueError):
        return math.nan


def verify_ledger(record: Mapping, definitions: Mapping[str, object], profile: str = "ci",
                  engine: Engine | None = None, factor: float = VERIFY_FACTOR) -> int:
    """How many counted rows (``row_counts``) of a recorded ledger verify: the row's factory,
    measured again for one trial, gives the recorded gate outcome and a throughput within
    ``factor`` of the recorded median, and the row's speed-up is its median over the ledger
    baseline's (as the ledger computes it). Each figure is checked on its own, so a shared
    machine's drift between the two runs moves one ratio, not a product of them. 0 when the
    ledger is another profile's, or its baseline is not within ``factor`` of the grader's."""
    eng = engine or grader_engine(profile)
    workload = capstone_workload(profile)
    if not isinstance(record, Mapping) or record.get("workload") != workload.name:
        return 0
    rows = [r for r in record.get("rows", []) if isinstance(r, Mapping)]
    base = baseline_measurement(eng, workload, GRADER_BASELINE_TRIALS[profile])
    claimed_base = next((_median(r.get("requests_per_s")) for r in rows
                         if r.get("step") == BASELINE), math.nan)
    if not _within(claimed_base, spread(base.values("requests_per_s")).median, factor):
        return 0
    verified = 0
    for row in rows:
        factory = definitions.get(str(row.get("factory")))
        if not row_counts(row) or not callable(factory):
            continue
        claimed = _median(row.get("requests_per_s"))
        speedup = row.get("speedup")
        if not (isinstance(speedup, int | float)
                and math.isclose(speedup, claimed / claimed_base, rel_tol=1e-6)):
            continue
        m = measure(factory, eng, workload, 1)
        quality = quality_gate(m.answers, base.answers, eng, workload.requests)
        tolerance = row.get("tolerance", 0.0)
        try:
            gate = quality.within(tolerance)
        except ValueError:  # a tolerance the ledger would not have stated
            continue
        verified += (gate == row.get("quality_ok")
                     and _within(claimed, m.trials[0].requests_per_s, factor))
    return verified
