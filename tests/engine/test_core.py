"""The engine core: requests that join the running batch at any step (prompts chunked under a token budget) give
the tokens offline `generate` gives; seeded requests draw the same tokens whatever shares the batch; stop strings,
stop tokens, logprobs, prompt logprobs, aborts and the bounded queue."""

import dataclasses

import pytest
import torch

from lamina import ConfigError
from lamina.engine import EngineCore
from lamina.engine.sampling import SamplingParams
from lamina.errors import CapacityError, RequestError

from ..conftest import reference_prompt_logprobs
from .test_generate import _prompts


def Engine(llama, *, seed: int = 0, **config) -> EngineCore:
    """A core of its own over `llama`'s model (its own KV cache: 16-position blocks unless told otherwise)."""
    config = dataclasses.replace(llama.config, **({"block_size": 16} | config))
    engine = EngineCore(llama.model, llama.tokenizer, config, seed=seed)
    engine.llama = llama
    return engine


def add(engine: EngineCore, prompt, params, request_id=None):
    request = engine.llama.new_request(prompt, params, request_id=request_id)
    engine.add(request)
    return request.request_id


def run(engine: EngineCore, arrivals: dict[int, list], max_steps: int = 500) -> dict:
    """Add requests at the given steps (step -> [(id, prompt, params)]) and step until done: id -> outputs."""
    outputs: dict = {}
    for step in range(max_steps):
        for request_id, prompt, params in arrivals.get(step, []):
            add(engine, prompt, params, request_id)
        if not engine.has_work and step > max(arrivals):
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def tokens_of(outs) -> list[int]:
    return [o.token for o in outs if o.token is not None]


def test_requests_joining_at_any_step_get_offline_greedy_tokens(llama):
    prompts = _prompts([3, 9, 5, 12, 1, 7])
    expected = [llama.generate([p], 8, temperature=0)[0][0] for p in prompts]
    engine = Engine(llama, max_step_tokens=8)  # long prompts go in chunks, sharing steps with decodes
    greedy = SamplingParams(temperature=0, max_tokens=8)
    arrivals = {0: [(i, prompts[i], greedy) for i in range(3)], 2: [(3, prompts[3], greedy)]}
    arrivals[4] = [(i, prompts[i], greedy) for i in (4, 5)]  # more than the 4 cache rows: these wait their turn
    outputs = run(engine, arrivals)
    assert [tokens_of(outputs[i]) for i in range(6)] == expected
    for i in range(6):
        assert outputs[i][-1].finish_reason in ("stop", "length")
        assert all(o.finish_reason is None for o in outputs[i][:-1])
    assert engine.pool.num_used == 0 and not engine.has_work


def test_a_seeded_request_draws_the_same_tokens_in_any_company(llama):
    prompt = _prompts([6])[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=10)
    alone = run(Engine(llama, seed=1), {0: [("s", prompt, seeded)]})["s"]
    others = [(f"o{i}", p, SamplingParams(temperature=1.2, max_tokens=6)) for i, p in enumerate(_prompts([4, 8]))]
    crowded = run(Engine(llama, seed=2), {0: others[:1], 1: [("s", prompt, seeded)], 2: others[1:]})["s"]
    assert tokens_of(alone) == tokens_of(crowded)


def test_stop_strings_end_the_text_before_them(llama):
    prompt = _prompts([5], seed=3)[0]
    free = run(Engine(llama), {0: [("a", prompt, SamplingParams(temperature=0, max_tokens=12))]})["a"]
    text = "".join(o.text for o in free)
    assert text == llama.tokenizer.decode(tokens_of(free))
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # somewhere in the middle, likely across a token boundary
    assert stop.strip(), text
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop])
    cut = run(Engine(llama), {0: [("a", prompt, params)]})["a"]
    assert "".join(o.text for o in cut) == text[: text.find(stop)]
    assert cut[-1].finish_reason == "stop"


def test_logprobs_and_alternatives(llama):
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    outs = run(Engine(llama), {0: [("a", _prompts([4])[0], params)]})["a"]
    for o in outs:
        if o.token is None:
            continue
        assert len(o.top_logprobs) == 3 and o.top_logprobs[0][0] == o.token  # greedy: the most probable
        assert o.logprob == pytest.approx(o.top_logprobs[0][1])
        assert [lp for _, lp in o.top_logprobs] == sorted((lp for _, lp in o.top_logprobs), reverse=True)


