"""labkit.equivalence: where batched and unbatched greedy outputs part, and how close the
choice was along an output (lab 02's batch-invariance table), on a model of known logits."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from labkit.equivalence import divergence, first_difference, smallest_top2_gap


class KnownLogits:
    """A "model" whose logits at position i put ``gaps[i]`` between token 0 and token 1."""

    device = torch.device("cpu")

    def __init__(self, gaps: list[float]) -> None:
        self.gaps = gaps

    def __call__(self, ids: torch.Tensor):
        n = ids.shape[1]
        logits = torch.zeros(1, n, 4)
        for i in range(n):
            logits[0, i, 0] = self.gaps[i] if i < len(self.gaps) else 5.0
        return SimpleNamespace(logits=logits)


def test_smallest_top2_gap_reads_the_steps_that_produced_the_output():
    # prompt of 2 tokens, output of 3: the steps are positions 1, 2, 3 (position 0 is not a step)
    model = KnownLogits([0.001, 0.5, 0.2, 0.9, 0.0001])
    assert abs(smallest_top2_gap(model, [7, 7], [0, 0, 0]) - 0.2) < 1e-6
    assert smallest_top2_gap(model, [7, 7], []) is None


def test_divergence_names_the_step_and_its_gap():
    model = KnownLogits([1.0, 1e-4, 1.0, 1.0])   # the step after prompt + 1 token is a tie
    assert first_difference([0, 0, 1], [0, 0, 1]) is None
    d = divergence(model, [7], [0, 0], [0, 1])
    assert d.step == 1 and d.near_tie and d.reference_token == 0 and d.other_token == 1
    assert divergence(model, [7], [0, 0], [0, 0]) is None
