"""The scheduler against a fake model whose next token is a function of the whole sequence so far: continuous
batching, chunked prefill, preemption and recomputation, the bounded queue and aborts, and the block pool back to
empty afterwards. A sequence's tokens must come out the same however it was batched, chunked or preempted."""

import pytest

from lamina.engine.blocks import BlockPool
from lamina.engine.request import Request, Status
from lamina.engine.sampling import SamplingParams
from lamina.engine.scheduler import Scheduler, SchedulerConfig
from lamina.errors import CapacityError, RequestError


def add(scheduler: Scheduler, request_id, prompt: list[int], max_tokens: int) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(), max_tokens=max_tokens)
    scheduler.add(request)
    return request


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 7) for i, t in enumerate(tokens)) * 31 + len(tokens)) % 1000


def expected_output(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeEngine:
    """Runs the scheduler's steps: keeps per request the tokens it has 'cached', checks every chunk continues them,
    and samples next_token of the cached sequence."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.cache: dict = {}
        self.steps = []
        self.finished: dict = {}

    def run(self, arrivals: dict[int, list] | None = None, max_steps: int = 10_000):
        arrivals = arrivals or {}
        for step_no in range(max_steps):
            for request_id, prompt, max_tokens in arrivals.get(step_no, []):
                add(self.scheduler, request_id, prompt, max_tokens)
            if self.scheduler.idle and step_no > max(arrivals, default=0):
                return
            step = self.scheduler.schedule()
            self.steps.append(step)
            for request_id in step.preempted:
                self.cache.pop(request_id, None)
            for seq in step.finished:
                self.finished[seq.request_id] = seq
            sampled = {}
            for chunk in step.chunks:
                cached = self.cache.setdefault(chunk.request.request_id, [])
                assert chunk.start == len(cached), "a chunk must continue what is cached"
                cached.extend(chunk.tokens)
                if chunk.samples:
                    sampled[chunk.request.request_id] = next_token(cached)
            for seq in self.scheduler.advance(step, sampled):
                self.finished[seq.request_id] = seq
                self.cache.pop(seq.request_id)
        raise AssertionError("the scheduler did not drain")


def make(num_blocks=64, block_size=4, max_running=8, max_waiting=16, max_step_tokens=32, max_seq_len=128):
    pool = BlockPool(num_blocks, block_size)
    config = SchedulerConfig(max_running, max_waiting, max_step_tokens, max_seq_len)
    return Scheduler(config, pool), pool


def prompts(n, seed=0):
    return [[(seed * 97 + i * 13 + j * 7) % 500 + 1 for j in range(3 + (i * 5) % 17)] for i in range(n)]


def test_requests_join_and_leave_the_running_batch():
    scheduler, pool = make()
    engine = FakeEngine(scheduler)
    ps = prompts(10)
    arrivals = {0: [(i, ps[i], 5 + i) for i in range(4)], 3: [(i, ps[i], 6) for i in range(4, 7)]}
    arrivals[9] = [(i, ps[i], 3) for i in range(7, 10)]
    engine.run(arrivals)
    assert sorted(engine.finished) == list(range(10))
    for i, seq in engine.finished.items():
        assert seq.output == expected_output(ps[i], seq.max_tokens) and seq.finish_reason == "length"
    assert pool.num_used == 0 and pool.num_free == 64
    # Late arrivals joined while earlier requests were still decoding: steps mixed old and new requests.
    assert any(len({c.request.request_id < 4 for c in s.chunks}) == 2 for s in engine.steps)


def test_long_prompts_are_chunked_and_running_streams_keep_decoding():
    scheduler, _ = make(max_step_tokens=16, max_seq_len=256, num_blocks=128)
    engine = FakeEngine(scheduler)
    short, long = prompts(1)[0], [(j * 11) % 400 + 1 for j in range(100)]
    engine.run({0: [("short", short, 40)], 2: [("long", long, 4)]})
    assert engine.finished["long"].output == expected_output(long, 4)
    assert engine.finished["short"].output == expected_output(short, 40)
    long_chunks = [c for s in engine.steps for c in s.chunks if c.request.request_id == "long"]
    assert all(s.num_tokens <= 16 for s in engine.steps)
    assert len(long_chunks) >= 100 // 16  # the prompt went in pieces
    # While the long prompt was being prefilled, the short stream got a token every step.
    prefill_steps = [s for s in engine.steps if any(c.request.request_id == "long" and not c.samples for c in s.chunks)]
    assert prefill_steps and all(any(c.request.request_id == "short" for c in s.chunks) for s in prefill_steps)


def test_preemption_recomputes_and_gives_the_same_tokens():
    scheduler, pool = make(num_blocks=12, block_size=4, max_running=6)  # 48 positions for 6 growing sequences
    engine = FakeEngine(scheduler)
    ps = prompts(6, seed=3)
    engine.run({0: [(i, ps[i], 12) for i in range(6)]})
    assert any(s.preempted for s in engine.steps)
    for i in range(6):
        assert engine.finished[i].output == expected_output(ps[i], 12)
    assert sum(engine.finished[i].preemptions for i in range(6)) > 0
    assert pool.num_used == 0


def test_a_sequence_longer_than_the_whole_cache_finishes():
    scheduler, pool = make(num_blocks=3, block_size=4)
    engine = FakeEngine(scheduler)
    engine.run({0: [("big", [1, 2, 3, 4, 5], 50)]})
    seq = engine.finished["big"]
    # 12 cached positions, and the token sampled from the last of them (never needs caching)
    assert seq.finish_reason == "length" and len(seq.prompt) + len(seq.output) == 13
    assert seq.output == expected_output([1, 2, 3, 4, 5], 8)
    assert pool.num_used == 0


def test_the_queue_is_bounded_and_bad_requests_are_refused():
    scheduler, _ = make(max_waiting=2, max_running=1, max_seq_len=16, num_blocks=3)
    for request_id in "abc":  # one for the batch's free place, two beyond it
        add(scheduler, request_id, [1], 4)
    with pytest.raises(CapacityError, match=r"the queue is full \(3 requests waiting, at most 2 beyond"):
        add(scheduler, "x", [1], 4)
    scheduler.schedule()  # "a" runs: two wait, the bound is reached
    with pytest.raises(CapacityError, match=r"\(2 requests waiting"):
        add(scheduler, "x", [1], 4)
    with pytest.raises(RequestError, match="already in use"):
        add(scheduler, "a", [1], 4)
    with pytest.raises(RequestError, match="prompt has 16 tokens; max_seq_len is 16"):
        add(scheduler, "d", [1] * 16, 1)
    with pytest.raises(RequestError, match="the KV cache holds 12"):
        add(scheduler, "e", [1] * 12, 1)
    with pytest.raises(RequestError, match="prompt is empty"):
        add(scheduler, "f", [], 1)


def test_abort_frees_blocks_at_once():
    scheduler, pool = make()
    a = add(scheduler, "a", list(range(1, 20)), 10)
    add(scheduler, "b", [5, 6], 10)
    step = scheduler.schedule()
    scheduler.advance(step, {c.request.request_id: 1 for c in step.chunks if c.samples})
    assert pool.num_used > 0 and scheduler.requests["a"].status is Status.RUNNING
    scheduler.abort("a")
    assert a.blocks == [] and [s.request_id for s in scheduler.running] == ["b"]
    add(scheduler, "c", [7], 2)
    scheduler.abort("c")  # still waiting
    scheduler.abort("never")  # unknown: ignored
    scheduler.abort("b")
    assert scheduler.idle and pool.num_used == 0


def test_block_pool_all_or_nothing():
    pool = BlockPool(4, 8)
    a, b = [], []
    assert pool.grow(a, 17) and a == [0, 1, 2]
    assert not pool.grow(b, 9) and b == [] and pool.num_free == 1
    assert pool.grow(a, 24) and pool.num_free == 1  # already held
    assert pool.free(a) == 3 and pool.num_free == 4 and a == []


def test_a_request_with_no_token_to_make_finishes_once_its_prompt_is_cached():
    """max_tokens 0 (scoring a prompt): its chunks run, none samples, and it finishes "length" with no output."""
    scheduler, pool = make(max_step_tokens=8, max_seq_len=32)
    engine = FakeEngine(scheduler)
    long = list(range(1, 21))
    engine.run({0: [("score", long, 0), ("gen", [1, 2, 3], 4)]})
    score = engine.finished["score"]
    assert score.finish_reason == "length" and score.output == [] and score.computed == len(long)
    assert not any(c.samples for s in engine.steps for c in s.chunks if c.request.request_id == "score")
    assert engine.finished["gen"].output == expected_output([1, 2, 3], 4)
    assert pool.num_used == 0
    with pytest.raises(RequestError, match="prompt has 33 tokens; max_seq_len is 32"):
        add(scheduler, "too long", [1] * 33, 0)
    add(scheduler, "whole context", [1] * 32, 0)  # a prompt that fills the context can still be scored


def test_the_lowest_blocks_are_reused_first():
    """Memory in use follows the most blocks held at once: a pool that served many requests one after another has
    handed out only the first few blocks (the cache's untouched pages never become resident)."""
    scheduler, pool = make(num_blocks=64, block_size=4)
    engine = FakeEngine(scheduler)
    used = set()
    for i in range(20):
        request = add(scheduler, i, [1, 2, 3, 4, 5], 3)
        while not scheduler.idle:
            step = scheduler.schedule()
            used.update(b for c in step.chunks for b in c.request.blocks)
            engine.steps.append(step)
            scheduler.advance(step, {c.request.request_id: 7 for c in step.chunks if c.samples})
        assert request.finish_reason == "length"
    assert used == {0, 1} and pool.num_used == 0


def test_the_pacer_sizes_prompt_chunks_by_time_while_streams_decode():
    """Stall-free steps: with a PrefillPacer, a step that also decodes takes only the prompt tokens that keep it near
    its target time, as fitted to the steps measured (a line: fixed cost, then per token); a step that decodes
    nothing takes max_step_tokens; every token still comes out as without it."""
    from lamina.engine.scheduler import PrefillPacer

    pacer = PrefillPacer()
    # the settings this test was written for (the defaults until 2026-12-06)
    pacer.FACTOR, pacer.FLOOR, pacer.WEIGHT = 4.0, 0.1, 0.3
    assert pacer.budget() is None  # nothing measured: max_step_tokens
    pacer.record(0.020, 0, decoding=True)  # a decode-only step: 20 ms, so the target is 100 ms (the floor)
    pacer.record(0.020 + 0.010 + 64 * 0.001, 64, decoding=True)  # 10 ms to run a prompt chunk, 1 ms a token
    pacer.record(0.020 + 0.010 + 16 * 0.001, 16, decoding=True)
    assert pacer.target == pytest.approx(0.1) and pacer.budget() == 70  # (100 - 20 - 10) ms at 1 ms a token
    pacer.record(0.050, 0, decoding=True)  # slower decode steps (more streams): a target of 4 of them
    assert pacer.target == pytest.approx(4 * (0.7 * 0.020 + 0.3 * 0.050))

    scheduler, _ = make(max_step_tokens=64, max_seq_len=512, num_blocks=256)
    scheduler.pacer = pacer = PrefillPacer()
    pacer.FACTOR, pacer.FLOOR, pacer.WEIGHT = 4.0, 0.1, 0.3
    pacer.record(0.020, 0, decoding=True)
    pacer.record(0.020 + 40 * 0.002, 40, decoding=True)  # 2 ms a token: (100 - 20) / 2 = 40 tokens a step
    engine = FakeEngine(scheduler)
    short, long = prompts(1)[0], [(j * 11) % 400 + 1 for j in range(300)]
    engine.run({0: [("short", short, 60)], 2: [("long", long, 4)]})
    assert engine.finished["long"].output == expected_output(long, 4)
    assert engine.finished["short"].output == expected_output(short, 60)
    for s in engine.steps:
        prompt = sum(c.length for c in s.chunks if c.length > 1)
        decoding = any(c.length == 1 for c in s.chunks)
        assert prompt <= (40 if decoding else 64)
    assert max(c.length for s in engine.steps for c in s.chunks if c.request.request_id == "long") == 40


def test_the_pacer_sizes_each_chunk_by_its_depth_and_kind():
    """A prompt token deep in a prompt costs more than one near its start (it attends to more keys), and a scored one
    more again (its logits too): the pacer keeps a line for each depth bucket and kind, and the scheduler asks it for
    the budget of the chunk it is about to run, at that chunk's position."""
    from lamina.engine.scheduler import PrefillPacer

    pacer = PrefillPacer()
    pacer.FACTOR, pacer.FLOOR = 4.0, 0.1  # a target of 100 ms while decode-only steps take 20 ms
    pacer.record(0.020, 0, decoding=True)
    for tokens in (16, 48):  # near the start: 10 ms, then 1 ms a token
        pacer.record(0.020 + 0.010 + tokens * 0.001, tokens, decoding=True, depth=0)
    for tokens in (16, 32):  # from position 1,500 on: 10 ms, then 3.5 ms a token
        pacer.record(0.020 + 0.010 + tokens * 0.0035, tokens, decoding=True, depth=1500)
    pacer.record(0.020 + 0.010 + 16 * 0.002, 16, decoding=True, depth=0, scored=True)  # scored: all of it per token
    assert pacer.budget(0) == 70  # (100 - 20 - 10) ms at 1 ms a token
    assert pacer.budget(1500) == 20  # at 3.5 ms a token
    assert pacer.budget(1024) == 20 and pacer.budget(2047) == 20  # the same bucket: 1,024-2,047
    assert pacer.budget(0, scored=True) == int(0.080 / (0.042 / 16))  # one size so far: 2.625 ms a token
    # a depth with no line yet: the kind's lines together
    pooled = PrefillPacer._line([(16, 0.026), (48, 0.058), (16, 0.066), (32, 0.122)])
    assert pacer.budget(600) == max(pacer.MIN_TOKENS, int((0.1 - 0.020 - pooled[0]) / pooled[1]))
    # a scoring chunk at a depth with no scored line: the scored lines of every depth
    assert pacer.budget(1500, scored=True) == pacer.budget(0, scored=True)
    # a decode-only step that scored cached positions (a chunk of no tokens) is not a decode step
    pacer.record(0.500, 0, decoding=True, scored=True)
    assert pacer.decode_s == pytest.approx(0.020)

    scheduler, _ = make(max_step_tokens=256, max_seq_len=2048, num_blocks=1024)
    scheduler.pacer = pacer
    engine = FakeEngine(scheduler)
    short, long = prompts(1)[0], [(j * 11) % 400 + 1 for j in range(1700)]
    engine.run({0: [("short", short, 400)], 2: [("long", long, 1)]})
    assert engine.finished["long"].output == expected_output(long, 1)
    sizes = [(c.start, c.length) for s in engine.steps for c in s.chunks if c.request.request_id == "long"]
    for start, length in sizes[:-1]:  # while "short" decodes (it outlasts the prompt), by the chunk's depth
        assert length == pacer.budget(start), (start, length)
    assert {length for start, length in sizes if start < 128} == {70}
    assert {length for start, length in sizes[:-1] if start >= 1024} == {20}
