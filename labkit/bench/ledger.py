"""The capstone's optimization ledger, and the grader's recomputations of its figures (lab 07).

``Ledger(engine, workload, trials)`` measures the baseline app first; then every
``ledger.step(name, factory, change)`` measures one optimization (``trials`` fresh apps built by
``factory(engine)``) against that baseline, *in the same run on the same machine*, and puts it
through the quality gate; ``ledger.decide(name, "keep" | "revert", why)`` documents the
decision. Each row holds: throughput (requests/s) and p99 E2E (s) and goodput at the SLO
(requests/s) and requests the engine generated per trial, the answers' agreement with the
baseline's, the speed-up over the baseline and over the last kept step as (worst, median, best),
the decision and why.
``frame()`` renders it, ``to_markdown()``/``export(path)`` write it as markdown, and
``to_record()`` is what the notebook records for grading.

A ledger names each step's factory by its function name, so a grader can call it again
(``labkit.bench.capstone_grade``: ``grade_final``, ``verify_ledger``); a row written or edited by
hand does not survive that.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from labkit.bench.capstone import (
    AppFactory,
    CapstoneWorkload,
    Measurement,
    baseline_factory,
    check_tolerance,
    measure,
    quality_gate,
    remember_baseline,
    speedup_range,
    spread,
)
from labkit.engines.base import Engine

DECISIONS = ("keep", "revert")
BASELINE = "baseline"  # the name of the ledger's first row
MIN_WHY_WORDS = 3  # a decision's reason needs at least this many words to count
SAME_SPEED = 0.9  # a step this close to the last kept step's throughput holds its speed


@dataclass
class LedgerRow:
    """One measured step (see the module doc). Throughputs in requests/s, latency in s; the
    speed-ups are ratios of requests/s (``None`` for the baseline's row, and for a step whose
    factory is not implemented yet)."""

    step: str
    change: str
    factory: str
    requests_per_s: list[float] = field(default_factory=list)
    e2e_p99_s: list[float] = field(default_factory=list)
    goodput_requests_per_s: list[float] = field(default_factory=list)
    engine_requests: list[int | None] = field(default_factory=list)
    quality: str = ""
    quality_ok: bool = False
    tolerance: float = 0.0
    speedup: float | None = None
    speedup_worst: float | None = None
    speedup_best: float | None = None
    vs_previous: float | None = None
    vs_previous_worst: float | None = None
    decision: str | None = None
    why: str = ""

    @property
    def measured(self) -> bool:
        return bool(self.requests_per_s)

    @property
    def counted(self) -> bool:
        """A measured step (not the baseline) with a decision and a reason of a few words."""
        return row_counts(dataclasses.asdict(self))


def _median_or_none(values: list) -> float | None:
    """The median of counted values (None when a trial was not counted)."""
    return None if not values or None in values else spread(values).median


def row_counts(row: Mapping) -> bool:
    """Whether a ledger row (as recorded) is a documented, measured step."""
    return (row.get("step") != BASELINE and bool(row.get("requests_per_s"))
            and row.get("decision") in DECISIONS
            and len(str(row.get("why", "")).split()) >= MIN_WHY_WORDS)


class Ledger:
    """The optimization ledger of one run (see the module doc); the baseline is measured here."""

    def __init__(self, engine: Engine, workload: CapstoneWorkload, trials: int,
                 first: Measurement | None = None) -> None:
        """``trials`` per step (>= 1). ``first``: baseline trials already measured on this
        engine and workload (the profiled run, ``profile_app(...).measurement``), counted as the
        baseline's first ones; the rest are measured here."""
        self.engine, self.workload, self.trials = engine, workload, trials
        done = first or Measurement([])
        more = trials - len(done.trials)
        extra = measure(baseline_factory(workload), engine, workload, more) if more > 0 \
            else Measurement([])
        self.baseline = Measurement(done.trials + extra.trials, done.answers or extra.answers)
        remember_baseline(engine, workload, self.baseline)
        self.rows: list[LedgerRow] = []
        self.rows.append(self._row(BASELINE, "the application as given", BASELINE, self.baseline))

    def _row(self, step: str, change: str, factory: str, m: Measurement,
             tolerance: float = 0.0) -> LedgerRow:
        quality = quality_gate(m.answers, self.baseline.answers, self.engine,
                               self.workload.requests)
        stated = f" (tolerance {tolerance:.0%})" if tolerance else ""
        row = LedgerRow(step, change, factory, m.values("requests_per_s"),
                        m.values("e2e_p99_s"), m.values("goodput_requests_per_s"),
                        m.values("engine_requests"), str(quality) + stated,
                        quality.within(tolerance), tolerance)
        if step != BASELINE:
            base = self.baseline.values("requests_per_s")
            prev = self.previous(step).requests_per_s
            row.speedup_worst, row.speedup, row.speedup_best = speedup_range(
                base, row.requests_per_s)
            row.vs_previous_worst, row.vs_previous, _ = speedup_range(prev, row.requests_per_s)
        return row

    def previous(self, step: str) -> LedgerRow:
        """The last step kept before ``step``'s row (the baseline until a step is kept)."""
        names = [r.step for r in self.rows]
        before = self.rows[:names.index(step)] if step in names else self.rows
        return next(r for r in reversed(before) if r.decision == "keep" or r.step == BASELINE)

    def row(self, step: str) -> LedgerRow:
        """The row of ``step``."""
        for r in self.rows:
            if r.step == step:
                return r
        raise KeyError(f"no step {step!r} in the ledger; steps: {[r.step for r in self.rows]}")

    def step(self, step: str, factory: AppFactory, change: str,
             tolerance: float = 0.0) -> LedgerRow:
        """Measure ``factory`` (a function defined with ``def`` at the top of a cell, so the
        grader can call it by name) over the workload; returns its row. ``tolerance``: the share
        of answers the step states it may change (quantization; 0 to ``MAX_TOLERANCE``; the final
        app is graded with none). A factory that raises NotImplementedError gets an unmeasured
        row, so an unfinished notebook still runs. Measuring a step again replaces its row (and
        its decision)."""
        check_tolerance(tolerance)
        if not isinstance(step, str) or not step.strip() or step == BASELINE:
            raise ValueError(f"a step needs a name other than {BASELINE!r}, got {step!r}")
        named = inspect.isfunction(factory) or inspect.isclass(factory)
        name = factory.__qualname__ if named else ""
        if not name.isidentifier():
            raise ValueError(f"a step's factory must be a function defined with def at the top "
                             f"of a cell (the grader calls it by name), got {factory!r}")
        if not str(change).strip():
            raise ValueError(f"step {step!r}: say in a few words what the change is")
        try:
            m = measure(factory, self.engine, self.workload, self.trials)
        except NotImplementedError as exc:
            print(f"step {step!r} is not implemented yet ({exc}): not measured")
            row = LedgerRow(step, change, name)
        else:
            row = self._row(step, change, name, m, tolerance)
        names = [r.step for r in self.rows]
        if step in names:
            self.rows[names.index(step)] = row
        else:
            self.rows.append(row)
        return row

    def decide(self, step: str, decision: str, why: str) -> LedgerRow:
        """Record whether ``step`` is kept or reverted and why (a few words at least). A step
        that failed the quality gate cannot be kept."""
        row = self.row(step)
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; choose one of: "
                             f"{', '.join(DECISIONS)}")
        if not row.measured:
            print(f"step {step!r} was not measured: nothing to decide yet")
            return row
        if len(str(why).split()) < MIN_WHY_WORDS:
            raise ValueError(f"step {step!r}: give the reason in at least {MIN_WHY_WORDS} words, "
                             f"got {why!r}")
        if decision == "keep" and not row.quality_ok:
            raise ValueError(f"step {step!r} failed the quality gate ({row.quality}); a step "
                             "that changes answers cannot be kept: revert or fix it")
        row.decision, row.why = decision, str(why).strip()
        return row

    def decide_by_measurement(self, step: str, reason: str) -> LedgerRow:
        """Keep ``step`` if it passed the quality gate and either its median throughput beats
        the last kept step's, or it holds that throughput within ``SAME_SPEED`` while the engine
        generates fewer requests (less work, hidden by a batch on this device); else revert it.
        The why is ``reason`` (what the change should do) followed by the measured figures."""
        row = self.row(step)
        if not row.measured:
            print(f"step {step!r} was not measured: nothing to decide yet")
            return row
        work, before = _median_or_none(row.engine_requests), \
            _median_or_none(self.previous(step).engine_requests)
        less_work = work is not None and before is not None and work < before
        keep = row.quality_ok and (row.vs_previous > 1 or
                                   (less_work and row.vs_previous >= SAME_SPEED))
        why = (f"{reason}; measured {row.vs_previous:.2f}x the last kept step's throughput "
               f"(median; worst trial {row.vs_previous_worst:.2f}x), answers {row.quality}")
        if work is not None and before is not None:
            why += f", {work:g} engine requests against {before:g}"
        return self.decide(step, "keep" if keep else "revert", why)

    @property
    def counted_steps(self) -> int:
        """Documented, measured steps (``LedgerRow.counted``)."""
        return sum(r.counted for r in self.rows)

    # --- rendering ---------------------------------------------------------------------------
    def table(self) -> list[dict[str, str]]:
        """The ledger as rows of text: medians with [min-max] over trials, units in headers."""
        out = []
        for r in self.rows:
            fmt = (lambda v: str(spread(v)) if v else "not measured")  # noqa: E731
            gain = "" if r.speedup is None else \
                f"{r.speedup:.2f}x [{r.speedup_worst:.2f}-{r.speedup_best:.2f}]"
            out.append({"step": r.step, "change": r.change, "factory": r.factory,
                        "throughput (req/s)": fmt(r.requests_per_s),
                        "p99 E2E (s)": fmt(r.e2e_p99_s),
                        "goodput at SLO (req/s)": fmt(r.goodput_requests_per_s),
                        "engine requests": "" if (w := _median_or_none(r.engine_requests))
                        is None else f"{w:g}",
                        "quality": r.quality or "not measured", "speed-up vs baseline": gain,
                        "decision": r.decision or ("" if r.step == BASELINE else "undecided"),
                        "why": r.why})
        return out

    def frame(self):
        """The ledger as a pandas DataFrame indexed by step (``table``)."""
        import pandas as pd

        return pd.DataFrame(self.table()).set_index("step")

    def to_markdown(self) -> str:
        """The ledger as a markdown document: the workload, the trials, then the table."""
        rows = self.table()
        head = list(rows[0])
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = [f"# Optimization ledger ({self.workload.name})", "",
                 self.workload.describe() + f". {self.trials} trial(s) per step, each on a "
                 "fresh app; figures are median [min-max] over trials; speed-ups are "
                 "(worst-best) ratios of requests/s against the baseline of this run.", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cell(r[h]) for h in head) + " |" for r in rows]
        return "\n".join(lines) + "\n"

    def export(self, path: str | Path) -> Path:
        """Write ``to_markdown()`` to ``path`` (folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_markdown())
        return path

    def to_record(self) -> dict:
        """What the notebook records: the workload's name, trials, every row, counted steps."""
        return {"workload": self.workload.name, "trials": self.trials,
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "counted_steps": self.counted_steps}
