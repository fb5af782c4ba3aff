"""Speculative decoding (lamina.engine.speculative and its use by the engine core): prompt lookup against a
brute-force search; greedy and seeded tokens equal to those without speculation (drafts that are always right,
always wrong, or prompt lookup's own) on a random model and the default model, with a draft model too; the emitted
distribution against the exact probabilities (a chi-square test); stop tokens and strings, max_tokens, the context,
structured output, logprobs and prompt logprobs, prefix caching, preemption and aborts with drafts in flight; the
block pool all free after each; the configuration's errors."""

import dataclasses
import random

import pytest
import torch
from scipy.stats import chisquare

import lamina
from lamina import ConfigError
from lamina.engine import EngineCore
from lamina.engine import speculative as spec_module
from lamina.engine.sampling import SamplingParams, StructuredOutputs
from lamina.engine.speculative import SpeculativeConfig, propose_ngram

from .test_generate import _prompts


def _lookup_by_hand(tokens, k, min_n, max_n):
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) < n + 1:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence ending before the last token
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_prompt_lookup_finds_the_longest_latest_ngram():
    assert propose_ngram([5, 6, 7, 8, 5, 6], k=3, min_n=1, max_n=3) == [7, 8, 5]
    assert propose_ngram([1, 2, 9, 1, 2, 7, 1, 2], k=2, min_n=1, max_n=2) == [7, 1]  # the latest "1 2", not the first
    assert propose_ngram([3, 4, 1, 2, 9, 4, 1, 2], k=1, min_n=1, max_n=3) == [9]  # "4 1 2" is longer than "1 2"
    assert propose_ngram([1, 2, 3, 4], k=2, min_n=1, max_n=2) == []
    assert propose_ngram([7], k=2, min_n=1, max_n=2) == []
    assert propose_ngram([4, 4, 4], k=5, min_n=1, max_n=2) == [4]  # overlapping: what follows, up to the end
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        k, min_n = rng.randrange(1, 6), rng.randrange(1, 3)
        max_n = min_n + rng.randrange(0, 3)
        assert propose_ngram(tokens, k, min_n, max_n) == _lookup_by_hand(tokens, k, min_n, max_n), tokens


def test_prompt_lookup_refuses_bad_settings():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        propose_ngram([1, 2, 3], k=2, min_n=3, max_n=2)
    with pytest.raises(ValueError, match="k >= 1"):
        propose_ngram([1, 2, 3], k=0, min_n=1, max_n=2)


# ---- The engine core with drafts ---------------------------------------------------------------------------------


def Engine(llama, spec: dict | None, **config) -> EngineCore:
    """A core of its own over `llama`'s model, speculating with `spec` (vLLM's shape; a draft model's "model" is the
    one `llama` loaded), verifying every proposal: the cost model would decline some on a machine where extra rows
    cost, and here each path must run."""
    config = dataclasses.replace(llama.config, **({"block_size": 16} | config))
    spec = None if spec is None else SpeculativeConfig.parse(spec)
    engine = EngineCore(
        llama.model,
        llama.tokenizer,
        config,
        speculative=spec,
        draft_model=llama.core.speculator.draft.model if spec is not None and spec.model else None,
    )
    if engine.speculator is not None:
        engine.speculator._plan = lambda n, offers, draft_cost: {id(r): m for r, m in offers if m}
    engine.llama = llama
    return engine


def run(engine: EngineCore, prompts, params, *, abort_at: dict | None = None, max_steps: int = 2000) -> list[list]:
    """Each prompt as a request (ids 0..), stepped until done: the outputs of each; `abort_at` {step: id}."""
    engine.made = [
        engine.llama.new_request(p, params[i] if isinstance(params, list) else params, request_id=i)
        for i, p in enumerate(prompts)
    ]
    for request in engine.made:
        engine.add(request)
    outputs = [[] for _ in prompts]
    for step in range(max_steps):
        if not engine.has_work:
            assert engine.pool.num_used == 0, "blocks left behind"
            return outputs
        if abort_at and step in abort_at:
            engine.abort(abort_at[step])
        for out in engine.step():
            outputs[out.request_id].append(out)
    raise AssertionError("the engine did not finish")


