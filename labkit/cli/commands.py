"""What each ``labkit`` command does once its arguments are parsed (``labkit.cli.parser``).

Every ``cmd_*`` takes the parsed arguments and returns the exit status; heavy modules (engines,
benches, the grader) are imported inside, so ``labkit --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from labkit.course.runner import parse_params


def cmd_doctor(args) -> int:
    from labkit.doctor import doctor, format_report

    facts = doctor(check_redis=not args.no_redis)
    print(json.dumps(facts, indent=2) if args.json else format_report(facts))
    return 0


def cmd_model(args) -> int:
    from labkit.models import resolve

    ref = resolve(args.name)
    print(json.dumps({"name": ref.name, "path": ref.path, "kind": ref.kind}))
    return 0


def cmd_generate(args) -> int:
    from labkit.engines import Request, get_engine

    engine = get_engine(args.engine, model=args.model)
    if args.raw:
        req = Request(prompt=args.prompt, max_tokens=args.max_tokens,
                      temperature=args.temperature)
    else:
        req = Request(messages=[{"role": "user", "content": args.prompt}],
                      max_tokens=args.max_tokens, temperature=args.temperature)
    if args.warmup:
        engine.warmup()

    def show(_i, _tok, delta, _t):
        print(delta, end="", flush=True)

    [c] = engine.generate([req], on_token=show)
    engine.close()
    print()
    tps = (c.output_tokens - 1) / (c.token_times_s[-1] - c.token_times_s[0]) \
        if c.output_tokens > 1 else float("nan")
    print(f"[{engine.name} | {args.model}] {c.prompt_tokens} prompt tokens, "
          f"{c.output_tokens} output tokens ({c.finish_reason}); "
          f"TTFT {c.ttft_s * 1e3:.1f} ms, decode {tps:.1f} tokens/s, "
          f"E2E {c.e2e_s * 1e3:.1f} ms", file=sys.stderr if args.timings_to_stderr else sys.stdout)
    return 0


def _engine_kwargs(args) -> dict:
    """Engine options given on the command line (only those set)."""
    kw = {}
    if args.static_cache:
        kw["static_cache"] = True
    if args.compile:
        kw["compile"] = True
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.prefix_caching is not None:
        kw["enable_prefix_caching"] = args.prefix_caching == "on"
    if args.quantization:
        kw["quantization"] = args.quantization
    return kw


def int_list(text: str) -> list[int]:
    """``"32,128,512"`` -> ``[32, 128, 512]`` (positive integers), else a ValueError naming it."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 32,128; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers like 32,128; got {text!r}")
    return values


def _ints(text: str | None) -> list[int] | None:
    """``int_list(text)``, or None for an option that was not given."""
    return None if text is None else int_list(text)


def _given(**options) -> dict:
    """The options that were given (not None), so each bench's own defaults apply to the rest."""
    return {k: v for k, v in options.items() if v is not None}


