"""The compiled decode step gives the same tokens and logprobs as the eager one."""

import dataclasses

import pytest

from lamina import Llama

from .test_generate import _prompts


def test_compiled_decode_equals_eager(llama, monkeypatch):
    compiled = Llama(llama.model, llama.tokenizer, dataclasses.replace(llama.config, compile=True))
    prompts = _prompts([3, 9, 5])
    # Make sequence 1 stop early (so later steps run on non-contiguous cache rows, another compiled variant).
    free, _ = llama.generate(prompts, 10, temperature=0)
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", llama.tokenizer.stop_tokens + [free[1][2]])
    expected_tokens, expected_lps = llama.generate(prompts, 10, temperature=0, logprobs=True)
    tokens, lps = compiled.generate(prompts, 10, temperature=0, logprobs=True)
    assert tokens == expected_tokens and len(tokens[1]) < 10
    for ours, theirs in zip(lps, expected_lps):
        assert ours == pytest.approx(theirs, abs=1e-4)
