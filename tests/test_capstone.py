"""The capstone (lab 07): its statistics, quality gate, ledger and the grader's recomputations.

The unit tests run on ``tests/fakes.FakeEngine`` (a few milliseconds per decode step), so they
load no model. The slow test grades one batch of five submissions of the real notebook end to
end: the reference solution, the untouched student version, a fast but wrong solution, a forged
ledger and a solution that raises midway.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import nbformat
import pandas as pd
import pytest
from fakes import FakeEngine
from nbformat.v4 import new_code_cell

from labkit.bench.app_profile import profile_app
from labkit.bench.capstone import (
    Quality,
    baseline_factory,
    capstone_workload,
    measure,
    quality_gate,
    speedup_range,
    spread,
)
from labkit.bench.capstone_grade import grade_final, verify_ledger
from labkit.bench.ledger import Ledger
from labkit.config import NOTEBOOKS_DIR
from labkit.engines.base import Request
from labkit.serving.baseline import BaselineApp, cut_to_request
from labkit.serving.cache import AsyncResponseCache
from labkit.serving.service import InferenceService

WORDS = " ".join(f"w{i}" for i in range(16))  # the fake engine's reply: 16 one-word tokens


class WordTokenizer:
    """One token per word; decodes the fake engine's token ids (positions in ``WORDS``)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(range(len(text.split())))}

    def apply_chat_template(self, messages, **kwargs) -> list[int]:
        return self(" ".join(m["content"] for m in messages))["input_ids"]

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(f"w{i}" for i in ids)


def fake_engine(step_s: float = 0.005) -> FakeEngine:
    return FakeEngine(reply=WORDS, step_s=step_s, delay_s=0.005, tokenizer=WordTokenizer())


WORKLOAD = capstone_workload("ci")
N = len(WORKLOAD.requests)


class ExactLength(BaselineApp):
    def render(self, request: Request) -> Request:
        return request


def exact_length(engine):
    return ExactLength(engine)


def served(engine):
    return InferenceService(engine, AsyncResponseCache(engine.model_name, "lru"),
                            max_batch_size=8, max_wait_ms=5)


class TwoTokens(InferenceService):
    async def complete(self, request):
        return await super().complete(dataclasses.replace(request, max_tokens=2))


def two_tokens(engine):
    return TwoTokens(engine, AsyncResponseCache(engine.model_name, "lru"), max_wait_ms=5)


def unfinished(engine):
    raise NotImplementedError("Exercise: implement unfinished()")


# --------------------------------------------------------------------------- the engine
def test_the_capstone_runs_vllm_batch_invariant_in_its_own_process(monkeypatch):
    """The gate compares answers token by token, so vLLM runs with its batch-invariant kernels,
    set in a child's environment before vLLM is imported there; hf runs here in fp32."""
    import labkit.engines
    from labkit.bench import capstone

    built: list[tuple] = []
    monkeypatch.setattr(labkit.engines, "ProcessEngine",
                        lambda *args, **kwargs: built.append(("process", args, kwargs)))
    monkeypatch.setattr(labkit.engines, "get_engine",
                        lambda *args, **kwargs: built.append(("here", args, kwargs)))
    capstone.capstone_engine("vllm", enable_prefix_caching=True)
    capstone.capstone_engine("hf")
    assert built == [
        ("process", ("vllm", "smollm2-135m"), {"env": {"VLLM_BATCH_INVARIANT": "1"},
                                              "dtype": "float32", "enable_prefix_caching": True}),
        ("here", ("hf",), {"model": "smollm2-135m", "dtype": "float32"})]


# --------------------------------------------------------------------------- statistics
def test_spread_is_min_median_max_of_the_trials():
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s.min, s.median, s.max, s.n) == (1.0, 2.5, 10.0, 4)
    assert str(spread([2.0])) == "2 [2-2]"


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [math.inf]])
def test_spread_refuses_no_or_undefined_samples(bad):
    with pytest.raises(ValueError, match="at least one sample and only finite ones"):
        spread(bad)


def test_speedup_range_is_worst_median_best():
    worst, median, best = speedup_range([1.0, 2.0, 4.0], [6.0, 8.0, 12.0])
    assert (worst, median, best) == (6.0 / 4.0, 8.0 / 2.0, 12.0 / 1.0)
    with pytest.raises(ValueError, match="throughputs must be > 0"):
        speedup_range([0.0], [1.0])


