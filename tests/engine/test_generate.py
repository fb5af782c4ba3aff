"""Llama.generate / text_completion / chat_completion against Meta's reference generation loop and model."""

import pytest
import torch

from lamina import CapacityError, RequestError

from ..conftest import MAX_SEQ_LEN, reference_generate, reference_prompt_logprobs
from .test_sampling import reference_nucleus

BOS = 128000


def _prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(0, 128000, (n - 1,), generator=gen).tolist() for n in lengths]


def test_greedy_ragged_batch_equals_reference(llama, ref_llama, reference):
    prompts = _prompts([3, 9, 5, 14])
    tokens, logprobs = llama.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    ref_tokens, ref_logprobs = reference_generate(ref_llama, prompts, max_gen_len=12)
    assert tokens == ref_tokens
    for p, t, ours, theirs in zip(prompts, tokens, logprobs, ref_logprobs):
        # Meta's loop (incremental decode) drifts ~2e-4 from its own full forward pass; lamina stays within 1e-5
        # of the full forward.
        assert ours == pytest.approx(theirs, abs=1e-3)
        assert ours == pytest.approx(reference_prompt_logprobs(reference, p + t)[len(p) :], abs=5e-5)
    assert all(len(t) == 12 for t in tokens)


def test_batch_equals_prompts_one_by_one(llama):
    prompts = _prompts([7, 2, 11])
    batched, batched_lp = llama.generate(prompts, 8, temperature=0, logprobs=True)
    for p, t, lp in zip(prompts, batched, batched_lp):
        alone, alone_lp = llama.generate([p], 8, temperature=0, logprobs=True)
        assert alone[0] == t
        assert alone_lp[0] == pytest.approx(lp, abs=1e-5)


def test_echo_returns_prompt_with_teacher_forced_logprobs(llama, reference):
    prompts = _prompts([6, 10])
    tokens, logprobs = llama.generate(prompts, max_gen_len=5, temperature=0, logprobs=True, echo=True)
    for p, t, lp in zip(prompts, tokens, logprobs):
        assert t[: len(p)] == p and len(t) == len(p) + 5
        # Every logprob, prompt and generated alike, is the reference's teacher-forced value on the whole sequence.
        assert lp == pytest.approx(reference_prompt_logprobs(reference, t), abs=1e-4)
        assert lp[0] == 0.0


@pytest.mark.parametrize("lengths", [[8, 8], [5, 12]])  # equal lengths were the reference's off-by-one case
def test_scoring_with_max_gen_len_zero(llama, reference, lengths):
    prompts = _prompts(lengths, seed=4)
    tokens, logprobs = llama.generate(prompts, max_gen_len=0, logprobs=True, echo=True)
    assert tokens == prompts
    for p, lp in zip(prompts, logprobs):
        assert lp == pytest.approx(reference_prompt_logprobs(reference, p), abs=1e-4)
    assert llama.generate(prompts, max_gen_len=0, logprobs=True) == ([[], []], [[], []])
    assert llama.generate(prompts, max_gen_len=0, echo=True) == (prompts, None)


def test_stop_tokens_cut_each_sequence_like_reference(llama, ref_llama, monkeypatch):
    prompts = _prompts([4, 9, 6])
    free, _ = llama.generate(prompts, 10, temperature=0)
    stop = free[0][3]  # make the 4th token sequence 0 generates a stop token
    assert stop not in free[0][:3]
    for tokenizer in (llama.tokenizer, ref_llama.tokenizer):
        monkeypatch.setattr(tokenizer, "stop_tokens", tokenizer.stop_tokens + [stop])

    decode_batch_sizes = []
    real_decode = llama.runner.decode
    monkeypatch.setattr(
        llama.runner,
        "decode",
        lambda tokens, tables, positions: (
            decode_batch_sizes.append(len(tokens)) or real_decode(tokens, tables, positions)
        ),
    )
    results = llama.complete(prompts, 10, temperature=0)
    tokens = [r.tokens for r in results]
    assert tokens == reference_generate(ref_llama, prompts, 10)[0]
    assert tokens[0] == free[0][:3] and results[0].finish_reason == "stop"
    for t, f, r in zip(tokens[1:], free[1:], results[1:]):
        assert t == (f[: f.index(stop)] if stop in f else f)
        assert r.finish_reason == ("stop" if stop in f else "length")
    # A finished sequence leaves the batch: once sequence 0 stopped, decode steps carry fewer rows.
    assert decode_batch_sizes[0] == 3 and decode_batch_sizes[-1] < 3
    # ignore_eos (for benchmarks) runs every sequence to its length limit.
    assert [r.tokens for r in llama.complete(prompts, 10, temperature=0, ignore_eos=True)] == free


