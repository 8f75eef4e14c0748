"""Is a batched greedy output "the same" as the unbatched one? Exactly, or parted at a near-tie.

Padding and batch shape change the order of floating-point sums, so two greedy runs of the same
prompt can pick different tokens where the two best logits are (almost) equal; after that the
texts differ. vLLM documents the same: outputs are not batch-invariant by default. A correct
batching system therefore matches the unbatched output exactly, *or* parts from it only at a step
where the top two logits were within a small tolerance. Anything else is a real bug (a caller
given another request's tokens, say).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEAR_TIE_LOGIT_GAP = 1e-3  # fp32 reordering moves logits by ~1e-5; a flip needs a gap this small


@dataclass(frozen=True)
class Divergence:
    """Where two greedy outputs of one prompt part, and how close the choice was there."""

    step: int  # index of the first differing output token
    reference_token: int | None  # None: the reference ended here
    other_token: int | None
    top2_gap: float  # logit(best) - logit(second best) at that step, from an unbatched forward

    @property
    def near_tie(self) -> bool:
        return self.top2_gap <= NEAR_TIE_LOGIT_GAP


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def divergence(model, prompt_ids: list[int], reference: list[int],
               other: list[int], eos_id: int | None = None) -> Divergence | None:
    """None if the outputs are equal, else where they part and the top-2 logit gap there.

    An output that ended early (EOS, not kept in the token list) is read as choosing ``eos_id``.
    """
    step = first_difference(reference, other)
    if step is None:
        return None
    ids = torch.tensor([prompt_ids + reference[:step]], device=model.device)
    logits = model(ids).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    pick = lambda seq: seq[step] if step < len(seq) else eos_id  # noqa: E731
    return Divergence(step, pick(reference), pick(other), float(top[0] - top[1]))


@torch.inference_mode()
def smallest_top2_gap(model, prompt_ids: list[int], output: list[int]) -> float | None:
    """The smallest logit(best) - logit(second best) over the steps that produced ``output``
    from ``prompt_ids`` (one unbatched forward pass); None for an empty output. The smaller it
    is, the closer that greedy output came to a flip under another batch shape (lab 02)."""
    if not output:
        return None
    ids = torch.tensor([prompt_ids + output], device=model.device)
    top = torch.topk(model(ids).logits[0, len(prompt_ids) - 1:-1].float(), 2).values
    return float((top[:, 0] - top[:, 1]).min())


def assert_same_or_near_tie(model, prompt_ids: list[int], reference: list[int],
                            other: list[int], eos_id: int | None = None,
                            label: str = "") -> Divergence | None:
    """Raise AssertionError unless ``other`` equals ``reference`` or parts at a near-tie."""
    d = divergence(model, prompt_ids, reference, other, eos_id)
    if d is not None and not d.near_tie:
        raise AssertionError(
            f"{label}: greedy outputs part at step {d.step} (reference token "
            f"{d.reference_token}, got {d.other_token}) where the top-2 logit gap is "
            f"{d.top2_gap:.3g} > {NEAR_TIE_LOGIT_GAP}: not a floating-point tie, a real bug")
    return d