# --------------------------------------------------------------------------- workload and baseline
def test_ci_workload_has_repeats_mixed_lengths_a_burst_and_an_slo():
    assert len(WORKLOAD.requests) == 9 and WORKLOAD.distinct == 3 and WORKLOAD.repeats == 6
    assert {r.max_tokens for r in WORKLOAD.requests} == {4, 8}
    assert math.isinf(WORKLOAD.rate_per_s) and set(WORKLOAD.slo) == {"e2e_s"}
    assert WORKLOAD.baseline_max_tokens > max(r.max_tokens for r in WORKLOAD.requests)
    assert len({r.request_id for r in WORKLOAD.requests}) == 9
    with pytest.raises(ValueError, match="unknown profile 'gpu'; choose one of: ci, full"):
        capstone_workload("gpu")


def test_baseline_answer_is_cut_to_the_callers_max_tokens():
    engine = fake_engine()
    long = engine.generate([Request(prompt="q", max_tokens=12)])[0]
    cut = cut_to_request(long, Request(prompt="q", max_tokens=3), engine.tokenizer)
    assert (cut.text, cut.token_ids, cut.finish_reason) == ("w0 w1 w2", [0, 1, 2], "length")
    assert cut.token_times_s == long.token_times_s[:3]
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        BaselineApp(engine, max_tokens=0)


# --------------------------------------------------------------------------- quality gate
def test_quality_gate_counts_answers_that_differ_or_are_missing():
    engine = fake_engine()
    requests = [Request(prompt="q", max_tokens=n, request_id=f"r{n}") for n in (3, 4, 5)]
    ref = {r.request_id: c for r, c in zip(requests, engine.generate(requests))}
    same = quality_gate(ref, ref, engine, requests)
    assert same == Quality(3, 3) and same.ok and str(same) == "3/3 agree"
    shorter = engine.generate([dataclasses.replace(requests[0], max_tokens=2)])[0]
    got = {"r3": shorter, "r4": ref["r4"]}
    gate = quality_gate(got, ref, engine, requests)
    assert (gate.agree, gate.ok, gate.wrong) == (1, False, ("r3", "r5"))


def test_a_stated_tolerance_lets_that_share_of_answers_change():
    one_wrong = Quality(8, 9, wrong=("r1",))
    assert not one_wrong.ok and not one_wrong.within(0.1) and one_wrong.within(0.12)
    assert Quality(9, 9).within(0.0)
    with pytest.raises(ValueError, match="got -0.1"):
        one_wrong.within(-0.1)


# --------------------------------------------------------------------------- the ledger
@pytest.fixture(scope="module")
def ledger() -> Ledger:
    """Baseline and four steps on the fake engine: two honest ones, one that changes answers,
    one not implemented yet."""
    led = Ledger(fake_engine(), WORKLOAD, trials=2)
    led.step("lengths", exact_length, "ask for the caller's max_tokens")
    led.decide("lengths", "keep", "fewer decode steps per request")
    led.step("service", served, "InferenceService with a cache")
    led.decide_by_measurement("service", "batching and a cache")
    led.step("short", two_tokens, "two tokens per answer")
    led.decide_by_measurement("short", "fewer tokens")
    led.step("todo", unfinished, "not written yet")
    return led


def test_ledger_measures_every_step_against_the_baseline_of_the_run(ledger):
    base, lengths, service = (ledger.row(s) for s in ("baseline", "lengths", "service"))
    assert len(base.requests_per_s) == 2 and base.speedup is None and base.quality_ok
    assert lengths.quality == f"{N}/{N} agree" and lengths.speedup > 1.1
    assert service.quality_ok and service.speedup > lengths.speedup and service.decision == "keep"
    assert service.vs_previous == pytest.approx(
        spread(service.requests_per_s).median / spread(lengths.requests_per_s).median)
    assert service.speedup_worst <= service.speedup <= service.speedup_best


def test_a_step_that_changes_answers_fails_the_gate_and_cannot_be_kept(ledger):
    short = ledger.row("short")
    assert (short.quality, short.quality_ok, short.decision) == (f"0/{N} agree", False, "revert")
    with pytest.raises(ValueError, match="failed the quality gate .* cannot be kept"):
        ledger.decide("short", "keep", "it is the fastest one")


def test_an_unimplemented_step_is_listed_unmeasured_and_not_counted(ledger, capsys):
    todo = ledger.row("todo")
    assert not todo.measured and todo.speedup is None and not todo.counted
    ledger.decide_by_measurement("todo", "not yet")
    assert "was not measured" in capsys.readouterr().out
    assert ledger.counted_steps == 3