def test_stop_token_inside_echoed_prompt_is_kept(llama):
    prompt = [BOS, 1000, llama.tokenizer.eot_id, 2000, llama.tokenizer.eos_id, 3000]
    tokens, logprobs = llama.generate([prompt], 3, temperature=0, logprobs=True, echo=True)
    assert tokens[0][: len(prompt)] == prompt
    assert len(logprobs[0]) == len(tokens[0])


def test_max_gen_len_none_fills_the_context(llama):
    prompt = _prompts([MAX_SEQ_LEN - 3])[0]
    (tokens,), _ = llama.generate([prompt], None, temperature=0)
    assert len(tokens) <= 3
    (full,), _ = llama.generate([prompt], 3, temperature=0)
    assert tokens == full


def test_seeds(llama, tiny_ckpt, tokenizer_path):
    from lamina import Llama

    prompts = _prompts([5, 8])
    a = llama.generate(prompts, 10, temperature=1.0, top_p=0.95, seed=7)
    assert llama.generate(prompts, 10, temperature=1.0, top_p=0.95, seed=7) == a
    assert llama.generate(prompts, 10, temperature=1.0, top_p=0.95, seed=8) != a
    # Without a per-call seed, the stream seeded by build(seed=...) makes a whole session reproducible.
    runs = []
    for _ in range(2):
        session = Llama.build(tiny_ckpt, tokenizer_path, MAX_SEQ_LEN, 2, device="cpu", seed=3)
        runs.append([session.generate(prompts, 6, temperature=1.0) for _ in range(2)])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_sampled_tokens_lie_in_reference_nucleus(llama, reference):
    prompts = _prompts([4, 7])
    temperature, top_p = 0.9, 0.6
    tokens, _ = llama.generate(prompts, 12, temperature=temperature, top_p=top_p, echo=True, seed=11)
    for p, t in zip(prompts, tokens):
        with torch.inference_mode():
            logits = reference.forward(torch.tensor([t]), 0)[0]
        for pos in range(len(p), len(t)):
            nucleus = reference_nucleus(torch.softmax(logits[pos - 1] / temperature, -1), top_p)
            assert t[pos] in nucleus


def test_text_and_chat_completion(llama, ref_llama):
    prompts = ["The capital of France is", "Simply put, the theory of relativity states that"]
    out = llama.text_completion(prompts, temperature=0, max_gen_len=6, logprobs=True)
    ref_tokens, _ = reference_generate(ref_llama, [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts], 6)
    for o, t in zip(out, ref_tokens):
        assert set(o) == {"generation", "tokens", "logprobs"}
        assert o["generation"] == llama.tokenizer.decode(t)
        assert o["tokens"] == [llama.tokenizer.decode([x]) for x in t] and len(o["logprobs"]) == len(t)
    assert set(llama.text_completion(prompts, temperature=0, max_gen_len=2)[0]) == {"generation"}

    dialogs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]]
    (reply,) = llama.chat_completion(dialogs, temperature=0, max_gen_len=5)
    ref_tokens, _ = reference_generate(ref_llama, [llama.formatter.encode_dialog_prompt(dialogs[0])], 5)
    assert reply == {"generation": {"role": "assistant", "content": llama.tokenizer.decode(ref_tokens[0])}}


def test_empty_batch(llama):
    assert llama.generate([], 5) == ([], None)
    assert llama.generate([], 5, logprobs=True, echo=True) == ([], [])
    assert llama.text_completion([]) == []
    with pytest.raises(RequestError, match="prompts must be a list of strings"):
        llama.text_completion(None)


BAD_REQUESTS = [
    (dict(prompt_tokens=[[BOS, 5], []]), RequestError, "prompt 1 is empty"),
    (
        dict(prompt_tokens=[[BOS] * (MAX_SEQ_LEN + 1)]),
        CapacityError,
        f"prompt 0 has {MAX_SEQ_LEN + 1} tokens; max_seq_len is {MAX_SEQ_LEN}",
    ),
    (dict(prompt_tokens=[[BOS] * 60], max_gen_len=10), CapacityError, "70 tokens exceed max_seq_len 64"),
    (dict(prompt_tokens=[[BOS]] * 5), CapacityError, "batch has 5 prompts; max_batch_size is 4"),
    (dict(temperature=-0.1), RequestError, "temperature must be >= 0"),
    (dict(temperature=float("nan")), RequestError, "temperature must be a finite number"),
    (dict(top_p=0.0), RequestError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), RequestError, r"top_p must be in \(0, 1\]"),
    (dict(prompt_tokens=[[BOS, 128256]]), RequestError, r"token id 128256, outside the vocabulary \[0, 128256\)"),
    (dict(prompt_tokens=[[BOS, -1]]), RequestError, "token id -1, outside"),
    (dict(prompt_tokens=[[BOS, 1.5]]), RequestError, "not an integer"),
    (dict(prompt_tokens="hello"), RequestError, "must be a list of token-id lists"),
    (dict(prompt_tokens=["hello"]), RequestError, "prompt 0 must be a list of token ids"),
    (dict(max_gen_len=-1), RequestError, "max_gen_len must be a non-negative integer"),
    (dict(seed="x"), RequestError, "seed must be an integer"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_REQUESTS)
