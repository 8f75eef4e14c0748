"""``labkit`` command line: doctor, model, generate, bench, serve, run, assign, grade.

``--model``, ``--engine`` and ``run --profile`` default to ``LABKIT_MODEL``, ``LABKIT_ENGINE`` and
``LABKIT_PROFILE``, then to ``labkit.config``'s defaults."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from labkit.bench.batching import CONTINUOUS_ENGINES
from labkit.config import DEFAULT_MAX_TOKENS, DEFAULT_MODEL, ENGINES, PROFILES
from labkit.course.assign import RELEASE_DIR, SOURCE_DIR
from labkit.course.runner import CELL_TIMEOUT_S, parse_params
from labkit.metrics import BENCH_KINDS
from labkit.serving.batchers import MAX_BATCH_SIZE, MAX_QUEUE, MAX_WAIT_MS


def _cmd_doctor(args) -> int:
    from labkit.doctor import doctor, format_report

    facts = doctor(check_redis=not args.no_redis)
    print(json.dumps(facts, indent=2) if args.json else format_report(facts))
    return 0


def _cmd_model(args) -> int:
    from labkit.models import resolve

    ref = resolve(args.name)
    print(json.dumps({"name": ref.name, "path": ref.path, "kind": ref.kind}))
    return 0


def _cmd_generate(args) -> int:
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


def _cmd_bench(args) -> int:
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


def _cmd_run(args) -> int:
    from labkit.course.runner import run_labs

    result = run_labs(args.notebooks or None, profile=args.profile,
                      params=parse_params(args.param), out_dir=args.out,
                      timeout_s=args.timeout, gpus=args.gpus)
    print(f"report: {result.report}")
    if not result.ok:
        print(result.failure_message(), file=sys.stderr)
        return 1
    return 0


def _cmd_assign(args) -> int:
    from labkit.course.assign import make_student_notebooks

    for path in make_student_notebooks(args.src, args.out):
        print(path)
    if args.answer_key:
        from labkit.course.answer_key import answer_key

        Path(args.answer_key).write_text(answer_key(args.src) + "\n")
        print(args.answer_key)
    return 0


def _cmd_grade(args) -> int:
    from labkit.course.grading import grade

    frame = grade(args.submission_dir, args.lab, args.out, timeout_s=args.timeout,
                  rubric=args.rubric, params=parse_params(args.param), sandbox=not args.no_sandbox)
    print(frame[["submission", "status", "total", "max", "reason"]].to_string(index=False))
    print(f"grades: {args.out}")
    return 0  # failing submissions are graded rows in the CSV, not a failed command


def _cmd_serve(args) -> int:
    if args.ray:
        from labkit.serving.deploy import serve_ray

        serve_ray(model=args.model, engine=args.engine, replicas=args.replicas, host=args.host,
                  port=args.port, cache=not args.no_cache, max_batch_size=args.max_batch_size,
                  max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
        return 0
    from labkit.serving.http import serve

    serve(engine=args.engine, model=args.model, host=args.host, port=args.port,
          cache=not args.no_cache, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    return 0


def _number(kind: type = int, *, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None):
    """An argparse ``type`` that parses ``kind`` and enforces the bounds, naming the bad value."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be >= {at_least}, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most}, got {text}")
        return value

    return parse


ENGINE_HELP = "default: $LABKIT_ENGINE, else auto (vllm on a GPU where installed, else hf)"
MODEL_HELP = (f"default: $LABKIT_MODEL, else {DEFAULT_MODEL} (bench serve: the model the server "
              "serves)")
COUNT = _number(int, at_least=1)
SECONDS = _number(float, above=0)
PORT = _number(int, at_least=0, at_most=65535)


