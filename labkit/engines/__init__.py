"""Engines: one interface (``Engine.generate``), three implementations, chosen by name.

| name    | what                                                    | batching                 |
|---------|---------------------------------------------------------|--------------------------|
| ``hf``    | transformers ``generate``, left-padded static batches  | static                   |
| ``hf-cb`` | transformers' own continuous batching manager          | continuous (iteration)   |
| ``vllm``  | vLLM ``LLMEngine`` (paged KV cache, CUDA graphs)       | continuous (iteration)   |
| ``auto``  | vllm on a GPU where vLLM is installed, else hf         |                          |

``ProcessEngine(name, model)`` runs any of them in a process of its own (a server's event loop
then does not share the engine's GIL).

Engines import their libraries only when chosen: ``import labkit.engines`` loads no model.
"""

from __future__ import annotations

from labkit.engines.base import Completion, Engine, Request
from labkit.engines.counting import CountingEngine
from labkit.engines.process import ProcessEngine
from labkit.engines.registry import (
    as_engine,
    engine_device,
    get_engine,
    resolve_engine,
    vllm_available,
)

__all__ = ["Completion", "CountingEngine", "Engine", "ProcessEngine", "Request", "as_engine",
           "engine_device", "get_engine", "resolve_engine", "vllm_available"]
