"""Sampling functions against Meta's sample_top_p."""

import pytest
import torch
from llama_models.llama3 import generation as ref_generation

from lamina.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    draw,
    sample,
    token_logprobs,
    top_logprobs,
    truncate,
)
from lamina.errors import RequestError


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


# Per-request sampling (serving): against transformers' logits processors and OpenAI's penalty formula.

ROWS = [  # temperature, top_k, top_p, min_p: a batch mixing every setting, greedy rows included
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=0.0, top_k=3, top_p=0.5),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=2.0, top_k=-1, top_p=0.95, min_p=0.01),
]


def test_truncation_equals_transformers_warpers():
    from transformers.generation import logits_process as hf

    logits = torch.randn(len(ROWS), 300, generator=torch.Generator().manual_seed(3)) * 3
    batch = SamplingBatch.from_params(ROWS, 300, "cpu")
    ours = truncate(logits, batch)
    for row, p in enumerate(ROWS):
        if p.greedy:
            assert torch.equal(ours[row], logits[row])
            continue
        warpers = [hf.TemperatureLogitsWarper(p.temperature)]
        warpers += [hf.TopKLogitsWarper(p.top_k)] if p.top_k > 0 else []
        warpers += [hf.TopPLogitsWarper(p.top_p), hf.MinPLogitsWarper(p.min_p)]
        expected = logits[row : row + 1].clone()
        for w in warpers:
            expected = w(None, expected)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected[0])), row
        kept = ~torch.isinf(expected[0])
        torch.testing.assert_close(ours[row][kept], expected[0][kept])


def test_penalties_equal_openai_formula_and_transformers_repetition():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    vocab, gen = 50, torch.Generator().manual_seed(4)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5, repetition_penalty=0.8),
        SamplingParams(),
    ]
    prompts = [[1, 2, 3], [4, 4, 5], [6, 7], [8]]
    outputs = [[2, 9, 9, 9], [5, 10], [11, 11, 6], [8, 8]]
    logits = torch.randn(4, vocab, generator=gen) * 2
    counts = torch.zeros(4, vocab, dtype=torch.int32)
    seen = torch.zeros(4, vocab, dtype=torch.bool)
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        for t in output:
            counts[row, t] += 1
        seen[row, prompt + output] = True
    ours = apply_penalties(logits, counts, seen, SamplingBatch.from_params(params, vocab, "cpu"))
    for row, p in enumerate(params):
        expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
            torch.tensor([prompts[row] + outputs[row]]), logits[row : row + 1].clone()
        )[0]
        for token in range(vocab):  # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence, output tokens only
            c = outputs[row].count(token)
            expected[token] -= c * p.frequency_penalty + (c > 0) * p.presence_penalty
        torch.testing.assert_close(ours[row], expected)


def test_logit_bias_and_its_vocabulary_check():
    logits = torch.zeros(2, 10)
    params = [SamplingParams(logit_bias={3: 5.0, 7: -100}), SamplingParams(logit_bias={3: 1.5})]
    biased = apply_logit_bias(logits, SamplingBatch.from_params(params, 10, "cpu"))
    expected = torch.zeros(2, 10)
    expected[0, 3], expected[0, 7], expected[1, 3] = 5.0, -100.0, 1.5
    assert torch.equal(biased, expected) and torch.equal(logits, torch.zeros(2, 10))
    with pytest.raises(RequestError, match="logit_bias token id 10 is not in the vocabulary"):
        SamplingBatch.from_params([SamplingParams(logit_bias={10: 1.0})], 10, "cpu")


def _seeded_tokens(companions: list[SamplingParams], steps: int = 5) -> list[int]:
    """Tokens drawn for a seeded request in row 1, next to `companions`, over a few steps of fixed logits."""
    params = [companions[0], SamplingParams(temperature=1.0, seed=7), *companions[1:]]
    generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    logits = torch.randn(len(params), 1000, generator=torch.Generator().manual_seed(5))
    batch = SamplingBatch.from_params(params, 1000, "cpu")
    return [draw(truncate(logits, batch), batch, generators)[1].item() for _ in range(steps)]


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch():
    alone = _seeded_tokens([SamplingParams(temperature=0.0)])
    crowded = _seeded_tokens([SamplingParams(temperature=1.5, seed=1), SamplingParams(top_k=3), SamplingParams()])
    assert alone == crowded and len(set(alone)) > 1


def test_draws_follow_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    n = 20000
    params = [SamplingParams(temperature=0.8, top_k=4)] * n
    batch = SamplingBatch.from_params(params, 6, "cpu")
    truncated = truncate(logits.expand(n, -1), batch)
    tokens = draw(truncated, batch, [torch.Generator().manual_seed(i) for i in range(n)])
    expected = torch.softmax(truncated[0], -1)
    assert expected[4:].sum() == 0
    torch.testing.assert_close(torch.bincount(tokens, minlength=6).float() / n, expected, atol=0.015, rtol=0)


def test_top_logprobs():
    logits = torch.randn(3, 40)
    values, ids = top_logprobs(logits, 5)
    expected = torch.log_softmax(logits, -1)
    assert torch.equal(ids[:, 0], logits.argmax(-1))
    torch.testing.assert_close(values, expected.gather(-1, ids))
    assert (values[:, :-1] >= values[:, 1:]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, r"temperature must be in \[0, inf\), got -0.1"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be between -1 and any, got -2"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \(0, inf\)"),
        ({"logit_bias": {5: 200}}, r"logit_bias\[5\] must be in \[-100, 100\]"),
        ({"logit_bias": {-1: 1}}, "logit_bias token id must be between 0"),
        ({"logit_bias": [1, 2]}, "logit_bias must map token ids to numbers"),
        ({"max_tokens": 0}, "max_tokens must be between 1"),
        ({"stop": ["ok", ""]}, "stop must be non-empty strings"),
        ({"top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
        ({"logprobs": "yes"}, "logprobs must be true or false"),
        ({"n": 0}, "n must be between 1"),
        ({"seed": "7"}, "seed must be an integer"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise():
    p = SamplingParams(stop="END", stop_token_ids=[5], logit_bias={3: 1})
    assert p.stop == ("END",) and p.stop_token_ids == (5,) and dict(p.logit_bias) == {3: 1.0}
    assert hash(p) == hash(SamplingParams(stop="END", stop_token_ids=[5], logit_bias={3: 1}))
