"""labkit: helpers for the LLM inference performance labs.

The package's folders are its architecture (README "Layout"): ``config``, ``device``,
``models``, ``metrics`` and ``processes`` at the ground; ``engines/`` on them; the lesson
helpers (``profiling``, ``roofline``, ``sizes``, ``quant``, ``quant_methods``, ``prune``,
``quality``, ``equivalence``, ``records``, ``claims``, ``quiz``, ``plots``, ``widgets``);
``serving/`` (the request path); ``bench/`` (workloads, load, the per-lab benches);
``course/`` (run, grade, assign); ``cli`` and ``doctor`` on top. A module imports only from its
own floor or below.

``import labkit`` is cheap: it imports no engine, no vLLM, no torchao and starts no Redis. The
short API below is loaded on first use: ``labkit.record("name", value)``,
``labkit.claim(text, holds, evidence)``, ``labkit.get_engine("hf")``,
``labkit.Request(prompt=...)``, ``labkit.by_profile(...)``.
"""

import importlib as _importlib
import os as _os

__version__ = "0.1.0"

# torch's OpenMP worker threads spin while waiting; on a small shared CPU (2 cores, a lab
# machine) that makes every forward pass 10-20x slower. Sleeping waits cost nothing measurable.
# Only effective when labkit is imported before torch, as the notebooks do.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_API = {  # name -> the module that defines it
    "record": "labkit.records", "claim": "labkit.claims",
    "ask": "labkit.quiz", "predict": "labkit.quiz", "reveal": "labkit.quiz",
    "by_profile": "labkit.config", "resolve_profile": "labkit.config",
    "Request": "labkit.engines", "get_engine": "labkit.engines",
    "InferenceService": "labkit.serving",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(_importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