def test_penalties_change_a_greedy_continuation(llama):
    prompt = _prompts([4], seed=5)[0]
    plain = run(Engine(llama), {0: [("a", prompt, SamplingParams(temperature=0, max_tokens=16))]})["a"]
    params = SamplingParams(temperature=0, max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0)
    penalised = run(Engine(llama), {0: [("a", prompt, params)]})["a"]
    tokens = tokens_of(penalised)
    assert tokens != tokens_of(plain) or len(set(tokens)) == len(tokens)
    biased = SamplingParams(temperature=0, max_tokens=3, logit_bias={42: 100.0})
    assert tokens_of(run(Engine(llama), {0: [("b", prompt, biased)]})["b"]) == [42, 42, 42]


def test_aborts_free_rows_and_the_queue_is_bounded(llama):
    engine = Engine(llama, max_waiting=2)
    params = SamplingParams(temperature=0, max_tokens=20)
    prompts = _prompts([3, 4, 5, 6, 7, 8])
    for i in range(6):  # four for the four cache rows, two beyond
        add(engine, prompts[i], params, request_id=i)
    engine.step()
    assert engine.pool.num_used == 4 and len(engine.scheduler.waiting) == 2
    with pytest.raises(CapacityError, match="queue is full"):
        add(engine, [1, 2], params)
    engine.abort(0)
    engine.abort(5)  # waiting
    assert engine.pool.num_used == 3
    while engine.has_work:
        engine.step()
    assert engine.pool.num_used == 0


def test_bad_requests(llama):
    engine = Engine(llama)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        add(engine, [1, 10**9], SamplingParams())
    with pytest.raises(RequestError, match="not in the vocabulary"):
        add(engine, [1, 2], SamplingParams(logit_bias={10**7: 1.0}))
    with pytest.raises(RequestError, match="max_seq_len is 64"):
        add(engine, list(range(1, 70)), SamplingParams())
    assert not engine.has_work and torch.equal(torch.tensor(engine.pool.num_used), torch.tensor(0))


def test_default_model_through_the_native_step(monkeypatch):
    """The default model (GGUF blocks: the C step for decode chunks and prompt chunks; a step with both runs them in
    one pass)."""
    import lamina

    model = lamina.load(max_batch_size=2, max_seq_len=256)
    prompts = [model.tokenizer.encode(t, bos=False, eos=False) for t in ("The capital of France is", "1, 2, 3, 4,")]
    prompts.append(model.tokenizer.encode("Once upon a time, in a land far away, there lived a", bos=False, eos=False))
    expected = [model.generate([p], 10, temperature=0)[0][0] for p in prompts]
    engine = Engine(model, max_step_tokens=6)
    if engine.runner.native is not None:  # count the steps that ran prompt chunks and decode rows together
        fused, rows = [], engine.runner.rows
        monkeypatch.setattr(engine.runner, "rows", lambda *a: fused.append(len(a[0])) or rows(*a))
    greedy = SamplingParams(temperature=0, max_tokens=10)
    outputs = run(engine, {0: [(0, prompts[0], greedy), (1, prompts[1], greedy)], 3: [(2, prompts[2], greedy)]})
    assert [tokens_of(outputs[i]) for i in range(3)] == expected
    if engine.runner.native is not None:
        assert fused  # the third prompt's chunks, while the first two decode


def test_a_small_paged_cache_preempts_and_still_gives_offline_tokens(llama):
    """Blocks of 4 positions, 8 of them for 4 running requests that need ~5 each: requests get preempted (their
    blocks freed, recomputed later) and every one still gets offline generate's greedy tokens."""
    prompts = _prompts([3, 9, 5, 12, 1, 7])
    expected = [llama.generate([p], 8, temperature=0)[0][0] for p in prompts]
    per_block = 4 * 2 * llama.model.config.n_layers * llama.model.config.n_kv_heads * llama.model.config.head_dim * 4
    engine = Engine(llama, block_size=4, kv_cache_memory=8 * per_block, max_step_tokens=8)
    assert engine.pool.num_blocks == 8
    preempted = []
    schedule = engine.scheduler.schedule

    def spy():
        step = schedule()
        preempted.extend(step.preempted)
        return step

    engine.scheduler.schedule = spy
    greedy = SamplingParams(temperature=0, max_tokens=8)
    outputs = run(engine, {0: [(i, p, greedy) for i, p in enumerate(prompts)]})
    assert preempted
    assert [tokens_of(outputs[i]) for i in range(6)] == expected
    assert engine.pool.num_used == 0


