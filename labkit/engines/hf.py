"""``hf``: transformers ``generate`` with static batching (left padding) and per-token stamps.

A static batch starts together and returns together: every request waits for the longest one,
and padding tokens cost compute. Requests whose sampling parameters differ run as separate
``generate`` calls (one GenerationConfig per call), so each gets exactly what it asked for.

``static_cache=True`` switches from ``generate`` to labkit's lean decode loop over a fixed-size KV
cache, and ``compile=True`` also compiles its decode step into a CUDA graph: the gpt-fast recipe
(see ``static_decode.py``), for the profiling lab's speed paths.

Bounded work: the context is the model's ``max_position_embeddings``; a request that is
cancelled or past its deadline (``Request.aborted``) is stopped by the tracker, which is also
``generate``'s stopping criterion (checked after every decode step), and ends with
``finish_reason == ABORTED``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import StoppingCriteriaList

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
from labkit.engines.static_decode import StaticDecoder


class _Tracker:
    """Receives each decode step's tokens from ``generate`` (streamer API), stamps them, and
    knows when each row is done (EOS, its own max_tokens, a stop string, or aborted)."""

    def __init__(self, engine: HFEngine, requests: Sequence[Request], on_token, offset: int):
        self.engine, self.requests, self.on_token, self.offset = engine, requests, on_token, offset
        n = len(requests)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.times: list[list[float]] = [[] for _ in range(n)]
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.prompt_seen = False

    # --- streamer protocol: generate calls put(prompt ids), then put(next tokens) per step ---
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        t = now()  # value is already on the host: generate passes next_tokens.cpu()
        self._abort_check()
        for i, tok in enumerate(value.tolist()):
            if self.finish[i] is None:
                self._add(i, int(tok), t)

    def end(self) -> None:
        pass

    def _add(self, i: int, tok: int, t: float) -> None:
        req = self.requests[i]
        if tok in self.engine.eos_ids and not req.ignore_eos:
            self.finish[i] = "stop"
            return
        self.tokens[i].append(tok)
        self.times[i].append(t)
        if self.on_token is not None or req.stop:
            text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            delta, self.texts[i] = text[len(self.texts[i]):], text
            if self.on_token is not None:
                self.on_token(self.offset + i, tok, delta, t)
            if req.stop and truncate_at_stop(text, req.stop)[1]:
                self.finish[i] = "stop"
                return
        if len(self.tokens[i]) >= req.max_tokens:
            self.finish[i] = "length"

    def _abort_check(self) -> None:
        """Rows whose request was cancelled or passed its deadline are done (ABORTED)."""
        for i, req in enumerate(self.requests):
            if self.finish[i] is None and req.aborted:
                self.finish[i] = ABORTED

    @property
    def all_done(self) -> bool:
        return all(f is not None for f in self.finish)

    # --- StoppingCriteria protocol: stop the whole batch once every row is done ---
    def __call__(self, input_ids: torch.Tensor, scores=None, **kw) -> torch.Tensor:
        self._abort_check()
        return torch.full((input_ids.shape[0],), self.all_done, dtype=torch.bool,
                          device=input_ids.device)


class HFEngine(Engine):
    """transformers ``model.generate`` on padded static batches."""

    name = "hf"

    def __init__(self, model: str, device=None, dtype: str = "auto",
                 static_cache: bool = False, compile: bool = False) -> None:
        from labkit.models import load_model

        super().__init__(model, device, dtype)
        self.model, self.tokenizer, self.ref = load_model(model, device, dtype)
        self.device = self.model.device
        if compile and not static_cache:
            raise ValueError("compile=True needs static_cache=True (CUDA graphs need fixed shapes)")
        self.decoder = StaticDecoder(self.model, compile=compile) if static_cache else None
        self.max_model_len = self.model.config.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def generate(self, requests: Sequence[Request],
                 on_token: TokenCallback | None = None) -> list[Completion]:
        start = now()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[(req.sampling_key(), req.ignore_eos)].append(i)
        out: list[Completion | None] = [None] * len(requests)
        for idx in groups.values():
            done = self._generate_group([requests[i] for i in idx], start, on_token, idx)
            for i, completion in zip(idx, done):
                out[i] = completion
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_group(self, reqs: list[Request], start: float, on_token, idx) -> list[Completion]:
        prompts = [encode_request(self.tokenizer, r) for r in reqs]
        for r, p in zip(reqs, prompts):
            check_context(r, len(p), self.max_model_len)
        batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        tracker = _Tracker(self, reqs, _remap(on_token, idx), 0)
        first = reqs[0]
        max_new = max(r.max_tokens for r in reqs)
        if self.decoder is not None:
            tracker.prompt_seen = True
            generator = None if first.greedy else torch.Generator(self.device).manual_seed(
                first.seed if first.seed is not None else SEED)
            self.decoder.generate(prompts, self.tokenizer.pad_token_id, max_new,
                                  pick=lambda logits: pick_token(logits, first, generator),
                                  on_step=lambda toks: tracker.put(toks) or tracker.all_done)
            end = now()
            return [self._completion(r, len(p), tracker, i, start, end)
                    for i, (r, p) in enumerate(zip(reqs, prompts))]
        kwargs = dict(max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id,
                      streamer=tracker, stopping_criteria=StoppingCriteriaList([tracker]))
        if first.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(first.seed if first.seed is not None else SEED)
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p,
                          top_k=None)
        if first.ignore_eos:
            kwargs["min_new_tokens"] = max_new
        self.model.generate(**batch, **kwargs)
        end = now()
        return [self._completion(r, len(p), tracker, i, start, end)
                for i, (r, p) in enumerate(zip(reqs, prompts))]

    def _completion(self, req, prompt_len, tracker, i, start, end) -> Completion:
        tokens, times = tracker.tokens[i], tracker.times[i]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, hit_stop = truncate_at_stop(text, req.stop)
        reason = tracker.finish[i] or "length"
        return Completion(request_id=req.request_id, text=text, token_ids=tokens,
                          prompt_tokens=prompt_len, finish_reason="stop" if hit_stop else reason,
                          start_s=start, token_times_s=times, end_s=end)

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _remap(on_token: TokenCallback | None, idx: list[int]) -> TokenCallback | None:
    """Translate a group's row index back to the caller's request index."""
    if on_token is None:
        return None
    return lambda i, tok, delta, t: on_token(idx[i], tok, delta, t)


def pick_token(logits: torch.Tensor, req: Request, generator=None) -> torch.Tensor:
    """Next token per row: arg-max when greedy, else temperature + top-p (nucleus) sampling."""
    if req.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > req.top_p  # keep the smallest set above top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
