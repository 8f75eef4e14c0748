"""The trusted interpreter of ``labkit grade``: runs a submission's hidden tests and
recomputations outside its kernel (``python -I -m labkit.course.harness``, in a sandbox).

It reads its job from ``labkit.course.trusted`` in two JSON lines on stdin: first the lab's
parameters cell, the grader's parameter values and the rubric's ``setup`` code, which it runs at
once (while the submission's kernel runs), in a namespace of its own, before any student code;
then the student's graded definitions (extracted from the executed notebook), the recorded
values and every check's code. It runs the definitions in the student's namespace, on a copy of
the first one, and says it is ready (``{"ready": true, "problems": [...]}``). Each check then
runs when asked (``{"check": key, "nonce": n}`` on stdin) in a fresh namespace: the setup's
names, ``records``, the graded names taken from the student's namespace and a copy of the real
builtins taken at start (a student's ``abs = ...`` or ``def abs`` is not seen by the check). The
answer goes to the grader on the original stdout, which nobody else writes to (``print`` goes
to stderr), tagged with that check's nonce: ``{"nonce", "passed": bool, "error"}`` for a hidden
test, ``{"nonce", "value"}`` or ``{"nonce", "passed": false, "error"}`` for a recomputation.
A failed check's answer (and a recomputation's) also carries ``tried``: the last call it made to
a graded function, with its arguments (``reprlib``-shortened), so the student's feedback can
show the input without the check's code; the check sees each graded function through a thin
wrapper that notes the call (``functools.wraps``: name, signature and source stay the
function's).
A check that runs over its time limit fails with TimeoutError; the grader compares values and
kills a check that does not answer.

Only the standard library is imported here, and nothing from the student before it has run.
"""

from __future__ import annotations

import builtins
import functools
import json
import linecache
import os
import reprlib
import signal
import sys
import types


def _jsonable(value):
    """``value`` as JSON data: numpy/torch scalars through ``.item()``, the rest by ``repr``."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item")
                                 else repr(o)))


def _run(source: str, name: str, namespace: dict, mode: str = "exec"):
    """Compile ``source`` as ``name`` (kept in linecache, so ``inspect.getsource`` finds the
    functions it defines) and run it in ``namespace``."""
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    code = compile(source, name, mode)
    return eval(code, namespace) if mode == "eval" else exec(code, namespace)


def _watched(name: str, value, calls: list):
    """``value``, or for a plain function a wrapper that keeps its last call's arguments in
    ``calls`` (read only when a check fails)."""
    if not isinstance(value, types.FunctionType):
        return value

    @functools.wraps(value)
    def call(*args, **kwargs):
        calls[:] = [(name, args, kwargs)]
        return value(*args, **kwargs)

    return call


def _tried(calls: list) -> str:
    """``name(arg, key=value)`` of the last call in ``calls``, shortened; '' if none."""
    if not calls:
        return ""
    name, args, kwargs = calls[0]
    short = reprlib.Repr()
    short.maxlist, short.maxstring, short.maxother, short.maxlevel = 8, 60, 80, 3
    try:
        parts = [short.repr(a) for a in args] + [f"{k}={short.repr(v)}" for k, v in kwargs.items()]
    except BaseException:  # noqa: BLE001 (an argument whose repr fails: name the call only)
        return f"{name}(...)"
    return f"{name}({', '.join(parts)})"[:400]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def main() -> None:
    real_builtins = dict(vars(builtins))
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everybody else's prints go to stderr
    dumps, loads, readline = json.dumps, json.loads, sys.stdin.readline
    setup = loads(readline())
    trusted = {"__name__": "__labkit_trusted__", "__builtins__": dict(real_builtins)}
    try:
        _run(setup["parameters"], "<parameters>", trusted)
        trusted.update(setup["overrides"])
        _run(setup["setup"], "<rubric setup>", trusted)
    except BaseException as exc:  # noqa: BLE001 (the grader reports it for every check)
        answers.write(dumps({"ready": False, "error": f"rubric setup: {_error(exc)}"}) + "\n")
        return
    answers.write(dumps({"set": True}) + "\n")
    base, job = dict(trusted), loads(readline())
    student = {**base, "__name__": "__main__", "__builtins__": dict(real_builtins)}
    problems = []
    for label, source in job["definitions"]:
        try:
            _run(source, f"<{label}>", student)
        except BaseException as exc:  # noqa: BLE001 (noted; the checks then say what is missing)
            problems.append(f"{label}: {_error(exc)}")
    answers.write(dumps({"ready": True, "problems": problems}) + "\n")

    def late(*_args):
        raise TimeoutError(f"took longer than {job['timeout_s']:g} s")

    while (line := readline()):
        ask = loads(line)
        key, nonce = ask["check"], ask["nonce"]
        role, code = job["checks"][key]
        calls: list = []
        namespace = {**base, "__builtins__": dict(real_builtins), "records": job["records"],
                     **{n: _watched(n, student[n], calls) for n in job["graded"] if n in student}}
        signal.signal(signal.SIGALRM, late)
        signal.alarm(max(1, int(job["timeout_s"])))
        try:
            if role == "hidden":
                _run(code, f"<hidden check {key}>", namespace)
                answer = {"passed": True}
            else:
                answer = {"value": _jsonable(_run(code, f"<recompute {key}>", namespace, "eval")),
                          "tried": _tried(calls)}  # shown if the value disagrees
        except BaseException as exc:  # noqa: BLE001 (a failing check is an answer)
            answer = {"passed": False, "error": _error(exc), "tried": _tried(calls)}
        finally:
            signal.alarm(0)
        answers.write(dumps({"nonce": nonce, **answer}) + "\n")


if __name__ == "__main__":
    main()
