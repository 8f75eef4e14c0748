"""Perplexity and agreement: the definitions, checked on cases whose answer is known exactly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from labkit import quality


class UniformModel(torch.nn.Module):
    """Equal logits over V tokens: every next token has probability 1/V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class KnowsNextModel(torch.nn.Module):
    """Puts probability p on the true next token of a fixed sequence, the rest evenly."""

    def __init__(self, sequence: list[int], vocab: int, p: float) -> None:
        super().__init__()
        self.next_of = {i: t for i, t in enumerate(sequence[1:])}
        self.sequence, self.vocab, self.p = sequence, vocab, p

    def forward(self, input_ids):
        # locate the chunk in the sequence by its first token's position (tokens are unique)
        start = self.sequence.index(int(input_ids[0, 0]))
        rest = math.log((1 - self.p) / (self.vocab - 1))
        logits = torch.full((*input_ids.shape, self.vocab), rest)
        for j in range(input_ids.shape[1]):
            if start + j in self.next_of:
                logits[0, j, self.next_of[start + j]] = math.log(self.p)
        return SimpleNamespace(logits=logits)


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    ids = [i % 50 for i in range(100)]
    assert quality.perplexity(UniformModel(50), ids, window=16, stride=8) == pytest.approx(50,
                                                                                          rel=1e-9)


def test_every_token_is_scored_once_across_overlapping_windows():
    # probability p on each true next token: perplexity is exactly 1/p however we window it
    seq = list(range(40))
    for window, stride in [(40, 40), (8, 8), (8, 3), (5, 1)]:
        ppl = quality.perplexity(KnowsNextModel(seq, vocab=64, p=0.5), seq, window, stride)
        assert ppl == pytest.approx(2.0, rel=1e-6), (window, stride)


def test_stride_sets_the_number_of_forward_passes():
    model = UniformModel(10)
    quality.perplexity(model, [i % 10 for i in range(101)], window=20, stride=10)
    assert model.calls == 10  # 100 scored tokens, 10 new per window


def test_bad_window_is_rejected_with_the_values():
    with pytest.raises(ValueError, match="stride=9, window=8"):
        quality.perplexity(UniformModel(4), [1, 2, 3], window=8, stride=9)


def test_agreement_counts_exact_matches_and_matching_prefixes():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    out = [[1, 2, 3, 4], [5, 6, 0, 8]]
    assert quality.agreement(ref, out) == {"exact": 0.5, "mean_prefix_tokens": 3.0}


def test_eval_text_is_a_few_thousand_tokens():
    text = quality.eval_text()
    assert 1500 <= len(text.split()) <= 3000
