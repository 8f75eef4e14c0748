"""``BaselineApp``: the capstone's (lab 07) slow but correct application, the one to optimize.

Every caller gets the greedy answer the engine gives for that request on its own, cut to the
request's ``max_tokens``: that makes it the quality reference of the capstone's gate
(``labkit.bench.capstone``). It is slow on purpose, in ways the earlier labs taught; lab 07 asks
students to find out where its time goes by profiling it, so this docstring does not list them.

The interface is the one ``labkit.bench.capstone`` measures, and ``InferenceService`` has it too,
so either can be a capstone step::

    completion = await app.complete(request)   # this request's Completion, token stamps included
    await app.aclose()                         # release what the app owns (not the engine)
"""

from __future__ import annotations

import dataclasses

from labkit.engines.base import Completion, Engine, Request, truncate_at_stop

APP_MAX_TOKENS = 10  # tokens the baseline generates per request (the ci capstone workload's)


def cut_to_request(completion: Completion, request: Request, tokenizer) -> Completion:
    """``completion`` cut to ``request.max_tokens`` tokens: its first tokens, their stamps and
    their text (then cut at the request's stop strings). Greedy decoding makes this the answer the
    engine gives when asked for ``request.max_tokens`` tokens in the first place."""
    n = request.max_tokens
    if completion.output_tokens <= n:
        return completion
    ids = list(completion.token_ids[:n])
    text, stopped = truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True),
                                     request.stop)
    return dataclasses.replace(completion, text=text, token_ids=ids,
                               token_times_s=list(completion.token_times_s[:n]),
                               finish_reason="stop" if stopped else "length")


class BaselineApp:
    """The capstone's application: correct answers, slowly (see the module doc).

    ``engine``: any labkit Engine with a ``tokenizer`` (hf, hf-cb, vllm); it stays the caller's.
    ``max_tokens``: how many tokens the app generates for each request before cutting the answer
    to what the caller asked for (tokens, >= 1).
    """

    def __init__(self, engine: Engine, max_tokens: int = APP_MAX_TOKENS) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 (tokens), got {max_tokens!r}")
        self.engine, self.max_tokens = engine, max_tokens

    def render(self, request: Request) -> Request:
        """The request the engine is given: the caller's, with the app's own output length."""
        return dataclasses.replace(request, max_tokens=max(self.max_tokens, request.max_tokens))

    async def complete(self, request: Request) -> Completion:
        """Answer one request: the engine generates it on its own, then the answer is cut to the
        caller's ``max_tokens``."""
        [completion] = self.engine.generate([self.render(request)])
        return cut_to_request(completion, request, self.engine.tokenizer)

    async def aclose(self) -> None:
        """Nothing to release: the engine belongs to the caller."""
