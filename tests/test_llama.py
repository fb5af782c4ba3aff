"""The Llama front end on the engine core: calls from several threads at once, each getting what it would get alone
(outputs routed by request id), and a failed step that reaches every caller instead of hanging one."""

import threading

import pytest

from .engine.test_generate import _prompts


def test_calls_from_several_threads_stay_independent(llama):
    prompts = _prompts([5, 9, 7, 3])
    alone = [llama.generate([p], 10, temperature=0)[0][0] for p in prompts]
    seeded = llama.generate([prompts[0]], 10, temperature=1.0, seed=3)[0][0]
    results: dict = {}

    def greedy(i):
        results[i] = [d.token for d in llama.stream([prompts[i]], 10, temperature=0) if d.token is not None]

    def sampled():
        results["seeded"] = llama.generate([prompts[0]], 10, temperature=1.0, seed=3)[0][0]

    threads = [threading.Thread(target=greedy, args=(i,)) for i in range(3)] + [threading.Thread(target=sampled)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(3)] == alone[:3]
    assert results["seeded"] == seeded  # a seed's draws do not depend on what shared the steps
    assert llama.core.pool.num_used == 0 and not llama.core.has_work


def test_a_failed_step_reaches_every_caller(llama, monkeypatch):
    prompts = _prompts([4, 6])
    other = llama.stream([prompts[1]], 8, temperature=0)
    next(other)  # running, holding its place
    real = llama.core.runner.execute

    def broken(chunks):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(llama.core.runner, "execute", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        llama.generate([prompts[0]], 4, temperature=0)
    with pytest.raises(RuntimeError, match="injected failure"):  # the other call learns of it too
        list(other)
    monkeypatch.setattr(llama.core.runner, "execute", real)
    assert llama.core.pool.num_used == 0 and not llama.core.has_work
    assert len(llama.generate(prompts, 3, temperature=0)[0]) == 2  # and the model goes on
