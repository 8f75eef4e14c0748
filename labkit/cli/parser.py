"""The ``labkit`` argument parser: every command, flag and default, with checked number types.

Counts, seconds, rates and ports are parsed by ``_number`` types, so a bad value is a one-line
argparse error naming it; ``int_list`` parses ``"32,128"``.
"""

from __future__ import annotations

import argparse

import labkit.cli.commands as commands
from labkit.bench.batching import CONTINUOUS_ENGINES
from labkit.config import (
    DATA_DIR,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    ENGINES,
    MAX_BODY_BYTES,
    PROFILES,
)
from labkit.course.assign import RELEASE_DIR, SOURCE_DIR
from labkit.course.runner import CELL_TIMEOUT_S
from labkit.metrics import BENCH_KINDS
from labkit.serving.batchers import MAX_BATCH_SIZE, MAX_QUEUE, MAX_WAIT_MS
from labkit.serving.service import DEADLINE_S


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


def _deadline(text: str) -> float | None:
    """``--deadline-s``: seconds (> 0), or ``none`` for no deadline."""
    return None if text.lower() == "none" else SECONDS(text)


def build_parser() -> argparse.ArgumentParser:
    from labkit.bench.serve import add_cli_args as serve_cli_args

    parser = argparse.ArgumentParser(
        prog="labkit", description="LLM inference performance labs: doctor, model, generate, "
        "bench, serve, run, assign, grade (labkit COMMAND --help for each).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check Python, torch, GPU, vLLM, Redis and the model cache")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-redis", action="store_true", help="skip starting/pinging Redis")
    p.set_defaults(func=commands.cmd_doctor)

    p = sub.add_parser("model", help="prepare a model (convert/create once) and print its path")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=commands.cmd_model)

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
    p.set_defaults(func=commands.cmd_generate)

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
    p.set_defaults(func=commands.cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: cache -> batcher -> engine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=PORT, default=8000)
    p.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--no-cache", action="store_true", help="no Redis response cache")
    p.add_argument("--max-batch-size", type=COUNT, default=MAX_BATCH_SIZE)
    p.add_argument("--max-wait-ms", type=_number(float, at_least=0), default=MAX_WAIT_MS)
    p.add_argument("--max-queue", type=COUNT, default=MAX_QUEUE, help="waiting requests before 503")
    p.add_argument("--deadline-s", type=_deadline, default=DEADLINE_S, metavar="S",
                   help=f"stop a request's generation S seconds after it arrived, answering 504 "
                        f"(default {DEADLINE_S:g}; 'none': no limit)")
    p.add_argument("--max-body-bytes", type=COUNT, default=MAX_BODY_BYTES,
                   help=f"larger request bodies get a 413 (default {MAX_BODY_BYTES})")
    p.add_argument("--engine-process", action="store_true",
                   help="run the engine in a process of its own (its step loop then does not "
                        "share the server's GIL)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead")
    p.add_argument("--replicas", type=COUNT, default=2, help="--ray: replica count")
    p.set_defaults(func=commands.cmd_serve)

    p = sub.add_parser("run", help="execute the labs with papermill and write report.html")
    p.add_argument("notebooks", nargs="*", help="default: every notebooks/NN_*.ipynb in order")
    p.add_argument("--profile", choices=PROFILES,
                   help="default: $LABKIT_PROFILE, else full on a GPU and ci on a CPU")
    p.add_argument("--param", action="append", metavar="[NN:]K=V",
                   help="notebook parameter; NN:K=V for lab NN only (e.g. 01:MODEL=synthetic-8b)")
    p.add_argument("--out", help="output folder (default: runs/<timestamp>)")
    p.add_argument("--cell-timeout", type=SECONDS, default=CELL_TIMEOUT_S,
                   help=f"limit of each cell (s; default {CELL_TIMEOUT_S:g})")
    p.add_argument("--gpus", help="run labs side by side, one per GPU, e.g. 0,1")
    p.add_argument("--publish", action="store_true", help="write each lab that ran without error "
                   "back over its notebook: outputs kept, papermill's parameters cell dropped")
    p.set_defaults(func=commands.cmd_run)

    p = sub.add_parser("assign", help="write the student release: notebooks (solutions "
                       "stubbed), data, README, labkit's wheel; a folder and a zip",
                       description="Write the student release (layout: labkit/course/assign.py)"
                       ": student notebooks, the data the labs read, a student README and "
                       "labkit's wheel, as a folder and OUT.zip. No rubric, hidden check, "
                       "solution or answer key goes in.")
    p.add_argument("--src", default=str(SOURCE_DIR), help="folder of the solution notebooks "
                   "(default: the repository's notebooks/, from any current folder)")
    p.add_argument("--data", default=str(DATA_DIR), help="folder of the data the labs read; its "
                   "*.txt, *.jsonl, *.json, *.csv and SOURCES.md are copied, never rubrics/ "
                   "(default: labkit's data folder)")
    p.add_argument("--out", default=RELEASE_DIR, help="release folder, replaced if it holds a "
                   "release written before (default: ./release)")
    p.add_argument("--no-zip", action="store_true", help="write the folder only, not OUT.zip")
    p.add_argument("--no-wheel", action="store_true", help="leave labkit's wheel out (building "
                   "it needs the repository and pip); the README then says to install from "
                   "the course repository")
    p.add_argument("--answer-key", metavar="FILE", help="also write the instructors' answer key "
                   "(Markdown: knowledge checks, answers, why) to FILE, outside the release "
                   "folder; never hand it out")
    p.set_defaults(func=commands.cmd_assign)

    p = sub.add_parser("grade", help="execute and score every submission in a folder",
                       description="Grade SUBMISSION_DIR: <student>.ipynb files, or "
                       "<student>/NN_name.ipynb folders (nbgrader's submitted/ layout).")
    p.add_argument("submission_dir")
    p.add_argument("--lab", required=True, help="lab number (e.g. 1) or a rubric path")
    p.add_argument("--out", default="grades.csv")
    p.add_argument("--notebook-timeout", type=SECONDS, help="limit of each submission's whole "
                   "run (s, kernel start included; default: the rubric's timeout_s)")
    p.add_argument("--rubric", help="a rubric file instead of data/rubrics/labNN.toml")
    p.add_argument("--param", action="append", metavar="K=V", help="notebook parameter")
    p.add_argument("--no-sandbox", action="store_true", help="no sandbox: trusted work only")
    p.add_argument("-j", "--jobs", type=COUNT, default=1, help="submissions graded side by "
                   "side, each in its own sandbox (default 1)")
    p.add_argument("--gpus", help="one submission per GPU at a time, e.g. 0,1 (each sees only "
                   "its card; replaces -j)")
    p.add_argument("--feedback", metavar="DIR", help="write DIR/<student>/<lab>.md per student "
                   "(points, failed checks and their inputs, first traceback) and the executed "
                   "notebook")
    p.add_argument("--gradebook", metavar="CSV", help="record the rows in this gradebook across "
                   "labs; submissions it graded from the same bytes and rubric are not run again")
    p.add_argument("--regrade", action="store_true", help="with --gradebook: run every "
                   "submission again")
    p.add_argument("--deadline", metavar="ISO8601", help="mark submissions after it late "
                   "(time: <student>/timestamp.txt, else the file's mtime; no offset: UTC)")
    p.add_argument("--overrides", metavar="CSV", help="instructor's points (columns student, "
                   "lab, points, reason), applied last and shown in the feedback")
    p.add_argument("--allow-flagged", action="append", default=[], metavar="NAME",
                   help="grade this student (or submission) although the scan flagged it, once "
                   "an instructor has looked at it (repeatable)")
    p.set_defaults(func=commands.cmd_grade)

    p = sub.add_parser("gradebook", help="show a gradebook across labs; export it for Canvas")
    p.add_argument("book", help="the gradebook CSV that labkit grade --gradebook writes")
    p.add_argument("--overrides", metavar="CSV", help="instructor's points (student, lab, "
                   "points, reason), applied last")
    p.add_argument("--canvas", metavar="CSV", help="write Canvas's gradebook import CSV here")
    p.set_defaults(func=commands.cmd_gradebook)
    return parser

