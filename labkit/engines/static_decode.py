"""The gpt-fast recipe on a transformers model: a static KV cache and one compiled decode step.

``model.generate`` spends a large share of each decode step in Python (logits processors,
stopping criteria, cache bookkeeping, one kernel launch per op). At batch 1 a GPU finishes the
step's math faster than Python can launch it, so decode runs far below the memory-bandwidth
roofline. Two changes fix that, each a few visible lines below:

1. a **static KV cache** (fixed shape, allocated once) so every decode step has the same shapes;
2. ``torch.compile(step, mode="reduce-overhead")``, which fuses kernels and records the whole
   step as one **CUDA graph**, replayed with a single launch per token.

Compiled steps return tensors that the next replay overwrites, so we take what we need
(the next token) before calling the step again, and mark each step's start for CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StaticDecoder:
    """Greedy or sampled decoding with a static cache; ``compile=True`` adds CUDA graphs."""

    def __init__(self, model, compile: bool = False, cache_len_multiple: int = 256) -> None:
        self.model = model
        self.compiled = compile
        self.cache_len_multiple = cache_len_multiple
        self._caches: dict[tuple[int, int], object] = {}
        self._step = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True) \
            if compile else self._forward

    def _forward(self, tokens, position_ids, cache_position, attention_mask, cache):
        out = self.model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
                         cache_position=cache_position, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :]

    def _cache(self, batch: int, length: int):
        """One static cache per (batch, length) shape, reused so compiled graphs are reused."""
        from transformers import StaticCache

        key = (batch, length)
        if key not in self._caches:
            self._caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        cache = self._caches[key]
        cache.reset()
        return cache

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], pad_id: int, max_new_tokens: int,
                 pick: Callable[[torch.Tensor], torch.Tensor],
                 on_step: Callable[[torch.Tensor], bool]) -> None:
        """Decode up to ``max_new_tokens`` steps; ``pick(logits) -> next ids`` chooses tokens and
        ``on_step(ids_on_host) -> all_done`` receives each step's tokens (and may stop early)."""
        dev = self.model.device
        batch, plen = len(prompts), max(len(p) for p in prompts)
        mult = self.cache_len_multiple
        length = -(-(plen + max_new_tokens) // mult) * mult
        cache = self._cache(batch, length)
        ids = torch.full((batch, plen), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((batch, length), dtype=torch.long, device=dev)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at column plen - 1
            ids[row, plen - len(p):] = torch.tensor(p, device=dev)
            mask[row, plen - len(p):plen] = 1
        position = (mask[:, :plen].cumsum(-1) - 1).clamp(min=0)
        prefill_at = torch.arange(plen, device=dev)
        logits = self._forward(ids, position, prefill_at, mask, cache)  # prefill, not compiled
        position = position[:, -1:]
        for step in range(max_new_tokens):
            tokens = pick(logits)[:, None]
            if on_step(tokens[:, 0].cpu()) or step == max_new_tokens - 1:
                return
            col = plen + step
            mask[:, col] = 1
            position = position + 1
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(tokens, position, torch.tensor([col], device=dev), mask, cache)