def tokens_of(outs) -> list[int]:
    return [o.token for o in outs if o.token is not None]


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture
def oracle(monkeypatch):
    """Prompt lookup replaced by a proposer that knows the answers: `oracle.answers` maps a prompt (tuple) to the
    tokens it gets without speculation; each draft is what follows there (`oracle.wrong`: each token off by one, so
    every draft token is rejected)."""

    class Oracle:
        answers: dict = {}
        wrong = False
        calls = 0

        def __call__(self, tokens, k, min_n, max_n):
            for prompt, answer in self.answers.items():
                if tuple(tokens[: len(prompt)]) == prompt:
                    done = len(tokens) - len(prompt)
                    self.calls += 1
                    draft = list(answer[done : done + k])
                    return [(t + 1) % 1000 for t in draft] if self.wrong else draft
            return []

    o = Oracle()
    monkeypatch.setattr(spec_module, "propose_ngram", o)
    return o


def _baseline(llama, prompts, params, **config):
    outs = run(Engine(llama, None, **config), prompts, params)
    return outs, [tokens_of(o) for o in outs]


@pytest.mark.parametrize("wrong", [False, True])
def test_greedy_tokens_and_logprobs_are_those_without_drafts(llama, oracle, wrong):
    prompts = _prompts([3, 9, 5, 14, 6])
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=True, top_logprobs=2)
    base_outs, base = _baseline(llama, prompts, params)
    oracle.answers = {tuple(p): t for p, t in zip(prompts, base)}
    oracle.wrong = wrong
    engine = Engine(llama, NGRAM)
    outs = run(engine, prompts, params)
    assert [tokens_of(o) for o in outs] == base
    for got, want in zip(outs, base_outs):
        assert [o.logprob for o in got] == pytest.approx([o.logprob for o in want], abs=1e-4)
        assert [o.finish_reason for o in got][-1] == want[-1].finish_reason
        assert got[-1].completion_tokens == want[-1].completion_tokens  # usage counts tokens, not proposals
    stats = engine.speculator.stats
    assert stats.drafts > 10 and stats.draft_tokens > 30
    if wrong:
        assert stats.accepted_tokens == 0
    else:  # the oracle's drafts are right but near ties, which go to a plain step
        assert stats.accepted_tokens >= 0.9 * stats.draft_tokens
        assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1] > 0


def test_seeded_sampling_draws_the_tokens_it_draws_without_drafts(llama, oracle):
    prompts = _prompts([4, 7, 11])
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=16, logprobs=True) for s in (1, 2, 3)]
    _, base = _baseline(llama, prompts, params)
    oracle.answers = {tuple(p): t for p, t in zip(prompts, base)}
    engine = Engine(llama, NGRAM)
    assert [tokens_of(o) for o in run(engine, prompts, params)] == base
    assert engine.speculator.stats.accepted_tokens > 0
    # drafts that are always wrong: every position's draw is the same draw as without them
    oracle.wrong = True
    assert [tokens_of(o) for o in run(Engine(llama, NGRAM), prompts, params)] == base


