"""``labkit`` command line: doctor, model, generate, bench, serve, run, assign, grade.

``--model``, ``--engine`` and ``run --profile`` default to ``LABKIT_MODEL``, ``LABKIT_ENGINE`` and
``LABKIT_PROFILE``, then to ``labkit.config``'s defaults."""

from __future__ import annotations

import argparse
import sys

from labkit.cli.parser import build_parser

__all__ = ["build_parser", "main"]


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


