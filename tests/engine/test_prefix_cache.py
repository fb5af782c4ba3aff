"""Prefix caching (lamina.engine.blocks, the scheduler's admission): outputs with and without it are the same (greedy
tokens, logprobs and their alternatives, prompt logprobs and their top-k) for prefixes shared by requests arriving
together or one after another, a shared block boundary inside a prompt, prompts that diverge after a full block,
preemption and aborts while blocks are shared, a pool so small that cached blocks are evicted all the time, and
offline batches; the cached path really runs (fewer tokens computed); and after each test every block is free."""

import dataclasses

import pytest

from lamina.engine import EngineCore
from lamina.engine.blocks import BlockPool, block_keys
from lamina.engine.sampling import SamplingParams

from .test_generate import _prompts

SYSTEM = _prompts([21], seed=3)[0]  # a shared "system prompt": 5 blocks of 4 and one token more


def Engine(llama, *, caching: bool, **config) -> EngineCore:
    config = dataclasses.replace(llama.config, **({"block_size": 4, "prefix_caching": caching} | config))
    engine = EngineCore(llama.model, llama.tokenizer, config, seed=0)
    ran = engine.ran = []  # tokens each forward pass ran
    execute = engine.runner.execute

    def spy(chunks):
        ran.append(sum(c.length for c in chunks))
        return execute(chunks)

    engine.runner.execute = spy
    return engine


def drive(engine: EngineCore, arrivals: dict[int, list], aborts: dict[int, list] | None = None) -> dict:
    """Add requests at the given steps (step -> [(id, prompt, params, max_tokens)]), abort some (step -> ids), step
    until done: id -> its outputs."""
    outputs: dict = {}
    aborts = aborts or {}
    for step in range(1000):
        for request_id, prompt, params, max_tokens in arrivals.get(step, []):
            engine.add(engine_request(engine, prompt, params, max_tokens, request_id))
        for request_id in aborts.get(step, []):
            engine.abort(request_id)
        if not engine.has_work and step > max(arrivals):
            assert engine.pool.num_free == engine.pool.num_blocks  # cached blocks count as free
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def engine_request(engine, prompt, params, max_tokens, request_id):
    from lamina.engine.request import Request

    return Request(request_id, list(prompt), params, max_tokens=max_tokens, stop_ids=frozenset())


def summary(outs) -> dict:
    """What a request got: tokens, logprobs, alternatives, prompt logprobs with their top-k, finish reason."""
    first = outs[0].prompt_logprobs
    return {
        "tokens": [o.token for o in outs if o.token is not None],
        "logprobs": [o.logprob for o in outs if o.token is not None],
        "top": [[t for t, _ in o.top_logprobs] for o in outs if o.top_logprobs],
        "top_values": [[v for _, v in o.top_logprobs] for o in outs if o.top_logprobs],
        "prompt": None if first is None else [None if p is None else p[0] for p in first],
        "prompt_top": None if first is None else [None if p is None else [t for t, _ in p[1]] for p in first],
        "finish": outs[-1].finish_reason,
    }


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for request_id in a:
        x, y = summary(a[request_id]), summary(b[request_id])
        assert x["tokens"] == y["tokens"] and x["top"] == y["top"] and x["finish"] == y["finish"], request_id
        assert x["prompt_top"] == y["prompt_top"], request_id
        assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-5), request_id
        for u, v in zip(x["top_values"], y["top_values"]):
            assert u == pytest.approx(v, abs=1e-5), request_id
        if x["prompt"] is not None:
            assert x["prompt"][0] is None and y["prompt"][0] is None
            assert x["prompt"][1:] == pytest.approx(y["prompt"][1:], abs=1e-5), request_id


def both(llama, arrivals, aborts=None, **config):
    """The same arrivals on an engine without and with prefix caching: (outputs, engine) of each."""
    plain = Engine(llama, caching=False, **config)
    cached = Engine(llama, caching=True, **config)
    return (drive(plain, arrivals, aborts), plain), (drive(cached, arrivals, aborts), cached)