def test_the_emitted_distribution_is_the_targets(llama, monkeypatch):
    """Three tokens after a prompt, 4000 times (4000 seeds), the second drafted at random among the likely tokens
    (accepted about a third of the time, the third then the bonus draw), against the triple's exact probability
    from the model's logits (chi-square, p > 1e-3); and the control: the draft taken as it is, unverified, fails."""
    from lamina.engine.runner import ModelRunner

    prompt = _prompts([5])[0]
    likely = [11, 22, 33, 44]
    bias = {t: 40.0 + 1.0 * i for i, t in enumerate(likely)}  # almost all the mass on four tokens, unevenly
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=3, logit_bias=bias, ignore_eos=True) for s in range(4000)
    ]
    rng = random.Random(0)
    monkeypatch.setattr(spec_module, "propose_ngram", lambda tokens, k, lo, hi: [rng.choice(likely) for _ in range(k)])
    engine = Engine(llama, NGRAM | {"num_speculative_tokens": 1}, max_batch_size=64, max_seq_len=16, max_waiting=4000)
    triples = [tuple(tokens_of(o)) for o in run(engine, [prompt] * len(params), params)]
    stats = engine.speculator.stats
    assert stats.drafts >= 3900 and 0.1 < stats.accepted_tokens / stats.draft_tokens < 0.9
    # exact probabilities: the model's logits after the prompt and each continuation, biased, softmaxed
    runner = ModelRunner(llama.model, dataclasses.replace(llama.config, max_batch_size=1), native=False)
    probs = {}
    with torch.inference_mode():
        for row in [prompt] + [prompt + [a] for a in likely] + [prompt + [a, b] for a in likely for b in likely]:
            logits = runner.logits(runner.prefill([row], [[0]])[-1:])[0].double()
            for t, b in bias.items():
                logits[t] += b
            probs[tuple(row)] = torch.softmax(logits, -1)
    cells = [(a, b, c) for a in likely for b in likely for c in likely]
    p = [
        float(probs[tuple(prompt)][a] * probs[tuple(prompt + [a])][b] * probs[tuple(prompt + [a, b])][c])
        for a, b, c in cells
    ]
    assert sum(p) > 0.999
    n = len(triples)
    expected = [x / sum(p) * n for x in p]
    assert sum(triples.count(c) for c in cells) >= 0.998 * n
    assert chisquare(*_pooled([triples.count(c) for c in cells], expected)).pvalue > 1e-3
    # the control: a second token taken from the proposer as it is (uniform among the four) is caught
    control = [(a, rng.choice(likely), c) for a, _, c in triples]
    assert chisquare(*_pooled([control.count(c) for c in cells], expected)).pvalue < 1e-9


def _pooled(observed, expected, least=5.0):
    """Cells expected fewer than `least` times pooled into one (the chi-square approximation needs counts)."""
    small = [i for i, e in enumerate(expected) if e < least]
    big = [i for i, e in enumerate(expected) if e >= least]
    obs = [observed[i] for i in big] + [sum(observed[i] for i in small)]
    exp = [expected[i] for i in big] + [sum(expected[i] for i in small)]
    scale = sum(obs) / sum(exp)  # the few triples outside the 64 cells are left out of both
    return obs, [e * scale for e in exp]


def test_stop_tokens_stop_strings_and_limits_inside_a_draft(llama, oracle):
    prompts = _prompts([4, 8, 6, 10])
    plain = SamplingParams(temperature=0, max_tokens=24)
    _, free = _baseline(llama, prompts, plain)
    # a stop token, a stop string and a small max_tokens, each landing inside a draft of 4
    detok = llama.tokenizer.decode
    params = [
        dataclasses.replace(plain, stop_token_ids=[free[0][6]]),
        dataclasses.replace(plain, stop=[detok(free[1][5:7])] if detok(free[1][5:7]).strip() else []),
        dataclasses.replace(plain, max_tokens=7),
        plain,
    ]
    base_outs, base = _baseline(llama, prompts, params)
    oracle.answers = {tuple(p): t for p, t in zip(prompts, free)}
    outs = run(Engine(llama, NGRAM), prompts, params)
    assert [tokens_of(o) for o in outs] == base
    assert ["".join(o.text for o in got) for got in outs] == ["".join(o.text for o in got) for got in base_outs]
    assert [got[-1].finish_reason for got in outs] == [got[-1].finish_reason for got in base_outs]
    assert [got[-1].completion_tokens for got in outs] == [got[-1].completion_tokens for got in base_outs]
    assert len(base[2]) == 7
    # the context: a request that may only grow to max_seq_len
    long = _prompts([60])[0]
    _, base = _baseline(llama, [long], plain)
    oracle.answers = {tuple(long): base[0]}
    outs = run(Engine(llama, NGRAM), [long], plain)
    assert tokens_of(outs[0]) == base[0] and len(long) + len(base[0]) == llama.config.max_seq_len


