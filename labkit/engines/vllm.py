"""``vllm``: vLLM's ``LLMEngine`` (paged attention, continuous batching, CUDA graphs).

We drive ``LLMEngine`` ourselves rather than ``vllm.LLM.generate``: one thread owns the engine
and calls ``step()``; requests from any thread join the running batch at the next step, and each
step's new tokens are stamped on arrival. That one loop serves offline batches (``generate``),
streaming (``on_token``) and the serving lab's concurrent clients alike, and gives every engine
the same per-token timestamps. (``vllm.LLM`` is this loop without the stamps; ``AsyncLLM`` is
this loop on asyncio.)

Bounded work: prompt + ``max_tokens`` beyond ``max_model_len`` is refused before the request is
queued; a request that is cancelled or past its deadline (``Request.aborted``) is aborted in
vLLM (``abort_request``) at the next step and ends with ``finish_reason == ABORTED``.

Set ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` on machines where the engine-core subprocess hangs at
start (seen on the course's GPU machine); labkit sets it when unset.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from labkit.config import SEED
from labkit.engines.base import (
    ABORTED,
    Completion,
    Engine,
    Request,
    TokenCallback,
    check_context,
    encode_request,
    now,
)


@dataclass
class _Pending:
    request: Request
    prompt: list[int]
    on_token: TokenCallback | None
    index: int
    done: threading.Event
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None


class VLLMEngine(Engine):
    """A vLLM engine stepped by one background thread."""

    name = "vllm"
    continuous = True

    def __init__(self, model: str, device=None, dtype: str = "auto", *,
                 enforce_eager: bool = False, enable_prefix_caching: bool | None = None,
                 quantization: str | None = None, gpu_memory_utilization: float = 0.85,
                 max_model_len: int = 4096, max_num_seqs: int = 256,
                 tensor_parallel_size: int = 1,
                 distributed_executor_backend: str | None = None) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ImportError("engine 'vllm' needs vLLM (a CUDA GPU and `pip install "
                              "'labkit[gpu]'`); on this machine use --engine hf or hf-cb") from None
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import EngineArgs, LLMEngine

        from labkit.models import eos_token_ids, load_tokenizer, resolve

        super().__init__(model, device, dtype)
        self.ref = resolve(model)
        self.tokenizer = load_tokenizer(self.ref)
        args = EngineArgs(model=self.ref.path, tokenizer=self.ref.path,
                          dtype="auto" if dtype == "auto" else dtype, seed=SEED,
                          enforce_eager=enforce_eager, quantization=quantization,
                          gpu_memory_utilization=gpu_memory_utilization,
                          max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          tensor_parallel_size=tensor_parallel_size,
                          # TP workers as local processes, also inside a Ray Serve replica
                          # (vLLM's Ray backend would ask Ray for GPUs the replica already holds)
                          distributed_executor_backend=distributed_executor_backend or (
                              "mp" if tensor_parallel_size > 1 else None),
                          enable_prefix_caching=enable_prefix_caching)
        self._start(LLMEngine.from_engine_args(args), max_model_len,
                    eos_token_ids(self.ref, self.tokenizer))

    def _start(self, llm, max_model_len: int, eos_ids: set[int]) -> None:
        """Take ``llm`` (a ``vllm.LLMEngine``, or anything with its ``add_request``/``step``)
        and start the thread that steps it; ``eos_ids`` end a generation (as in ``hf``)."""
        self.llm, self.max_model_len, self.eos_ids = llm, max_model_len, eos_ids
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Pending] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="vllm-step")
        self._thread.start()

    def _sampling_params(self, req: Request):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                              top_p=req.top_p if not req.greedy else 1.0, seed=req.seed,
                              stop=req.stop, ignore_eos=req.ignore_eos)

    def _loop(self) -> None:
        """Add waiting requests, step the engine, stamp each new token, finish requests."""
        from vllm.inputs import TokensPrompt

        while not self._closed.is_set():
            block = not self._live
            try:
                while True:
                    item: _Pending = self._inbox.get(timeout=0.05) if block else \
                        self._inbox.get_nowait()
                    block = False
                    rid = f"{item.request.request_id}#{id(item)}"
                    try:
                        self.llm.add_request(rid, TokensPrompt(prompt_token_ids=item.prompt),
                                             self._sampling_params(item.request))
                    except Exception as err:  # vLLM refused it: fail this caller, keep stepping
                        item.error = err
                        item.done.set()
                    else:
                        self._live[rid] = item
            except queue.Empty:
                pass
            if not self._live:
                continue
            self._abort_stopped()
            if not self._live:
                continue
            try:
                outputs = self.llm.step()
            except BaseException as err:  # fail every caller instead of hanging them
                for item in self._live.values():
                    item.error = err
                    item.done.set()
                self._live.clear()
                continue
            t = now()
            for out in outputs:
                item = self._live.get(out.request_id)
                if item is None:
                    continue
                seq = out.outputs[0]
                new = list(seq.token_ids)[len(item.tokens):]
                for tok in new:
                    item.tokens.append(tok)
                    item.times.append(t)
                if item.on_token is not None and new:
                    item.on_token(item.index, new[-1], seq.text[len(item.text):], t)
                item.text = seq.text
                if out.finished:
                    item.finish_reason = seq.finish_reason or "length"
                    del self._live[out.request_id]
                    item.done.set()

    def _abort_stopped(self) -> None:
        """Abort in vLLM the live requests that were cancelled or passed their deadline."""
        stopped = [rid for rid, item in self._live.items() if item.request.aborted]
        if stopped:
            self.llm.abort_request(stopped)
        for rid in stopped:
            item = self._live.pop(rid)
            item.finish_reason = ABORTED
            item.done.set()

    def generate(self, requests: Sequence[Request],
                 on_token: TokenCallback | None = None) -> list[Completion]:
        if self._closed.is_set():
            raise RuntimeError("this vllm engine is closed")
        start = now()
        items = [_Pending(r, encode_request(self.tokenizer, r), on_token, i, threading.Event())
                 for i, r in enumerate(requests)]
        for item in items:
            check_context(item.request, len(item.prompt), self.max_model_len)
        for item in items:
            self._inbox.put(item)
        for item in items:
            item.done.wait()
            if item.error is not None:
                raise RuntimeError(f"vLLM failed on {item.request.request_id}: {item.error}")
        end = now()
        return [self._completion(item, start, end) for item in items]

    def _completion(self, item: _Pending, start: float, end: float) -> Completion:
        tokens, times = item.tokens, item.times
        if tokens and tokens[-1] in self.eos_ids and not item.request.ignore_eos:
            tokens, times = tokens[:-1], times[:-1]  # same convention as hf: EOS is not output
        return Completion(request_id=item.request.request_id, text=item.text, token_ids=tokens,
                          prompt_tokens=len(item.prompt), finish_reason=item.finish_reason,
                          start_s=start, token_times_s=times, end_s=end)

    def close(self) -> None:
        """Stop the step thread, shut the engine core down and free its GPU memory (vLLM's own
        tests do the same between LLMs). A second engine started in this process afterwards can
        still fail to capture its CUDA graphs (PyTorch's ``use_count > 0`` allocator assert on an
        H200: vLLM keeps one graph memory pool per process); start it as a ``ProcessEngine``."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=10)
        engine, self.llm = self.llm, None
        engine.engine_core.shutdown()
        del engine
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        gc.collect()
        cleanup_dist_env_and_memory()