@pytest.mark.parametrize("call, message", [
    (lambda led: led.decide("lengths", "maybe", "some words here"),
     "unknown decision 'maybe'; choose one of: keep, revert"),
    (lambda led: led.decide("lengths", "keep", "faster"), "at least 3 words"),
    (lambda led: led.step("x", lambda engine: served(engine), "a lambda"),
     "must be a function defined with def"),
    (lambda led: led.step("baseline", served, "again"), "a name other than 'baseline'"),
    (lambda led: led.row("nope"), "no step 'nope' in the ledger"),
    (lambda led: led.step("q", served, "int8", tolerance=0.5),
     "tolerance must be a share of answers from 0 to 0.25"),
])
def test_ledger_refuses_bad_input_naming_it(ledger, call, message):
    with pytest.raises((ValueError, KeyError), match=message):
        call(ledger)


def test_ledger_renders_exports_and_records_every_step(ledger, tmp_path):
    frame = ledger.frame()
    assert list(frame.index) == ["baseline", "lengths", "service", "short", "todo"]
    assert frame.loc["todo", "throughput (req/s)"] == "not measured"
    text = ledger.export(tmp_path / "sub" / "ledger.md").read_text()
    assert text.startswith("# Optimization ledger (capstone-ci)")
    assert text.count("\n| ") == 6 and "| short | two tokens per answer | two_tokens |" in text
    record = json.loads(json.dumps(ledger.to_record()))
    assert record["counted_steps"] == 3 and record["workload"] == "capstone-ci"
    assert [r["factory"] for r in record["rows"]] == ["baseline", "exact_length", "served",
                                                      "two_tokens", "unfinished"]


def batched(engine):
    return InferenceService(engine, None, max_batch_size=16, max_wait_ms=5)


def test_a_step_as_fast_with_less_engine_work_is_kept():
    """The fake engine's batch step costs the same for 3 rows or 9, like a CPU batch that is not
    full: a cache in front saves engine work without a visible speed-up, and is kept for it."""
    engine = fake_engine(step_s=0.03)  # the baseline's trials given: this test is the decision
    led = Ledger(engine, WORKLOAD, trials=5, first=measure(batched, engine, WORKLOAD, 5))
    led.step("batch", batched, "batching")
    led.decide("batch", "keep", "many requests in one call")
    row = led.step("cache", served, "a cache in front")
    led.decide_by_measurement("cache", "repeats are hits")
    assert led.row("batch").engine_requests == [N] * 5 and row.engine_requests == [3] * 5
    assert row.decision == "keep" and "3 engine requests against 9" in row.why


def test_measuring_a_step_again_replaces_its_row():
    led = Ledger(fake_engine(), WORKLOAD, trials=1)
    led.step("lengths", exact_length, "first try")
    led.step("lengths", exact_length, "second try")
    assert [r.step for r in led.rows] == ["baseline", "lengths"]
    assert led.row("lengths").change == "second try"


# --------------------------------------------------------------------------- grader's side
def test_verify_ledger_counts_honest_rows_and_not_forged_ones(ledger):
    """A fake engine's trials last milliseconds, so a hiccup of the machine moves them a lot:
    the tolerance here is 10x, and the forgery 100x."""
    definitions = {"exact_length": exact_length, "served": served, "two_tokens": two_tokens}
    record = ledger.to_record()

    def verified(rec, defs=definitions) -> int:
        return verify_ledger(rec, defs, engine=ledger.engine, factor=10.0)

    assert verified(record) == 3
    forged = json.loads(json.dumps(record))
    forged["rows"][2]["speedup"] *= 100
    forged["rows"][2]["requests_per_s"] = [v * 100 for v in forged["rows"][2]["requests_per_s"]]
    assert verified(forged) == 2
    claimed_ok = json.loads(json.dumps(record))
    claimed_ok["rows"][3]["quality_ok"] = True
    assert verified(claimed_ok) == 2
    edited = json.loads(json.dumps(record))
    edited["rows"][1]["speedup"] *= 1.5  # a speed-up that is not the throughputs' ratio
    assert verified(edited) == 2
    slow_base = json.loads(json.dumps(record))
    slow_base["rows"][0]["requests_per_s"] = [v / 100 for v in record["rows"][0]["requests_per_s"]]
    assert verified(slow_base) == 0
    assert verified(record, {"served": served}) == 1
    assert verified({**record, "workload": "capstone-full"}) == 0


def test_grade_final_gives_speed_only_with_every_answer_right():
    engine = fake_engine()
    good = grade_final(served, "ci", engine=engine)
    assert good.implemented and good.quality_ok and good.speedup > 1.5 and good.speed_ok
    wrong = grade_final(two_tokens, "ci", engine=engine)
    assert wrong.speedup > 1.5 and not wrong.quality_ok and not wrong.speed_ok
    assert not wrong.high_ok and f"0/{N} agree" in str(wrong)
    todo = grade_final(unfinished, "ci", engine=engine)
    assert not todo.implemented and not todo.speed_ok and str(todo).endswith("not implemented")