def test_structured_output_rejects_draft_tokens_the_grammar_refuses(llama, oracle):
    prompts = _prompts([5, 7])
    choice = StructuredOutputs(choice=["yes", "no way"])
    params = SamplingParams(temperature=0, max_tokens=12, structured_outputs=choice)
    base_outs, base = _baseline(llama, prompts, params)
    _, free = _baseline(llama, prompts, SamplingParams(temperature=0, max_tokens=12))
    oracle.answers = {tuple(p): t for p, t in zip(prompts, free)}  # the unconstrained answer: the grammar refuses it
    engine = Engine(llama, NGRAM)
    outs = run(engine, prompts, params)
    assert [tokens_of(o) for o in outs] == base
    assert {"".join(o.text for o in got) for got in outs} <= {"yes", "no way"}
    assert engine.speculator.stats.draft_tokens > 0


def test_prompt_logprobs_prefix_caching_preemption_and_aborts(llama, oracle):
    from lamina.engine.kv_cache import KVCache

    shared = _prompts([20])[0]
    prompts = [shared + p[1:] for p in _prompts([4, 6, 9, 3], seed=2)]
    params = SamplingParams(temperature=0, max_tokens=18, prompt_logprobs=1, logprobs=True)
    base_outs, base = _baseline(llama, prompts, params)
    oracle.answers = {tuple(p): t for p, t in zip(prompts, base)}
    # the second time a cache of 7 blocks of 16 for four requests of up to 46 positions sharing their first block:
    # some are preempted and recomputed
    small = 7 * 16 * KVCache.bytes_per_token(llama.model.config, llama.config.kv_dtype)
    for config in ({}, {"kv_cache_memory": small}):
        engine = Engine(llama, NGRAM, **config)
        outs = run(engine, prompts, params)
        assert [tokens_of(o) for o in outs] == base
        for got, want in zip(outs, base_outs):
            assert got[0].prompt_logprobs is not None
            assert [e and e[0] for e in got[0].prompt_logprobs] == pytest.approx(
                [e and e[0] for e in want[0].prompt_logprobs], abs=1e-5
            )
        assert engine.pool.hits > 0  # the shared prefix came from the cache
        assert engine.speculator.stats.accepted_tokens > 0
    assert sum(r.preemptions for r in engine.made) > 0
    # aborts while drafts are in flight: the aborted get a prefix of their tokens, the others all of theirs, and the
    # pool is all free when they finish (run checks it)
    engine = Engine(llama, NGRAM)
    outs = run(engine, prompts, params, abort_at={3: 1, 5: 2})
    for i in (1, 2):
        got = tokens_of(outs[i])
        assert len(got) < len(base[i]) and got == base[i][: len(got)]
    assert tokens_of(outs[0]) == base[0] and tokens_of(outs[3]) == base[3]


def test_a_prompt_scored_from_the_cache_gets_no_draft_until_it_is_scored(llama, oracle, monkeypatch):
    """A prompt whose blocks come from the prefix cache and that asks for prompt logprobs is scored a few positions a
    step (chunks of no tokens) before it runs on; a draft in the meantime, or on its last prompt token's chunk (which
    scores the rest: a prefill pass, whose logits are those of the chunk's last position), would sample from the
    wrong position. Prompts of one block and one token: all but the last token from the cache."""
    from lamina.engine import runner as runner_module
    from lamina.engine import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "SCORE_STEP", 4)
    monkeypatch.setattr(runner_module, "SCORE_STEP", 4)
    shared = _prompts([16])[0]
    prompts = [shared + [t] for t in (7, 11, 13, 17)]
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=1, logprobs=True)
    base_outs, base = _baseline(llama, prompts, params)
    oracle.answers = {tuple(p): t for p, t in zip(prompts, base)}
    engine = Engine(llama, NGRAM)
    outs = run(engine, prompts, params)
    assert [tokens_of(o) for o in outs] == base
    for got, want in zip(outs, base_outs):
        assert [e and e[0] for e in got[0].prompt_logprobs] == pytest.approx(
            [e and e[0] for e in want[0].prompt_logprobs], abs=1e-5
        )
    assert engine.pool.hits >= 3 * 16 and engine.speculator.stats.accepted_tokens > 0


