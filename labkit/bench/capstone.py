"""The capstone's (lab 07) workload, trials and quality gate: how an app is measured and judged.

An *app* is anything with ``async complete(request) -> Completion`` and ``async aclose()``
(``App``): the slow ``labkit.serving.baseline.BaselineApp``, an ``InferenceService``, or a
student's own class. A *factory* builds a fresh app from an engine (``AppFactory``); every trial
builds its own, so a cache starts empty and no trial profits from the one before.

- ``capstone_workload(profile)``: a workload with known properties: every distinct question is
  asked several times (repeats a response cache can serve), the requests share the chat
  template's system prompt (a prefix vLLM can cache), ask for mixed lengths, and arrive at once
  (``rate_per_s = inf``: a burst, timed from the burst's start, so a request's wait counts), with
  an end-to-end SLO.
- ``measure(factory, engine, workload, trials)``: ``trials`` open-loop runs, each a ``Trial``
  (requests/s, p99 E2E, goodput at the SLO), and the answers of the first.
- ``spread`` and ``speedup_range``: min / median / max of repeated trials, and the speed-up of
  one set of trials over another as (worst, median, best).
- ``quality_gate(answers, reference, engine)``: do the answers agree with the baseline's? Exactly,
  or (hf) parted at a near-tie (lab 02); on ``capstone_engine``'s batch-invariant vLLM, exactly.

The baseline's trials are measured once per engine in a process (``baseline_measurement``), so
every comparison in a run is against the same ones. The ledger of steps is
``labkit.bench.ledger``, the grader's recomputations ``labkit.bench.capstone_grade``, profiling an
app ``labkit.bench.app_profile``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from labkit.config import BUNDLED_MODEL, by_profile, choose
from labkit.engines.base import Completion, Engine, Request, encode_request
from labkit.engines.counting import CountingEngine
from labkit.metrics import summarize
from labkit.serving.baseline import APP_MAX_TOKENS, BaselineApp

SPEEDUP_THRESHOLDS = {"ci": 1.5, "full": 3.0}  # final over baseline throughput, for full points
DEFAULT_TRIALS = {"ci": 3, "full": 5}  # trials per step in the notebook
ENGINE_DTYPE = "float32"  # answers are compared token by token: batched bf16 parts far more often
BATCH_INVARIANT_ENV = {"VLLM_BATCH_INVARIANT": "1"}  # vLLM's kernels that ignore the batch shape
MAX_TOLERANCE = 0.25  # the largest share of changed answers a ledger step may state it accepts
CI_PROMPTS = ("What does a CPU cache do?", "What is the capital of France?",
              "List three prime numbers.")


class App(Protocol):
    """What the capstone measures: one request in, its Completion out; ``aclose`` at the end."""

    async def complete(self, request: Request) -> Completion:
        """This request's answer, with the engine's token stamps."""

    async def aclose(self) -> None:
        """Release what the app owns (caches, batchers); the engine stays open."""


AppFactory = Callable[[Engine], App]


@dataclass(frozen=True)
class CapstoneWorkload:
    """The requests of one capstone trial and what they are measured against.

    ``rate_per_s``: offered load (requests/s; inf: all at once). ``slo``: per-request limits in
    seconds (``labkit.metrics.SLO_KEYS``). ``baseline_max_tokens``: tokens the baseline app
    generates per request (``BaselineApp(max_tokens=...)``).
    """

    name: str
    requests: tuple[Request, ...]
    rate_per_s: float
    slo: Mapping[str, float]
    baseline_max_tokens: int

    @property
    def distinct(self) -> int:
        """Distinct requests (prompt and length): what an exact response cache must generate."""
        return len({_identity(r) for r in self.requests})

    @property
    def repeats(self) -> int:
        """Requests that repeat an earlier one exactly."""
        return len(self.requests) - self.distinct

    def describe(self) -> str:
        """One paragraph: sizes, repeats, lengths, arrival and SLO, with units."""
        lengths = sorted({r.max_tokens for r in self.requests})
        rate = "all at once" if math.isinf(self.rate_per_s) else f"{self.rate_per_s:g} req/s"
        slo = ", ".join(f"{k.removesuffix('_s')} <= {v:g} s" for k, v in self.slo.items())
        return (f"{self.name}: {len(self.requests)} chat requests, {self.distinct} distinct "
                f"({self.repeats} exact repeats), max_tokens {lengths}, arriving {rate}; "
                f"SLO {slo}; the baseline generates {self.baseline_max_tokens} tokens each")


def _identity(request: Request) -> tuple:
    return (request.prompt, str(request.messages), request.max_tokens, request.temperature)


def capstone_workload(profile: str) -> CapstoneWorkload:
    """The capstone workload of a profile (``ci``: 9 requests over 3 questions, for 2 CPU cores;
    ``full``: 48 over 16, for a GPU). Questions come from data/prompts.jsonl."""
    from labkit.bench.workloads import load_prompts

    choose(profile, ("ci", "full"), "profile")
    short = [r["prompt"] for r in load_prompts() if len(r["prompt"]) <= 60]
    missing = [p for p in CI_PROMPTS if p not in short]
    if missing:
        raise ValueError(f"data/prompts.jsonl lacks the capstone's questions {missing}")
    questions = by_profile(profile, ci=list(CI_PROMPTS), full=short[:16])
    copies = by_profile(profile, ci=3, full=3)
    lengths = by_profile(profile, ci=(4, 8), full=(16, 32, 64))
    requests = tuple(
        Request(messages=[{"role": "user", "content": q}], max_tokens=lengths[i % len(lengths)],
                request_id=f"cap-{c * len(questions) + i}")
        for c in range(copies) for i, q in enumerate(questions))
    return CapstoneWorkload(f"capstone-{profile}", requests, math.inf,
                            {"e2e_s": by_profile(profile, ci=6.0, full=2.0)},
                            by_profile(profile, ci=APP_MAX_TOKENS, full=128))


def default_engine(profile: str) -> str:
    """The engine a profile uses: ``hf`` in ci, ``auto`` in full (vLLM on a GPU, else hf)."""
    return by_profile(profile, ci="hf", full="auto")


def capstone_engine(name: str, model: str = BUNDLED_MODEL, **kwargs) -> Engine:
    """``get_engine(name, model, **kwargs)`` in ``ENGINE_DTYPE``, the engine the capstone measures
    and grades on. vLLM runs in a child process with ``BATCH_INVARIANT_ENV`` (read at import):
    its default kernels depend on the batch shape, so an answer could change with its batch
    (lab 02) and the gate fail a cache that changed nothing; hf's partings get a near-tie check."""
    from labkit.engines import ProcessEngine, get_engine, resolve_engine

    if resolve_engine(name) == "vllm":
        return ProcessEngine("vllm", model, env=BATCH_INVARIANT_ENV, dtype=ENGINE_DTYPE, **kwargs)
    return get_engine(name, model=model, dtype=ENGINE_DTYPE, **kwargs)


