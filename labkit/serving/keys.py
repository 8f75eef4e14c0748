"""Cache keys that are equal in every process: sha256 of a canonical JSON payload.

``cache_key`` is the sha256 of the canonical JSON (``sort_keys=True``, no spaces) of the model
id, the prompt or messages, and every sampling parameter that changes the output. The same
request gives the same key in every process and on every machine. Python's ``hash()`` does not:
it is salted per process (``PYTHONHASHSEED``), so a ``hash()`` key written by one worker is never
found by another; ``eval_in_fresh_process`` shows it (labs 03 and 05). Layout:
``labkit:{namespace(model)}:{sha256}``, one namespace per model.
"""

from __future__ import annotations

import hashlib
import json
import re

from labkit.engines.base import Request


def canonical_json(obj) -> str:
    """The one JSON text of ``obj``: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_payload(model: str, request: Request) -> dict:
    """What identifies a response: model id, prompt or messages, output-changing sampling params.

    Numbers are normalised (``temperature=0`` and ``0.0`` are one key) and stop strings sorted.
    """
    return {
        "model": model,
        "prompt": request.prompt,
        "messages": request.messages,
        "max_tokens": int(request.max_tokens),
        "temperature": float(request.temperature),
        "top_p": float(request.top_p),
        "seed": request.seed,
        "stop": sorted(request.stop) if request.stop else None,
        "ignore_eos": bool(request.ignore_eos),
    }


def namespace(model: str) -> str:
    """Key namespace of a model id: ``meta-llama/Llama-3.1-8B`` -> ``meta-llama_Llama-3.1-8B``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model)


def cache_key(model: str, request: Request, ns: str | None = None) -> str:
    """``labkit:{namespace}:{sha256 of canonical_json(key_payload(model, request))}``."""
    digest = hashlib.sha256(canonical_json(key_payload(model, request)).encode()).hexdigest()
    return f"labkit:{ns or namespace(model)}:{digest}"


def eval_in_fresh_process(code: str, expr: str, *, pythonhashseed: int | str) -> str:
    """Run ``code`` in a new Python process with ``PYTHONHASHSEED`` set; return ``str(expr)``.

    Shows what another worker would compute: ``hash()`` differs, a sha256 key does not.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": str(pythonhashseed)}
    script = f"{code}\nprint({expr})"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=60)
    if done.returncode:
        raise RuntimeError(f"fresh process failed ({done.returncode}): {done.stderr[-800:]}")
    return done.stdout.strip()