def test_profile_shows_the_baselines_costs():
    p = profile_app(baseline_factory(WORKLOAD), fake_engine(), WORKLOAD)
    assert (p.requests, p.distinct_requests, p.engine_requests, p.engine_calls) == (N, 3, N, N)
    assert p.mean_batch_size == 1.0 and p.tokens_generated == N * WORKLOAD.baseline_max_tokens
    assert p.tokens_returned == sum(r.max_tokens for r in WORKLOAD.requests)
    assert p.decode_discarded_s > 0.25 * (p.decode_returned_s + p.decode_discarded_s)
    assert p.max_loop_stall_ms / 1e3 >= p.shortest_call_s  # generate blocks the event loop
    assert p.outside_engine_s < 0.2 * p.wall_s  # one generation after another, nothing else


def test_measure_builds_a_fresh_app_per_trial():
    built = []

    def counting(engine):
        built.append(1)
        return served(engine)

    m = measure(counting, fake_engine(), WORKLOAD, trials=3)
    assert len(built) == 3 and len(m.trials) == 3 and set(m.answers) == {
        r.request_id for r in WORKLOAD.requests}
    with pytest.raises(ValueError, match="trials must be an integer >= 1"):
        measure(counting, fake_engine(), WORKLOAD, trials=0)


# --------------------------------------------------------------------------- grading, end to end
def _cell(nb, text: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and text in c.source)


@pytest.mark.slow
def test_capstone_batch_is_graded_on_what_the_grader_measures(tmp_path):
    """Five submissions in one ``grade`` call, two side by side (``-j 2``, as a class is
    graded): each scored the way it deserves, none stopping the batch."""
    from labkit.course import grading
    from labkit.course.assign import make_student_notebooks
    from labkit.course.rubric import load_rubric
    from labkit.course.sandbox import unavailable

    if (why := unavailable()) is not None:
        pytest.skip(f"no sandbox here: {why}")
    solution = NOTEBOOKS_DIR / "07_capstone.ipynb"
    subs = tmp_path / "submissions"
    subs.mkdir()
    shutil.copy(solution, subs / "reference.ipynb")
    [student] = make_student_notebooks(NOTEBOOKS_DIR, tmp_path / "release", "07_*.ipynb")
    shutil.copy(student, subs / "untouched.ipynb")

    nb = nbformat.read(solution, as_version=4)  # fast but wrong: the two-token step handed in
    final = nb.cells[_cell(nb, "def build_final_app(")]
    final.source = final.source.replace("return step_3_cache(engine)",
                                        "return step_4_own(engine)")
    nbformat.write(nb, subs / "wrong.ipynb")

    nb = nbformat.read(solution, as_version=4)  # a ledger row edited by hand
    nb.cells.insert(_cell(nb, 'record("lab07_ledger"'), new_code_cell(
        'row = ledger.row("2 batching")\n'
        'row.requests_per_s = [10 * v for v in row.requests_per_s]\n'
        'row.speedup = 10 * row.speedup'))
    nbformat.write(nb, subs / "forged.ipynb")

    nb = nbformat.read(solution, as_version=4)  # a bug in step 3: the notebook stops there
    step3 = nb.cells[_cell(nb, "def step_3_cache(")]
    step3.source = step3.source.replace("    return CachedApp(step_2_batching(engine), "
                                        'AsyncResponseCache(engine.model_name, "lru"))',
                                        '    raise RuntimeError("bug in step 3")')
    assert "bug in step 3" in step3.source
    nbformat.write(nb, subs / "raises.ipynb")

    csv = tmp_path / "grades.csv"  # one trial per step: the grader measures again anyway
    grading.grade(subs, 7, csv, rubric=load_rubric(7), params={"TRIALS": 1}, jobs=2)
    rows = pd.read_csv(csv, keep_default_na=False).set_index("submission")
    speed = ["speedup", "speedup_high", "final_quality"]

    ref = rows.loc["reference.ipynb"]
    assert (ref.status, ref.total) == ("ok", ref["max"]), ref.feedback

    untouched = rows.loc["untouched.ipynb"]
    assert untouched.status == "ok" and untouched.total == 0, untouched.feedback

    wrong = rows.loc["wrong.ipynb"]
    assert wrong.status == "ok" and not any(wrong[c] for c in speed), wrong.feedback
    assert wrong.ledger_steps == 3 and wrong.cache_hidden == 2

    forged = rows.loc["forged.ipynb"]
    assert forged.ledger_steps == 0 and "verify_ledger" in forged.feedback
    assert all(forged[c] > 0 for c in speed), forged.feedback

    raises = rows.loc["raises.ipynb"]
    assert raises.status == "error" and "RuntimeError" in raises.reason
    assert raises.cache_hidden == 2 and raises.prediction == 1 and raises.total == 3