def test_prompt_lookup_on_the_default_model_keeps_greedy_and_seeded_tokens():
    llm = lamina.load(max_batch_size=4, max_seq_len=512)
    chats = [
        "Repeat exactly: The quick brown fox jumps over the lazy dog near the bank of the river.",
        "Copy this list: apples, pears, plums, apples, pears, plums, apples, pears.",
        "Write the numbers from one to twenty in words, separated by commas.",
        "What is the capital of France?",
        'Give me a JSON object with keys "name" and "age" for Alice, 30.',
        "Write a haiku about the sea.",
    ]
    prompts = [llm.encode_dialog([{"role": "user", "content": c}]) for c in chats]
    greedy = SamplingParams(temperature=0, max_tokens=48)
    seeded = [SamplingParams(temperature=0.7, top_p=0.9, seed=i, max_tokens=48) for i in range(len(chats))]
    for params in (greedy, seeded):
        _, base = _baseline(llm, prompts, params, block_size=16)
        engine = Engine(llm, NGRAM | {"num_speculative_tokens": 8}, block_size=16)
        assert [tokens_of(o) for o in run(engine, prompts, params)] == base
        assert engine.speculator.stats.accepted_tokens > 20


def test_a_draft_model_keeps_greedy_tokens():
    """The default model's weights in float32 as the target, drafted by the default Q4_1 file."""
    draft_path = lamina.loader.default_model_path()
    spec = {"model": str(draft_path), "num_speculative_tokens": 4}
    llm = lamina.load(quantize="none", dtype="float32", max_batch_size=2, max_seq_len=256, speculative_config=spec)
    assert llm.core.speculator.draft is not None
    prompts = [llm.tokenizer.encode(t, bos=False, eos=False) for t in ("The capital of France is", "1, 2, 3, 4,")]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    _, base = _baseline(llm, prompts, greedy)
    engine = Engine(llm, spec)
    assert [tokens_of(o) for o in run(engine, prompts, greedy)] == base
    stats = engine.speculator.stats
    assert stats.drafts > 5 and stats.accepted_tokens > stats.draft_tokens / 2  # the same weights, quantized


def test_configuration_errors(tiny_ckpt, tokenizer_path, tmp_path):
    for spec, message in [
        ({}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, "1..32"),
        ({"num_speculative_tokens": 2, "method": "eagle"}, "'ngram' or 'draft_model'"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "above"),
        ({"num_speculative_tokens": 2, "lookahead": 3}, "unknown key"),
        ({"num_speculative_tokens": 2, "method": "ngram", "model": "x.gguf"}, "takes no 'model'"),
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SpeculativeConfig.parse(spec)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3}).prompt_lookup_min == 5
    assert SpeculativeConfig.parse('{"num_speculative_tokens": 3, "prompt_lookup_max": 4}').prompt_lookup_min == 4
    assert SpeculativeConfig.parse({"model": "d.gguf", "num_speculative_tokens": 3}).method == "draft_model"
    with pytest.raises(lamina.WeightsError, match="never downloads"):
        lamina.load(speculative_config={"model": "someone/some-draft", "num_speculative_tokens": 2})
    import shutil

    other = shutil.copytree(tiny_ckpt, tmp_path / "llama3-tiny")
    shutil.copy(tokenizer_path, other / "tokenizer.model")  # Llama 3's tokenizer, not SmolLM2's
    with pytest.raises(ConfigError, match="does not share the target's tokenizer: 49152 tokens against 128256"):
        lamina.load(max_batch_size=1, speculative_config={"model": str(other), "num_speculative_tokens": 2})


def test_step_costs_interpolate_and_extrapolate_what_was_measured():
    from lamina.engine.speculative import StepCosts

    costs = StepCosts()
    assert costs.estimate(4) == 1.0  # nothing measured: a placeholder that no plan uses (plans wait for samples)
    costs.record(1, 0.010)
    assert costs.estimate(9) == 0.010  # one count known: a larger step is tried, and measured, once
    costs.record(5, 0.030)
    assert costs.estimate(3) == pytest.approx(0.020)  # between two measured counts: on the line through them
    assert costs.estimate(9) == pytest.approx(0.050)  # beyond: 5 ms a row, the average from 1 to 5 rows
    costs.record(5, 0.010)  # a moving average (weight 0.3 for the new measurement)
    assert costs.estimate(5) == pytest.approx(0.7 * 0.030 + 0.3 * 0.010)
    costs.record(9, 0.005)  # faster than fewer rows (noise): estimated as the dearest smaller step
    assert costs.estimate(9) == costs.estimate(20) == pytest.approx(0.7 * 0.030 + 0.3 * 0.010)
    cautious = StepCosts(proportional=True)  # a draft model's forwards: many requests as dear as one each, at first
    cautious.record(1, 0.004)
    assert cautious.estimate(16) == pytest.approx(0.064)


