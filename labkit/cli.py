"""``labkit`` command line: doctor, model, generate (more subcommands join as labs land)."""

from __future__ import annotations

import argparse
import json
import sys

from labkit.config import DEFAULT_MAX_TOKENS, ENGINES


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
          f"E2E {c.e2e_s * 1e3:.1f} ms", file=sys.stderr if args.quiet_stats else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check Python, torch, GPU, vLLM, Redis and the model cache")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-redis", action="store_true", help="skip starting/pinging Redis")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("model", help="prepare a model (convert/create once) and print its path")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.set_defaults(func=_cmd_model)

    p = sub.add_parser("generate", help="generate one completion and print its timings")
    p.add_argument("prompt")
    p.add_argument("--engine", default="auto", choices=ENGINES)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat "
                   "template")
    p.add_argument("--warmup", action="store_true", help="run a tiny generation first, so the "
                   "timings exclude one-time start-up costs")
    p.add_argument("--quiet-stats", action="store_true", help="print the timing line to stderr")
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, ImportError) as err:
        print(f"labkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
