"""Sampling functions against Meta's sample_top_p."""

import pytest
import torch
from llama_models.llama3 import generation as ref_generation

from lamina.engine.sampling import sample, token_logprobs


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The token ids Meta's sample_top_p can return for one row: run it with torch.multinomial forced to pick each
    kept position in turn."""
    kept, real_multinomial = [], torch.multinomial

    def capture(p, num_samples, **_):
        kept.extend(torch.nonzero(p[0] > 0).flatten().tolist())
        return torch.tensor([[0]])

    torch.multinomial = capture
    try:
        ref_generation.sample_top_p(probs[None].clone(), top_p)
        ids = set()
        for k in kept:
            torch.multinomial = lambda p, num_samples, **_: torch.tensor([[k]])
            ids.add(int(ref_generation.sample_top_p(probs[None].clone(), top_p)))
    finally:
        torch.multinomial = real_multinomial
    return ids


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 1.0])
def test_samples_lie_in_reference_nucleus(top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 3
    temperature = torch.tensor([0.7, 1.0, 1.3])
    for row in range(3):
        nucleus = reference_nucleus(torch.softmax(logits[row] / temperature[row], -1), top_p)
        draws = [
            sample(logits[row : row + 1], temperature[row : row + 1], torch.tensor([top_p]), gen).item()
            for _ in range(300)
        ]
        assert set(draws) <= nucleus


def test_sample_frequencies_match_renormalised_nucleus():
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits[0] / 0.8, -1)
    nucleus = sorted(reference_nucleus(probs, 0.8))
    expected = torch.zeros(6)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    n = 20000
    draws = sample(logits.expand(n, -1), torch.full((n,), 0.8), torch.full((n,), 0.8), gen)
    freq = torch.bincount(draws, minlength=6).float() / n
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_greedy_rows_and_generator_reproducibility():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    temperature = torch.tensor([0.0, 1.0, 0.0, 1.0])
    top_p = torch.full((4,), 0.9)
    a = sample(logits, temperature, top_p, torch.Generator().manual_seed(5))
    b = sample(logits, temperature, top_p, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax()
    assert torch.equal(sample(logits, torch.zeros(4), top_p), logits.argmax(-1))


def test_token_logprobs_equal_cross_entropy():
    logits = torch.randn(5, 30)
    tokens = torch.randint(0, 30, (5,))
    expected = -torch.nn.functional.cross_entropy(logits, tokens, reduction="none")
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