def test_a_draft_models_catch_up_is_paid_where_the_reply_left_can_repay_it():
    """A request the draft model has not followed (a prompt, or tokens made while many streams kept it from
    drafting) costs a catch-up before its first draft: the plan charges it, spread over the tokens the request has
    left to make. Early in a long reply a catch-up is worth it; near the end of one it is not (the 16-stream
    slowdown: catch-ups of whole replies for the last few tokens of each)."""
    from lamina.engine.request import Request
    from lamina.engine.sampling import SamplingParams
    from lamina.engine.speculative import Drafting, Speculator

    spec = Speculator(SpeculativeConfig.parse({"model": "draft", "num_speculative_tokens": 4}), draft=object())
    for _ in range(3):
        spec.costs.record(1, 0.050)  # one stream, bound by reading the weights: more rows hardly cost more
        spec.costs.record(5, 0.055)
    spec.draft_step.record(1, 0.005)  # a draft token: 5 ms
    spec.catch_up = 0.001  # a token of catch-up: 1 ms

    def request(made: int, max_tokens: int, followed: int) -> Request:
        r = Request(0, list(range(200)), SamplingParams(temperature=0), max_tokens=max_tokens)
        r.output, r.computed, r.draft_computed = list(range(made)), 200 + made - 1, followed
        r.spec = Drafting()
        return r

    def plan(r: Request) -> int:
        spec._steps = 1  # not a baseline step
        return spec._plan(1, [(r, 4)], draft_cost=spec.draft_step).get(id(r), 0)

    assert plan(request(10, 500, followed=209)) == 4  # followed: a draft costs its forwards alone
    assert plan(request(10, 500, followed=0)) == 4  # 209 tokens of catch-up (0.21 s) spread over 490 tokens left
    assert plan(request(490, 500, followed=0)) == 0  # 690 tokens of catch-up for the last 10: not worth it
    spec.catch_up = 0.0  # not measured yet: no charge (the first catch-up measures it)
    assert plan(request(490, 500, followed=0)) == 4


def test_acceptance_is_learned_by_the_kind_of_draft():
    """Prompt lookup's drafts are worth what drafts of their kind (the length of the n-gram matched) have had lately
    in every request: in open-ended writing a 1-token match is rarely followed by what the model writes, and trying
    each new request's 1-token matches again and again cost ~8% there. A request's first draft of a kind is tried."""
    from lamina.engine.request import Request
    from lamina.engine.speculative import HOPEFUL, Drafting, Speculator

    spec = Speculator(SpeculativeConfig.parse(NGRAM))

    def request(source: int) -> Request:
        r = Request(0, [1, 2, 3], SamplingParams(temperature=0))
        r.spec = Drafting(source=source)
        return r

    for _ in range(10):  # requests whose 1-token matches each failed once
        r = request(1)
        assert spec.rate(r) == HOPEFUL  # its first draft of the kind: tried
        spec.verified(r, [5, 6], [7])
        assert spec.rate(r) < 0.6
    assert spec.rate(r) < 0.3  # one failure of its own, and the kind's record: not tried again soon
    assert spec.rate(request(1)) == HOPEFUL  # a new request's first 1-token match is still tried once...
    r = request(1)
    spec.verified(r, [5, 6], [5, 6, 7])  # ...and when its own drafts are right, it is believed soon
    spec.verified(r, [5, 6], [5, 6, 7])
    assert spec.rate(r) > 0.5
    copying = request(3)
    for _ in range(3):
        spec.verified(copying, [5, 6, 7, 8], [5, 6, 7, 8, 9])
    copying.spec.source = 1
    assert spec.rate(copying) == HOPEFUL  # its first 1-token match: its 3-token record says nothing of it
    copying.spec.source = 3
    assert spec.rate(copying) > 0.9