GREEDY = SamplingParams(temperature=0, logprobs=True, top_logprobs=2)
SCORED = SamplingParams(temperature=0, logprobs=True, top_logprobs=2, prompt_logprobs=3)


def test_block_pool_counts_references_and_evicts_least_recently_used():
    pool = BlockPool(4, 2, caching=True)
    tokens = [1, 2, 3, 4, 5]
    keys = block_keys(tokens, 2, [])
    assert len(keys) == 2 and keys != block_keys([1, 2, 3, 9], 2, [])  # a key names everything before it
    a: list[int] = []
    assert pool.grow(a, 5) and len(a) == 3
    pool.publish(a[0], keys[0], tokens[:2])
    pool.publish(a[1], keys[1], tokens[2:4])
    b = pool.match(keys, tokens, limit=2)
    assert b == a[:2] and pool.num_free == 1
    first = a[0]
    pool.free(a)  # b still reads the first two
    assert pool.num_free == 2 and pool.num_cached == 2
    pool.free(b)
    assert pool.num_free == 4
    assert pool.match(keys, [1, 2, 3, 99], limit=2) == [first]  # tokens are checked, not only keys
    pool.free([first])  # now the most recently used
    grown: list[int] = []
    assert pool.grow(grown, 6)  # two never-cached blocks first, then the least recently used cached one
    assert pool.num_cached == 1 and pool.match(keys, tokens, limit=2) == [first]
    assert not pool.grow(grown, 100)


def test_requests_sharing_a_prefix_together_and_one_after_another(llama):
    """Two requests with the system prompt arriving at once, two more a few steps later, one when the first are
    done; the same outputs as without caching, and the later requests compute far fewer tokens."""
    tails = _prompts([3, 6, 2, 9, 4], seed=5)
    arrivals = {
        0: [("a", SYSTEM + tails[0], GREEDY, 6), ("b", SYSTEM + tails[1], SCORED, 6)],
        3: [("c", SYSTEM + tails[2], SCORED, 4), ("d", SYSTEM + tails[3], GREEDY, 4)],
        40: [("e", SYSTEM + tails[4], SCORED, 3)],
    }
    (plain, p), (cached, c) = both(llama, arrivals)
    same(plain, cached)
    assert sum(c.ran) < sum(p.ran) - 3 * 16  # at least 4 blocks of the system prompt, for each of c, d and e
    assert c.pool.hits >= 4 * 20 and c.pool.queries >= c.pool.hits
    assert {r: outs[0].cached_tokens for r, outs in cached.items()}["e"] == 20


def test_a_shared_boundary_mid_prompt_and_prompts_that_diverge_after_a_full_block(llama):
    """Prompts that share 6 tokens (a block and a half), 8 (two blocks exactly), and the whole of a shorter prompt."""
    base = _prompts([14], seed=11)[0]
    other = _prompts([10], seed=12)[0]
    arrivals = {
        0: [("base", base, SCORED, 5)],
        8: [("half", base[:6] + other[:5], SCORED, 5), ("two", base[:8] + other[:3], GREEDY, 5)],
        16: [("prefix", base[:9], SCORED, 4), ("same", list(base), SCORED, 5)],
    }
    (plain, _), (cached, c) = both(llama, arrivals)
    same(plain, cached)
    got = {r: outs[0].cached_tokens for r, outs in cached.items()}
    assert got == {"base": 0, "half": 4, "two": 8, "prefix": 8, "same": 12}  # never all of a prompt


