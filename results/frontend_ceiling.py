"""The serving front end's own ceiling: ``labkit``'s HTTP server and ``InferenceService`` over a
fake engine shaped like vLLM's step loop (one thread; every ``STEP_S`` each live request gets
one token) that costs no compute, so whatever limit a load test hits is the Python path's:
HTTP, SSE, the service, and the load generator itself.

    python results/frontend_ceiling.py 8123 [STEP_S] &
    labkit bench serve --url http://127.0.0.1:8123 --concurrencies 1,16,64,256 --num-requests 512

On a 2-core CPU (client and server sharing it), 16-token streams, STEP_S=0.003, 512 requests,
old and new load generator interleaved twice against one server: one httpx pool gave 1,542 and
1,592 output tokens/s at 64 clients, 1,113 and 1,069 at 256 (p99 TTFT 6.1-6.4 s); spreading the
load over small pools (``labkit.bench.client.load_sender``) gave 6,044 and 6,720 at 64, 5,037
and 5,334 at 256 (p99 TTFT 0.8-0.9 s).

This measures labkit's server front end and the load generator together. The load generator's
own ceiling (against a server that costs nothing: ``labkit.bench.fake_server`` with no delays)
is ``python -m labkit.bench.ceiling``; ``labkit bench serve`` measures it before its runs and
flags each run above 70% of it as ``client_bound``.
"""

import sys
import threading
import time

import uvicorn

from labkit.engines.base import Completion, Engine, encode_request, now
from labkit.models import load_tokenizer, resolve
from labkit.serving.http import create_app
from labkit.serving.service import InferenceService

MODEL = "smollm2-135m"


class StepEngine(Engine):
    """Tokens for free: one per live request per step, stamped like a real engine's."""

    name = "step"
    continuous = True

    def __init__(self, step_s: float) -> None:
        super().__init__(MODEL)
        self.step_s = step_s
        self.tokenizer = load_tokenizer(resolve(MODEL))  # requests are still tokenized
        self.live: list[dict] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.step_s)
            t = now()
            with self.lock:
                items = list(self.live)
            for it in items:
                it["times"].append(t)
                if it["on_token"] is not None:
                    it["on_token"](it["index"], 42, " tok", t)
                if len(it["times"]) >= it["want"]:
                    with self.lock:
                        self.live.remove(it)
                    it["done"].set()

    def generate(self, requests, on_token=None):
        start = now()
        items = [{"want": r.max_tokens, "times": [], "on_token": on_token, "index": i,
                  "done": threading.Event(), "prompt": len(encode_request(self.tokenizer, r))}
                 for i, r in enumerate(requests)]
        with self.lock:
            self.live += items
        for it in items:
            it["done"].wait()
        return [Completion(r.request_id, " tok" * len(it["times"]), [42] * len(it["times"]),
                           it["prompt"], "length", start, it["times"], now())
                for r, it in zip(requests, items)]


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8123
    step_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.003
    service = InferenceService(StepEngine(step_s), None, model_name=MODEL, max_batch_size=256)
    uvicorn.run(create_app(service, MODEL), host="127.0.0.1", port=port, log_level="warning")