# --------------------------------------------------------------------------- trials
@dataclass(frozen=True)
class Trial:
    """One run of the workload through a fresh app. Throughputs in requests/s over the run's
    wall time; ``e2e_p99_s`` in seconds from the burst's start; goodput counts the requests that
    met the SLO; ``engine_requests``: how many requests the engine generated (None: not
    counted), the work a cache or shared generations save even where a batch hides it."""

    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    e2e_p99_s: float
    goodput_requests_per_s: float
    slo_attainment: float
    engine_requests: int | None = None


@dataclass
class Measurement:
    """``trials`` of one factory and the answers of its first trial (by request id)."""

    trials: list[Trial]
    answers: dict[str, Completion] = field(default_factory=dict)

    def values(self, name: str) -> list[float]:
        """One Trial field over every trial (e.g. ``"requests_per_s"``)."""
        return [getattr(t, name) for t in self.trials]


async def run_trial(app: App, workload: CapstoneWorkload,
                    counter: CountingEngine | None = None) -> tuple[Trial, list[Completion]]:
    """Send the workload through ``app`` once (open loop) and summarize it; closes the app.
    ``counter``: the counting engine the app was built on (its requests are the trial's
    ``engine_requests``)."""
    from labkit.bench.loadgen import open_loop

    try:
        result = await open_loop(app.complete, list(workload.requests), workload.rate_per_s)
    finally:
        await app.aclose()
    run = summarize(result.completions, result.duration_s, name=workload.name,
                    slo=dict(workload.slo))
    trial = Trial(result.duration_s, run["requests_per_s"], run["output_tokens_per_s"],
                  run["e2e_s"]["p99"], run["goodput_requests_per_s"], run["slo_attainment"],
                  counter.requests if counter is not None else None)
    return trial, result.completions


def measure(factory: AppFactory, engine: Engine, workload: CapstoneWorkload,
            trials: int) -> Measurement:
    """``trials`` runs of the workload, each through a fresh app ``factory(counting)`` built on
    a ``CountingEngine`` around ``engine`` (so each trial knows its engine requests)."""
    from labkit.bench.loadgen import run_sync

    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")

    async def main() -> Measurement:
        out = Measurement([])
        for i in range(trials):
            counting = CountingEngine(engine)
            trial, completions = await run_trial(factory(counting), workload, counting)
            out.trials.append(trial)
            if i == 0:
                out.answers = {r.request_id: c for r, c in zip(workload.requests, completions)}
        return out

    return run_sync(main())


# --------------------------------------------------------------------------- the baseline
_BASELINES: dict[tuple[Engine, str], Measurement] = {}  # (engine, workload name) -> its trials


def baseline_factory(workload: CapstoneWorkload) -> AppFactory:
    """The factory of the workload's baseline app (``BaselineApp`` at its generation length)."""
    return lambda engine: BaselineApp(engine, workload.baseline_max_tokens)


def remember_baseline(engine: Engine, workload: CapstoneWorkload, m: Measurement) -> None:
    """Keep the baseline's trials on ``engine`` for later comparisons in this process."""
    _BASELINES[(engine, workload.name)] = m


