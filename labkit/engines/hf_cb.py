"""``hf-cb``: transformers' own continuous batching (``ContinuousBatchingManager``).

Iteration-level scheduling over a paged KV cache: a request joins the running batch at the next
step and leaves as soon as it ends, so short requests no longer wait for long ones and there is
no padding. One manager runs on a background thread for the engine's lifetime; requests are
added as they come (``generate`` may be called from several threads at once).

Sampling is per request: the manager samples (``do_sample=True``) with per-request logits
processors, and a greedy request is sent with ``top_k=1``, which keeps only the arg-max token.

Bounded work: the context is the model's ``max_position_embeddings`` (and no more than the paged
cache holds); a request that is cancelled or past its deadline (``Request.aborted``, polled every
``POLL_S``) is cancelled in the manager (``cancel_request``), which frees its cache blocks, and
ends with ``finish_reason == ABORTED`` and the tokens it had.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import torch

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
    truncate_at_stop,
)

POLL_S = 0.05  # how often a waiting generate looks at its requests' abort flags (s)


class HFContinuousEngine(Engine):
    """A transformers model behind a continuous batching manager."""

    name = "hf-cb"
    continuous = True

    def __init__(self, model: str, device=None, dtype: str = "auto",
                 max_batch_tokens: int | None = None, num_blocks: int | None = None) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from labkit.engines.hf import HFEngine

        super().__init__(model, device, dtype)
        self._hf = HFEngine(model, device=device, dtype=dtype)  # model, tokenizer, chat template
        self.model, self.tokenizer, self.ref = self._hf.model, self._hf.tokenizer, self._hf.ref
        self.eos_ids = self._hf.eos_ids
        torch.manual_seed(SEED)
        gen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=50,
                               max_new_tokens=256, eos_token_id=sorted(self.eos_ids),
                               pad_token_id=self.tokenizer.pad_token_id)
        if num_blocks is None and self.model.device.type == "cpu":
            num_blocks = 64  # the default sizes the paged cache from free memory: GBs on a CPU
        cb = ContinuousBatchingConfig(per_request_processors=True,
                                      max_batch_tokens=max_batch_tokens, num_blocks=num_blocks)
        self.max_model_len = self.model.config.max_position_embeddings
        if num_blocks is not None:
            self.max_model_len = min(self.max_model_len, num_blocks * cb.block_size)
        self.manager = self.model.init_continuous_batching(generation_config=gen,
                                                           continuous_batching_config=cb)
        self.manager.start()
        self._waiters: dict[str, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._router = threading.Thread(target=self._route, daemon=True, name="hf-cb-router")
        self._router.start()

    def _route(self) -> None:
        """Hand each result from the manager's one output queue to the caller waiting for it."""
        while self.manager is not None and self.manager.is_running():
            result = self.manager.get_result(timeout=0.1)
            if result is None:
                continue
            with self._lock:
                waiter = self._waiters.get(result.request_id)
            if waiter is not None:
                waiter.put(result)

    def generate(self, requests: Sequence[Request],
                 on_token: TokenCallback | None = None) -> list[Completion]:
        start = now()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        prompts = [encode_request(self.tokenizer, req) for req in requests]
        for req, prompt in zip(requests, prompts):
            check_context(req, len(prompt), self.max_model_len)
        ids = []
        for i, (req, prompt) in enumerate(zip(requests, prompts)):
            rid = f"{req.request_id}#{id(inbox)}-{i}"
            ids.append(rid)
            with self._lock:
                self._waiters[rid] = inbox
            sampling = {"top_k": 1} if req.greedy else {"temperature": req.temperature,
                                                          "top_p": req.top_p}
            self.manager.add_request(
                prompt, request_id=rid, max_new_tokens=req.max_tokens, streaming=True,
                record_timestamps=True, eos_token_id=-1 if req.ignore_eos else sorted(self.eos_ids),
                **sampling)
        index = {rid: i for i, rid in enumerate(ids)}
        seen = [0] * len(requests)
        texts = [""] * len(requests)
        finals: dict[int, object] = {}
        latest: dict[int, object] = {}  # each request's newest (streamed) result
        aborted: set[int] = set()
        try:
            while len(finals) < len(requests):
                for i, req in enumerate(requests):
                    if i not in finals and req.aborted:  # cancelled or past its deadline
                        self.manager.cancel_request(ids[i])
                        finals[i] = latest.get(i)
                        aborted.add(i)
                try:
                    result = inbox.get(timeout=POLL_S)
                except queue.Empty:
                    if not self.manager.is_running():
                        raise RuntimeError("the hf-cb generation thread stopped") from None
                    continue
                i = index[result.request_id]
                if i in finals:  # already aborted: a late result of a cancelled request
                    continue
                latest[i] = result
                if result.error:
                    raise RuntimeError(f"hf-cb request {result.request_id} failed: {result.error}")
                toks = result.generated_tokens
                if on_token is not None:
                    for k in range(seen[i], len(toks)):
                        if toks[k] in self.eos_ids and not requests[i].ignore_eos:
                            continue
                        text = self.tokenizer.decode(toks[:k + 1], skip_special_tokens=True)
                        on_token(i, toks[k], text[len(texts[i]):], result.timestamps[k])
                        texts[i] = text
                seen[i] = len(toks)
                if result.is_finished():
                    finals[i] = result
        finally:
            with self._lock:
                for rid in ids:
                    self._waiters.pop(rid, None)
        end = now()
        return [self._completion(requests[i], prompts[i], finals[i], start, end, i in aborted)
                for i in range(len(requests))]

    def _completion(self, req: Request, prompt, result, start: float, end: float,
                    aborted: bool = False) -> Completion:
        """The Completion of one request from its final result (``aborted``: its newest result
        when it was cancelled, or None if it had produced nothing yet)."""
        tokens = list(result.generated_tokens) if result is not None else []
        times = list(result.timestamps or []) if result is not None else []
        reason = ABORTED if aborted else "length"
        if tokens and tokens[-1] in self.eos_ids and not req.ignore_eos:
            tokens, times, reason = tokens[:-1], times[:-1], "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, hit_stop = truncate_at_stop(text, req.stop)
        return Completion(request_id=req.request_id, text=text, token_ids=tokens,
                          prompt_tokens=len(prompt), finish_reason="stop" if hit_stop else reason,
                          start_s=start, token_times_s=times, end_s=max(end, *times, start))

    def close(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.stop(block=True, timeout=10)
            manager.destroy()
        self._hf.close()