def test_invalid_requests_fail_before_any_work(llama, monkeypatch, kwargs, error, message):
    def no_work(*args, **kw):
        raise AssertionError("the model ran for an invalid request")

    monkeypatch.setattr(llama.runner, "prefill", no_work)
    request = dict(prompt_tokens=[[BOS, 10, 20]], max_gen_len=4) | kwargs
    with pytest.raises(error, match=message) as info:
        llama.generate(**request)
    assert isinstance(info.value, ValueError)


def test_text_completion_rejects_a_bare_string(llama):
    with pytest.raises(RequestError, match="prompts must be a list of strings"):
        llama.text_completion("hello")


def test_concurrent_streams_keep_their_own_cache_rows(llama):
    prompts = _prompts([5, 9, 7])
    alone = [llama.generate([p], 10, temperature=0)[0][0] for p in prompts[:2]]
    first = llama.stream([prompts[0]], 10, temperature=0)
    second = llama.stream([prompts[1]], 10, temperature=0)
    got = [[], []]
    for a, b in zip(first, second):  # interleaved, with a third generation in between
        got[0].append(a.token)
        got[1].append(b.token)
        llama.generate([prompts[2]], 2, temperature=0)
    assert got == alone
    second.close()  # zip stopped on `first`; `second` is suspended after its last delta, still holding its row
    # Rows are taken while a stream runs and given back when it ends or is closed.
    held = [llama.stream([p], 5, temperature=0) for p in prompts[:2]]
    for s in held:
        next(s)
    with pytest.raises(CapacityError, match="only 2 of 4 are free"):
        llama.generate(prompts[:3], 2, temperature=0)
    for s in held:
        s.close()
    assert len(llama.generate(prompts[:3], 2, temperature=0)[0]) == 3


def test_stream_reports_sequences_that_get_no_tokens(llama):
    prompt = _prompts([MAX_SEQ_LEN])[0]
    deltas = list(llama.stream([prompt, [BOS, 5]], None, temperature=0))
    assert deltas[0].index == 0 and deltas[0].finish_reason == "length" and deltas[0].token is None
    assert sum(d.finish_reason is not None for d in deltas) == 2


def test_inputs_from_numpy_and_torch(llama):
    import numpy as np

    prompts = _prompts([4, 6])
    expected = llama.generate(prompts, 3, temperature=0)
    assert llama.generate([np.array(p) for p in prompts], np.int64(3), temperature=np.float32(0)) == expected
    assert llama.generate([torch.tensor(p) for p in prompts], 3, temperature=0, seed=np.int64(1)) == expected
    with pytest.raises(RequestError, match="not an integer"):
        llama.generate([[BOS, True]], 3)


def test_extreme_but_valid_sampling_settings(llama):
    prompts = _prompts([4])
    greedy = llama.generate(prompts, 6, temperature=0)
    assert llama.generate(prompts, 6, temperature=1e-45, seed=1) == greedy  # no overflow to inf/nan
    assert llama.generate(prompts, 6, temperature=5.0, top_p=1e-9, seed=1) == greedy  # nucleus of one token


@pytest.mark.parametrize("seed", [2**70, -(2**64), "a", 1.5, True])
def test_bad_seeds(llama, tiny_ckpt, tokenizer_path, seed):
    from lamina import ConfigError, Llama

    with pytest.raises(RequestError, match="seed"):
        llama.generate([[BOS]], 2, seed=seed)
    with pytest.raises(ConfigError, match="seed"):
        Llama.build(tiny_ckpt, tokenizer_path, 16, 1, device="cpu", seed=seed)


def test_meta_build_signature(tiny_ckpt, tokenizer_path):
    from lamina import ConfigError, Llama

    # Meta's positional order: ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed
    a = Llama.build(str(tiny_ckpt), str(tokenizer_path), 32, 1, 1, 5, device="cpu")
    b = Llama.build(tiny_ckpt, tokenizer_path, 32, 1, seed=5, device="cpu")
    prompts = _prompts([3])
    assert a.generate(prompts, 4, temperature=1.0) == b.generate(prompts, 4, temperature=1.0)
    with pytest.raises(ConfigError, match="model_parallel_size=2"):
        Llama.build(tiny_ckpt, tokenizer_path, 32, 1, 2)