def baseline_measurement(engine: Engine, workload: CapstoneWorkload, trials: int) -> Measurement:
    """The baseline's trials on ``engine``: measured once per engine and workload in a process
    (a ``Ledger`` stores its own), so every comparison in a run uses the same ones."""
    key = (engine, workload.name)
    if key not in _BASELINES:
        _BASELINES[key] = measure(baseline_factory(workload), engine, workload, trials)
    return _BASELINES[key]


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Spread:
    """min, median and max of repeated trials (in the unit of the samples) and how many."""

    min: float
    median: float
    max: float
    n: int

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.min:.3g}-{self.max:.3g}]"


def spread(samples: Sequence[float]) -> Spread:
    """The ``Spread`` of ``samples`` (at least one finite number)."""
    vals = [float(v) for v in samples]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"need at least one sample and only finite ones, got {samples!r}")
    return Spread(min(vals), statistics.median(vals), max(vals), len(vals))


def speedup_range(before: Sequence[float], after: Sequence[float]) -> tuple[float, float, float]:
    """How many times ``after`` exceeds ``before`` (throughputs, higher is better) as
    (worst, median, best): worst = min(after) / max(before), median = median / median,
    best = max(after) / min(before). Worst > 1 means every trial beat every earlier one."""
    b, a = spread(before), spread(after)
    if b.min <= 0:
        raise ValueError(f"throughputs must be > 0, got {list(before)!r}")
    return a.min / b.max, a.median / b.median, a.max / b.min


# --------------------------------------------------------------------------- the quality gate
@dataclass(frozen=True)
class Quality:
    """How many answers agree with the baseline's (exactly or at a near-tie) out of how many;
    ``wrong``: the request ids that do not."""

    agree: int
    total: int
    near_ties: int = 0
    wrong: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The gate: every answer agrees."""
        return self.agree == self.total

    def within(self, tolerance: float) -> bool:
        """The gate with a stated tolerance: at most ``tolerance`` (a fraction of the answers,
        0 to ``MAX_TOLERANCE``) differ from the baseline's (quantization, lab 04)."""
        check_tolerance(tolerance)
        return self.total - self.agree <= math.floor(tolerance * self.total + 1e-9)

    def __str__(self) -> str:
        ties = f", {self.near_ties} at a near-tie" if self.near_ties else ""
        return f"{self.agree}/{self.total} agree{ties}"


def check_tolerance(tolerance: float) -> float:
    """``tolerance`` if it is a share of answers from 0 to ``MAX_TOLERANCE``, else ValueError."""
    if not (isinstance(tolerance, int | float) and 0 <= tolerance <= MAX_TOLERANCE):
        raise ValueError(f"tolerance must be a share of answers from 0 to {MAX_TOLERANCE} "
                         f"(0.1: one answer in ten may change), got {tolerance!r}")
    return float(tolerance)


def quality_gate(answers: Mapping[str, Completion], reference: Mapping[str, Completion],
                 engine: Engine, requests: Sequence[Request]) -> Quality:
    """Compare each request's answer with the baseline's (both by request id).

    An answer agrees if its text is the baseline's, or, on an hf engine, if its tokens part from
    the baseline's only where the two best logits were within ``NEAR_TIE_LOGIT_GAP`` (batching
    reorders floating-point sums; lab 02). A missing answer is wrong.
    """
    agree, ties, wrong = 0, 0, []
    for request in requests:
        got, ref = answers.get(request.request_id), reference[request.request_id]
        if got is not None and got.text == ref.text:
            agree += 1
        elif got is not None and _near_tie(engine, request, ref, got):
            agree, ties = agree + 1, ties + 1
        else:
            wrong.append(request.request_id)
    return Quality(agree, len(requests), ties, tuple(wrong))


def _near_tie(engine: Engine, request: Request, ref: Completion, got: Completion) -> bool:
    """True if the two greedy outputs part at a choice between tokens whose logits were within
    ``NEAR_TIE_LOGIT_GAP`` of the best (an output that ended there chose EOS; one cut short by
    its length chose nothing). Needs the hf engine's model; other engines: False."""
    from labkit.engines.hf import HFEngine

    if not isinstance(engine, HFEngine):
        return False
    import torch

    from labkit.equivalence import NEAR_TIE_LOGIT_GAP, first_difference

    ref_ids, got_ids = list(ref.token_ids), list(got.token_ids)
    step = first_difference(ref_ids, got_ids)
    if step is None:
        return True
    eos = min(engine.eos_ids) if engine.eos_ids else None
    picks = []
    for ids, done in ((ref_ids, ref), (got_ids, got)):
        if step < len(ids):
            picks.append(ids[step])
        elif done.finish_reason == "stop" and eos is not None:
            picks.append(eos)
        else:
            return False  # cut short by max_tokens: no choice was made there
    prompt = encode_request(engine.tokenizer, request)
    with torch.inference_mode():
        tokens = torch.tensor([prompt + ref_ids[:step]], device=engine.model.device)
        logits = engine.model(tokens).logits[0, -1].float()
    best = float(logits.max())
    return all(best - float(logits[p]) <= NEAR_TIE_LOGIT_GAP for p in picks)