def build_parser() -> argparse.ArgumentParser:
    from labkit.bench.serve import add_cli_args as serve_cli_args

    parser = argparse.ArgumentParser(prog="labkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check Python, torch, GPU, vLLM, Redis and the model cache")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-redis", action="store_true", help="skip starting/pinging Redis")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("model", help="prepare a model (convert/create once) and print its path")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=_cmd_model)

    p = sub.add_parser("generate", help="generate one completion and print its timings")
    p.add_argument("prompt")
    p.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--max-tokens", type=COUNT, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=_number(float, at_least=0), default=0.0)
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat "
                   "template")
    p.add_argument("--warmup", action="store_true", help="run a tiny generation first, so the "
                   "timings exclude one-time start-up costs")
    p.add_argument("--timings-to-stderr", action="store_true",
                   help="print the timing line to stderr (stdout keeps only the text)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="run a benchmark and write the bench JSON (labkit/metrics.py)")
    p.add_argument("kind", choices=BENCH_KINDS)
    p.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: print it)")
    p.add_argument("--num-requests", type=COUNT, help="requests per run (default: the bench's)")
    p.add_argument("--prompt-lens", help="latency: prompt tokens, e.g. 32,128")
    p.add_argument("--out-lens", help="latency: output tokens, e.g. 32,128")
    p.add_argument("--batch-sizes", help="batching: static batch sizes, e.g. 1,4,16")
    p.add_argument("--concurrencies", help="batching/serve: client counts, e.g. 1,16,64")
    p.add_argument("--continuous-engine", choices=CONTINUOUS_ENGINES,
                   help="batching: engine of the continuous runs (default: vllm on a GPU, "
                   "else hf-cb)")
    p.add_argument("--repeat-fraction", type=_number(float, at_least=0),
                   help="cache: repeated share, in [0, 1)")
    p.add_argument("--methods", help="quant: methods, e.g. int8-wo,magnitude-50,2:4 (default: all)")
    p.add_argument("--decode-speed", action="store_true", help="quant: batch-1 decode speed "
                   "per weight format on the compiled static-cache path (GPU; no perplexity)")
    serve_cli_args(p)
    p.add_argument("--static-cache", action="store_true", help="hf: static KV cache loop")
    p.add_argument("--compile", action="store_true", help="hf: compile the decode step "
                   "(CUDA graphs; needs --static-cache)")
    p.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs")
    p.add_argument("--prefix-caching", choices=["on", "off"], help="vllm: prefix caching")
    p.add_argument("--quantization", help="vllm: e.g. fp8")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: cache -> batcher -> engine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--no-cache", action="store_true", help="no Redis response cache")
    p.add_argument("--max-batch-size", type=COUNT, default=MAX_BATCH_SIZE)
    p.add_argument("--max-wait-ms", type=_number(float, at_least=0), default=MAX_WAIT_MS)
    p.add_argument("--max-queue", type=COUNT, default=MAX_QUEUE, help="waiting requests before 503")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead")
    p.add_argument("--replicas", type=COUNT, default=2, help="--ray: replica count")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("run", help="execute the labs with papermill and write report.html")
    p.add_argument("notebooks", nargs="*", help="default: every notebooks/NN_*.ipynb in order")
    p.add_argument("--profile", choices=PROFILES,
                   help="default: $LABKIT_PROFILE, else full on a GPU and ci on a CPU")
    p.add_argument("--param", action="append", metavar="[NN:]K=V",
                   help="notebook parameter; NN:K=V for lab NN only (e.g. 01:MODEL=synthetic-8b)")
    p.add_argument("--out", help="output folder (default: runs/<timestamp>)")
    p.add_argument("--timeout", type=SECONDS, default=CELL_TIMEOUT_S, help="per-cell timeout (s)")
    p.add_argument("--gpus", help="run labs side by side, one per GPU, e.g. 0,1")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("assign", help="write student notebooks (solutions stubbed)")
    p.add_argument("--src", default=SOURCE_DIR, help="folder of the solution notebooks")
    p.add_argument("--out", default=RELEASE_DIR, help="folder for the student notebooks")
    p.add_argument("--answer-key", metavar="FILE", help="also write the instructors' answer key "
                   "(Markdown: knowledge checks, answers, why) to FILE; never hand it out")
    p.set_defaults(func=_cmd_assign)

    p = sub.add_parser("grade", help="execute and score every submission in a folder")
    p.add_argument("submission_dir")
    p.add_argument("--lab", required=True, help="lab number (e.g. 1) or a rubric path")
    p.add_argument("--out", default="grades.csv")
    p.add_argument("--timeout", type=SECONDS, help="per-notebook timeout (s; default: rubric's)")
    p.add_argument("--rubric", help="a rubric file instead of data/rubrics/labNN.toml")
    p.add_argument("--param", action="append", metavar="K=V", help="notebook parameter")
    p.add_argument("--no-sandbox", action="store_true", help="no sandbox: trusted work only")
    p.set_defaults(func=_cmd_grade)
    return parser


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Fill unset --model/--engine/--profile from LABKIT_MODEL/LABKIT_ENGINE/LABKIT_PROFILE and
    the defaults (``labkit.config``); ``bench serve`` asks the server for its model instead."""
    from labkit.config import resolve_profile, settings

    resolved = settings(model=getattr(args, "model", None), engine=getattr(args, "engine", None))
    if hasattr(args, "engine"):
        args.engine = resolved.engine
    if hasattr(args, "model") and not (args.command == "bench" and args.kind == "serve"):
        args.model = resolved.model
    if args.command == "run":
        args.profile = resolve_profile(args.profile)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _resolve_defaults(args)
        return args.func(args)
    except (ValueError, RuntimeError, ImportError, FileNotFoundError) as err:
        print(f"labkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