def test_kv_cache_memory_sizes_the_pool(llama):
    c = llama.model.config
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4
    assert Engine(llama, block_size=16, kv_cache_memory=100 * 16 * per_token).pool.num_blocks == 100
    with pytest.raises(ConfigError, match="holds no block"):
        Engine(llama, block_size=16, kv_cache_memory=100)


def test_prompt_logprobs_come_from_the_prefill_chunks(llama, reference):
    """prompt_logprobs=k, the prompt cut into chunks of 5 tokens: each prompt token's log-probability equals the
    reference's teacher-forced one, with k alternatives in order, the first of them the reference's argmax; a request
    with no token to make (max_tokens 0) only scores."""
    prompt = _prompts([23], seed=9)[0]
    expected = reference_prompt_logprobs(reference, prompt)
    with torch.inference_mode():
        ref_logits = reference.forward(torch.tensor([prompt]), 0)[0]
    engine = Engine(llama, max_step_tokens=5)
    for max_tokens in (0, 3):
        params = SamplingParams(temperature=0, prompt_logprobs=3)
        engine.add(llama.new_request(prompt, params, max_tokens=max_tokens, request_id=f"r{max_tokens}"))
        outs = []
        while engine.has_work:
            outs += engine.step()
        assert sum(o.token is not None for o in outs) == max_tokens and outs[-1].finish_reason == "length"
        scored = outs[0].prompt_logprobs
        assert all(o.prompt_logprobs is None for o in outs[1:])
        assert len(scored) == len(prompt) and scored[0] is None
        assert [lp for lp, _ in scored[1:]] == pytest.approx(expected[1:], abs=1e-4)
        for pos, (_, top) in enumerate(scored[1:]):
            assert len(top) == 3 and top[0][0] == int(ref_logits[pos].argmax())
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert engine.pool.num_used == 0


def test_a_long_scored_prompt_never_holds_running_streams_for_more_than_a_step(llama):
    """Eight greedy streams decode while a 60-token prompt is scored under a 16-token budget: the prompt goes in
    chunks that fit beside the streams, and every stream gets a token at every step until it finishes."""
    engine = Engine(llama, max_batch_size=9, max_step_tokens=16)
    streams = [(f"s{i}", p, SamplingParams(temperature=0, max_tokens=12)) for i, p in enumerate(_prompts([3] * 8))]
    for request_id, prompt, params in streams:
        add(engine, prompt, params, request_id)
    engine.step()  # the streams' prompts
    long = _prompts([60], seed=7)[0]
    engine.add(llama.new_request(long, SamplingParams(temperature=0, prompt_logprobs=0), max_tokens=0, request_id="score"))
    steps, scored = [], None
    while engine.has_work:
        outs = engine.step()
        steps.append({o.request_id for o in outs if o.token is not None or o.finish_reason})
        scored = next((o for o in outs if o.request_id == "score"), scored)
    assert scored is not None and len(scored.prompt_logprobs) == 60
    busy = [s for s in steps if any(r.startswith("s") for r in s)]
    assert len(steps) >= 60 // 8  # the prompt needed several steps
    # Until the streams finish, each step gave every stream its token: none waited on the prompt.
    assert all({f"s{i}" for i in range(8)} <= s for s in busy[:-1])
    assert engine.pool.num_used == 0


def test_one_cache_serves_offline_calls_and_the_core_alike(llama):
    """Llama's own core is the only one: generate() runs its requests there, beside requests added directly."""
    prompts = _prompts([5, 9])
    expected = [llama.generate([p], 6, temperature=0)[0][0] for p in prompts]
    core = llama.core
    with core.lock:
        direct = llama.new_request(prompts[0], SamplingParams(temperature=0, max_tokens=6), request_id="direct")
        got = []
        direct.sink = got.append
        core.add(direct)
    assert llama.generate([prompts[1]], 6, temperature=0)[0][0] == expected[1]  # steps the direct request too
    while core.has_work:
        core.step()
    assert [o.token for o in got if o.token is not None] == expected[0]
    assert core.pool.num_used == 0
