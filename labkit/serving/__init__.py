"""serving: one request path from an HTTP request to the engine and back (labs 03, 05, 06).

| module             | what it is |
|--------------------|----------------------------------------|
| ``service``        | ``InferenceService``: key once -> cache -> ``Batcher`` -> engine -> store |
| ``responses``      | ``ServiceResponse`` and ``StreamEvent``: what a caller gets back |
| ``flights``        | ``Flights``: identical requests in flight share one generation |
| ``batchers``       | the ``Batcher`` protocol, its defaults, ``DynamicBatcher``, ``Overloaded`` |
| ``gate``           | ``ContinuousGate``: the batcher of continuous engines (hf-cb, vllm) |
| ``serve_batcher``  | ``ServeBatcher``: Ray Serve's ``@serve.batch`` inside a replica |
| ``handoff``        | ``Handoff``: engine-thread deltas to the event loop, one wake-up a burst |
| ``keys``           | ``cache_key``: sha256 keys equal in every process (not ``hash()``) |
| ``cache``          | the ``AsyncCache`` interface, ``ResponseCache``, ``AsyncResponseCache`` |
| ``cache_backends`` | where entries live: in-process LRU, Redis (sync, asyncio) |
| ``semantic``       | ``SemanticCache``: answers matched by meaning (MiniLM embeddings) |
| ``redis_server``   | an embedded Redis that never outlives this process, restarted when it dies |
| ``tether``         | child processes that die with this one (PDEATHSIG, watchdog, stale folders) |
| ``openai_api``     | OpenAI's wire format: strict request bodies, the error object, 413 and 500 |
| ``http``           | the OpenAI-compatible FastAPI front, ``serve``, ``BackgroundServer`` |
| ``app_thread``     | ``AppThread``: an ASGI app served by uvicorn on a daemon thread |
| ``build``          | ``build_service``: engine + Redis cache + batcher -> ``InferenceService`` |
| ``replica``        | one Ray Serve replica running the same service |
| ``deploy``         | ``deploy``: replicas on Ray Serve sharing one Redis |
| ``reference``      | the course page's reference service, defects and all (lab 05 measures them) |
| ``baseline``       | ``BaselineApp``: the capstone's slow but correct app (lab 07 optimizes it) |

The names below load with ``import labkit.serving``, which imports no Ray, FastAPI or torch.
"""

from labkit.serving.batchers import Batcher, BatcherClosed, DynamicBatcher, Overloaded
from labkit.serving.cache import AsyncResponseCache, ResponseCache
from labkit.serving.gate import ContinuousGate
from labkit.serving.keys import cache_key
from labkit.serving.responses import ServiceResponse, StreamEvent
from labkit.serving.service import InferenceService

__all__ = ["AsyncResponseCache", "Batcher", "BatcherClosed", "ContinuousGate", "DynamicBatcher",
           "InferenceService", "Overloaded", "ResponseCache", "ServiceResponse", "StreamEvent",
           "cache_key"]