def test_preemption_and_aborts_while_blocks_are_shared(llama):
    """A pool of 12 blocks of 4 for requests sharing the system prompt: some are preempted, two are aborted
    (one while another reads its blocks); the others get the same outputs as without caching."""
    per_block = 4 * 2 * llama.model.config.n_layers * llama.model.config.n_kv_heads * llama.model.config.head_dim * 4
    tails = _prompts([2, 5, 3, 7, 4, 6], seed=21)
    arrivals = {0: [(f"r{i}", SYSTEM + t, GREEDY if i % 2 else SCORED, 8) for i, t in enumerate(tails[:3])]}
    arrivals[2] = [(f"r{i}", SYSTEM + t, SCORED, 8) for i, t in enumerate(tails[3:], start=3)]
    aborts = {4: ["r1"], 9: ["r4"]}
    config = {"kv_cache_memory": 12 * per_block, "max_step_tokens": 16}
    (plain, p), (cached, c) = both(llama, arrivals, aborts, **config)
    for engine in (p, c):
        assert engine.pool.num_blocks == 12
    kept = ["r0", "r2", "r3", "r5"]
    same({r: plain[r] for r in kept}, {r: cached[r] for r in kept})


def test_a_pool_so_small_cached_blocks_are_evicted_all_the_time(llama):
    """Eight blocks of 4, requests one after another with two different system prompts: each request evicts what
    the one before cached; outputs stay those of the plain engine."""
    per_block = 4 * 2 * llama.model.config.n_layers * llama.model.config.n_kv_heads * llama.model.config.head_dim * 4
    systems = [SYSTEM[:12], _prompts([12], seed=8)[0]]
    tails = _prompts([3, 4, 2, 5, 3, 4], seed=31)
    arrivals = {6 * i: [(f"r{i}", systems[i % 2] + t, SCORED, 6)] for i, t in enumerate(tails)}
    (plain, _), (cached, c) = both(llama, arrivals, kv_cache_memory=8 * per_block, max_step_tokens=32)
    same(plain, cached)
    assert c.pool.num_blocks == 8


def test_an_offline_batch_computes_its_shared_system_prompt_once(llama):
    """generate() with four prompts sharing the system prompt: the same tokens and logprobs as without caching, and
    the system prompt's full blocks are computed once, not four times."""
    tails = _prompts([3, 5, 2, 4], seed=41)
    prompts = [SYSTEM + t for t in tails]
    arrivals = {0: [(f"r{i}", p, GREEDY, 5) for i, p in enumerate(prompts)]}
    (plain, p), (cached, c) = both(llama, arrivals)
    same(plain, cached)
    prompt_tokens = sum(len(x) for x in prompts)
    decode_tokens = sum(len(summary(outs)["tokens"]) for outs in plain.values()) - len(prompts)
    assert sum(p.ran) == prompt_tokens + decode_tokens
    assert sum(c.ran) == prompt_tokens - 3 * 20 + decode_tokens  # three of the four took the 5 cached blocks


def test_a_cached_prompt_scored_again_is_scored_a_few_positions_a_step(llama, monkeypatch):
    """lm-eval sends a context again for each choice (echo + logprobs): the positions whose blocks come from the
    prefix cache are scored SCORE_STEP a step (chunks of no tokens) while another request decodes, not all in one
    step; prompt logprobs, tokens and the end of a request with no token to make are those without caching."""
    from lamina.engine import runner as runner_module
    from lamina.engine import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "SCORE_STEP", 8)
    monkeypatch.setattr(runner_module, "SCORE_STEP", 8)
    context = SYSTEM + _prompts([30], seed=9)[0]  # 51 tokens: 12 full blocks of 4
    arrivals = {
        0: [("first", context, SCORED, 2), ("stream", _prompts([5], seed=4)[0], GREEDY, 40)],
        12: [("again", context, SCORED, 2)],
        24: [("again, no token", context, SCORED, 0)],
    }
    plain = Engine(llama, caching=False)
    cached = Engine(llama, caching=True)
    scored = []  # (request, positions scored) of each call, cached engine
    score_prompt = cached.sampler.score_prompt

    def spy(request, positions, hidden, logits):
        scored.append((request.request_id, len(positions)))
        return score_prompt(request, positions, hidden, logits)

    cached.sampler.score_prompt = spy
    same(drive(plain, arrivals), drive(cached, arrivals))
    for request_id in ("again", "again, no token"):
        sizes = [n for r, n in scored if r == request_id]
        assert sum(sizes) == len(context) - 1 and len(sizes) >= 48 // 8 and max(sizes) <= 8 + 4, sizes