def cmd_bench(args) -> int:
    from labkit.metrics import json_text, write_json

    kind, json_path = args.kind, args.json
    if kind == "latency":
        from labkit.bench.latency import run_latency_bench

        doc = run_latency_bench(args.engine, args.model, **_given(
            num_requests=args.num_requests,
            prompt_lens=_ints(args.prompt_lens), out_lens=_ints(args.out_lens)),
            **_engine_kwargs(args))
    elif kind == "batching":
        from labkit.bench.batching import run_batching_bench

        doc = run_batching_bench(engine=args.engine, model=args.model, **_given(
            batch_sizes=_ints(args.batch_sizes), concurrencies=_ints(args.concurrencies),
            num_requests=args.num_requests, continuous_engine=args.continuous_engine))
    elif kind == "cache":
        from labkit.bench.caching import run_cache_bench

        doc = run_cache_bench(args.engine, args.model, **_given(
            num_requests=args.num_requests, repeat_fraction=args.repeat_fraction))
    elif kind == "quant":
        from labkit.bench.quant import run_decode_speed_bench, run_quant_bench

        methods = args.methods.split(",") if args.methods else None
        if args.decode_speed:
            doc = run_decode_speed_bench(args.model, **_given(methods=methods))
        else:
            doc = run_quant_bench(args.model, methods=methods)
    else:  # serve
        from labkit.bench.serve import from_args

        doc = from_args(args, _ints(args.concurrencies))
    if json_path:
        write_json(doc, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    else:
        print(json_text(doc))
    return 0


def cmd_run(args) -> int:
    from labkit.course.runner import run_labs

    result = run_labs(args.notebooks or None, profile=args.profile,
                      params=parse_params(args.param), out_dir=args.out,
                      timeout_s=args.cell_timeout, gpus=args.gpus,
                      progress=lambda line: print(line, flush=True))
    print(f"report: {result.report}")
    if args.publish:
        from labkit.course.publish import publish

        for lab in result.labs:
            if lab.status == "ok":
                print(f"published {publish(lab.output, lab.notebook)}")
    if not result.ok:
        print(result.failure_message(), file=sys.stderr)
        return 1
    return 0


def cmd_assign(args) -> int:
    from labkit.course.release import make_release

    key = Path(args.answer_key).resolve() if args.answer_key else None
    out = Path(args.out).resolve()
    if key is not None and (key == out or out in key.parents):
        raise ValueError(f"--answer-key {args.answer_key!r} is inside the release folder "
                         f"{args.out!r}; write it outside the release")
    release = make_release(args.out, args.src, args.data, with_zip=not args.no_zip,
                           wheel=not args.no_wheel)
    print(f"release: {release.folder} ({len(release.files)} files)")
    if release.zip:
        print(f"zip: {release.zip}")
    if key is not None:
        from labkit.course.answer_key import answer_key

        key.write_text(answer_key(args.src) + "\n")
        print(f"answer key (instructors only): {args.answer_key}")
    return 0


def cmd_grade(args) -> int:
    from labkit.course.grading import grade

    frame = grade(args.submission_dir, args.lab, args.out, timeout_s=args.notebook_timeout,
                  rubric=args.rubric, params=parse_params(args.param), sandbox=not args.no_sandbox,
                  jobs=args.jobs, gpus=args.gpus, feedback_dir=args.feedback,
                  gradebook=args.gradebook, deadline=args.deadline, overrides=args.overrides,
                  allow_flagged=tuple(args.allow_flagged), regrade=args.regrade)
    print(frame[["submission", "status", "total", "max", "late", "reason"]]
          .to_string(index=False))
    print(f"grades: {args.out}")
    for option, what in ((args.feedback, "feedback"), (args.gradebook, "gradebook")):
        if option:
            print(f"{what}: {option}")
    return 0  # failing submissions are graded rows in the CSV, not a failed command


def cmd_gradebook(args) -> int:
    from labkit.course import gradebook as gb

    if not Path(args.book).is_file():
        raise FileNotFoundError(f"gradebook {args.book!r} not found (labkit grade --gradebook "
                                "writes it)")
    book = gb.apply_overrides(gb.read_book(args.book), gb.read_overrides(args.overrides))
    labs, rows = gb.wide(book)
    print("\t".join(["student", *labs]))
    for row in rows:
        print("\t".join([row["student"], *[str(row.get(lab, "")) for lab in labs]]))
    if args.canvas:
        print(f"canvas: {gb.export_canvas(book, args.canvas)}")
    return 0


def cmd_serve(args) -> int:
    if args.ray and args.engine_process:
        print("labkit serve: error: --engine-process is for the one-process server; each Ray "
              "Serve replica already runs in its own process", file=sys.stderr)
        return 2
    if args.ray:
        from labkit.serving.deploy import serve_ray

        serve_ray(model=args.model, engine=args.engine, replicas=args.replicas, host=args.host,
                  port=args.port, cache=not args.no_cache, max_batch_size=args.max_batch_size,
                  max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                  deadline_s=args.deadline_s, max_body_bytes=args.max_body_bytes)
        return 0
    from labkit.serving.http import serve

    serve(engine=args.engine, model=args.model, host=args.host, port=args.port,
          cache=not args.no_cache, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, deadline_s=args.deadline_s,
          max_body_bytes=args.max_body_bytes, engine_process=args.engine_process)
    return 0


