"""The HTTP server, started for real on loopback and spoken to with the official `openai` client (and raw HTTP for
malformed input): its answers against the offline API on the same model, streaming, logprobs, stop strings, seeds,
errors, auth, the bounded queue, and a client that disconnects mid-stream."""

import json
import logging
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import lamina
from lamina.serve.app import create_app

MODEL = "smollm2"


def _serve(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def llama():
    return lamina.load(max_batch_size=4, max_seq_len=512)


@pytest.fixture(scope="module")
def server(llama):
    server, thread, url = _serve(create_app(llama, model_name=MODEL))
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completion_equals_offline_greedy(client, llama):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)
    (expected,), _ = llama.generate([ids], 12, temperature=0)
    assert out.choices[0].text == llama.tokenizer.decode(expected)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_chat_equals_offline_greedy_and_streams_the_same(client, llama):
    expected = llama.chat_completion([QUESTION], temperature=0, max_gen_len=24)[0]["generation"]["content"]
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the most probable
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob <= 0


def _stop_entry(llama, ids: list[int]) -> tuple[str, float]:
    """The stop token the model picks greedily after `ids` (asserted: it stops there) and its log-probability,
    scored offline as the prompt's last token."""
    (tokens,), _ = llama.generate([ids], 1, temperature=0)
    assert tokens == [], "the model does not stop here"
    scored = {
        s: llama.generate([ids + [s]], 0, logprobs=True, echo=True)[1][0][-1] for s in llama.tokenizer.stop_tokens
    }
    stop = max(scored, key=scored.get)
    return llama.tokenizer.decode([stop]), scored[stop]


def test_a_stop_token_has_its_logprobs_entry(client, llama):
    """OpenAI's and vLLM's rule, which lm-eval counts on: a reply ended by a stop token has an entry for it in its
    logprobs (the text stays without it), in completions and chat, streamed or not, for each of n choices. Offline
    `generate` keeps Meta's rule (the stop token is cut: no token, no logprob)."""
    prompt = "Question: Which planet do we live on?\nAnswer: Earth."
    ids = llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)
    text, logprob = _stop_entry(llama, ids)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2, n=2)
    for choice in out.choices:
        assert choice.text == prompt and choice.finish_reason == "stop"
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
        assert lp.tokens[-1] == text and lp.token_logprobs[-1] == pytest.approx(logprob, abs=2e-3)
        assert max(lp.top_logprobs[-1], key=lp.top_logprobs[-1].get) == text  # greedy: the most probable
    assert out.usage.completion_tokens == 0  # the completion's tokens: the stop token is not one of them
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, stream=True)
    )
    entries = [
        (t, v)
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t, v in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs)
    ]
    assert [t for t, _ in entries] == [text] and entries[0][1] == pytest.approx(logprob, abs=2e-3)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ""
    # chat: a reply that ends, its last entry the stop token (greedy: the most probable there)
    question = [{"role": "user", "content": "Say hello."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=64, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    content = choice.logprobs.content
    stops = {llama.tokenizer.decode([s]) for s in llama.tokenizer.stop_tokens}
    assert len(content) == reply.usage.completion_tokens + 1 and content[-1].token in stops
    assert content[-1].top_logprobs[0].token == content[-1].token and content[-1].logprob <= 0
    assert not any(e.token in stops for e in content[:-1]) and not choice.message.content.endswith(content[-1].token)
    streamed = list(
        client.chat.completions.create(
            model=MODEL,
            messages=question,
            max_tokens=64,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    got = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed[-2].choices[0].finish_reason == "stop" and len(got) == streamed[-1].usage.completion_tokens + 1
    assert streamed[-2].choices[0].logprobs.content[-1] == got[-1] and got[-1].token in stops
    assert not any(e.token in stops for e in got[:-1])


def test_completion_list_of_prompts_n_and_echo(client, llama):
    out = client.completions.create(
        model=MODEL, prompt=["Hello", "Paris is"], max_tokens=3, temperature=0, n=2, echo=True, logprobs=1
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith("Hello") and out.choices[0].text == out.choices[1].text
    assert out.choices[2].text.startswith("Paris is")
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs)
    ids = client.completions.create(model=MODEL, prompt=[[504, 3575], [282]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 3


def test_stop_strings_and_seeds(client):
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=123)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"model": "gpt-4"}, openai.NotFoundError),
        ({"temperature": -1}, openai.BadRequestError),
        ({"top_p": 0}, openai.BadRequestError),
        ({"max_tokens": 0}, openai.BadRequestError),
        ({"logit_bias": {"999999": 1}}, openai.BadRequestError),
        ({"prompt": "word " * 600}, openai.BadRequestError),
    ],
)
def test_bad_requests_get_openai_errors(client, kwargs, error):
    request = {"model": MODEL, "prompt": "Hi", "max_tokens": 4} | kwargs
    with pytest.raises(error) as info:
        client.completions.create(**request)
    assert info.value.body["message"]  # an OpenAI-style error body with a message


def test_malformed_bodies(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]


def _metric(server, name) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def test_a_client_that_disconnects_frees_its_cache_rows(server):
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 400, "stream": True, "ignore_eos": True},
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _metric(server, "lamina_kv_blocks_used") >= 1
    for _ in range(100):  # closed: the request is aborted at once
        if _metric(server, "lamina_kv_blocks_used") == 0 and _metric(server, "lamina_requests_running") == 0:
            break
        time.sleep(0.05)
    assert _metric(server, "lamina_kv_blocks_used") == 0
    text = httpx.get(f"{server}/metrics").text
    assert "lamina_time_to_first_token_seconds_bucket" in text and "lamina_inter_token_latency_seconds_count" in text


def test_api_key_and_a_full_queue(llama):
    app = create_app(llama, model_name=MODEL, api_key="secret", max_queue=0)
    server, thread, url = _serve(app)
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        streams = [
            client.completions.create(model=MODEL, prompt="Count:", max_tokens=300, stream=True) for _ in range(4)
        ]  # the four cache rows
        for s in streams:
            next(iter(s))
        with pytest.raises(openai.RateLimitError):  # nothing may wait beyond the batch
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        for s in streams:
            s.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_load_64_concurrent_streams_a_third_disconnecting(llama):
    """64 streaming requests at once (mixed prompts, sampling and lengths; 16 cache rows, so most of them queue),
    every third client hanging up after two chunks: all the others complete, greedy ones with offline generate's
    text, and afterwards no cache row is held."""
    import asyncio

    texts = [
        "The capital of France is",
        "1, 2, 3,",
        "Once upon a time there was a",
        "def fibonacci(n):",
        "The best way to learn a language is",
        "Water boils at",
    ]
    big = lamina.load(max_batch_size=16, max_seq_len=256)
    server, thread, url = _serve(create_app(big, model_name=MODEL, max_queue=64))
    requests = []
    for i in range(64):
        prompt = texts[i % len(texts)] + " " * (i % 3)
        greedy = i % 2 == 0
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 6 + i % 11,
            "stream": True,
            "temperature": 0 if greedy else 0.8,
            "top_p": 0.9,
            "seed": i,
        }
        requests.append((body, greedy, i % 3 == 1))

    async def one(client, body, hang_up):
        text, chunks, finish = "", 0, None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text, chunks, finish = text + choice["text"], chunks + 1, choice["finish_reason"] or finish
                if hang_up and chunks == 2:
                    return None
        return text, finish

    async def everyone():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, b, h) for b, _, h in requests))

    try:
        results = asyncio.run(everyone())
        for (body, greedy, hang_up), result in zip(requests, results):
            if hang_up:
                continue
            text, finish = result
            assert finish in ("stop", "length")
            if greedy:
                ids = big.tokenizer.encode(body["prompt"], bos=big.tokenizer.add_bos, eos=False)
                (expected,), _ = big.generate([ids], body["max_tokens"], temperature=0)
                assert text == big.tokenizer.decode(expected), body
        for _ in range(100):
            if _metric(url, "lamina_kv_blocks_used") == 0:
                break
            time.sleep(0.05)
        assert _metric(url, "lamina_kv_blocks_used") == 0 and _metric(url, "lamina_requests_waiting") == 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_failing_step_fails_its_requests_not_the_server(llama):
    app = create_app(llama, model_name=MODEL)
    server, thread, url = _serve(app)
    engine = app.state.engine_loop.engine
    real_step, calls = engine.step, []

    def broken_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real_step()

    engine.step = broken_once
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
        out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert _metric(url, "lamina_kv_blocks_used") == 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _cli_server(*flags: str):
    """`python -m lamina serve` on a free port with `flags`, once its /health answers: (the process, its URL)."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamina", "serve", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not answer /health within a minute")


def test_sigterm_drains_streams_and_exits_cleanly():
    import signal

    proc, url = _cli_server("--max-seq-len", "512")
    port = url.rsplit(":", 1)[1]
    try:
        body = {"prompt": "Count to a thousand:", "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # in-flight requests are drained: the stream runs to its end
        events = [line for line in rest if line.startswith("data:")]
        assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
        # uvicorn shuts down, then re-raises the signal: the conventional status of a process ended by SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_refuses_new_requests_with_503_while_it_drains_and_exits_0():
    """The first SIGTERM drains: the stream in flight runs to its end, a new request gets 503 with Retry-After and
    OpenAI's error body at once, /health says "draining" (503), and the process exits with status 0. With a short
    --drain-timeout, what is still running then ends with finish_reason "abort" (and the status is still 0)."""
    import signal

    for timeout, finish in (("60", "length"), ("0.5", "abort")):
        proc, url = _cli_server("--max-seq-len", "512", "--drain-timeout", timeout)
        try:
            body = {"prompt": "Count to a thousand:", "max_tokens": 400, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
                if finish == "length":
                    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
                    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
                    assert refused.json()["error"]["type"] == "service_unavailable"
                    health = httpx.get(f"{url}/health", timeout=10)
                    assert health.status_code == 503 and health.json()["status"] == "draining"
                rest = list(lines)
            events = [line for line in rest if line.startswith("data:")]
            assert events[-1] == "data: [DONE]" and f'"finish_reason": "{finish}"' in events[-2]
            assert proc.wait(timeout=60) == 0
            log = proc.stderr.read()
            assert "SIGTERM: draining 1 request(s)" in log and "Traceback" not in log
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_full_queue_answers_429_with_retry_after_and_health_says_overloaded(llama):
    server, thread, url = _serve(create_app(llama, model_name=MODEL, max_queue=0))
    try:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        streams = [
            client.completions.create(model=MODEL, prompt="Count:", max_tokens=300, stream=True) for _ in range(4)
        ]  # the four cache rows
        for stream in streams:
            next(iter(stream))
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "overloaded"
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert (
            refused.json()["error"]["type"] == "rate_limit_error"
            and "queue is full" in refused.json()["error"]["message"]
        )
        for stream in streams:
            stream.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_seed_gives_the_same_tokens_from_generate_the_cli_and_the_server(client, llama):
    import subprocess
    import sys

    prompt, settings = "Once upon a time", dict(temperature=0.8, top_p=0.9)
    ids = llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)
    (offline,), _ = llama.generate([ids], 12, **settings, seed=5)
    served = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, seed=5, **settings)
    cli = subprocess.run(
        [sys.executable, "-m", "lamina", "generate", prompt, "--json", "--seed", "5", "--max-tokens", "12"]
        + ["--temperature", "0.8", "--top-p", "0.9", "--max-seq-len", "512"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["ids"] == offline
    assert served.choices[0].text == llama.tokenizer.decode(offline)
    assert offline != llama.generate([ids], 12, **settings, seed=6)[0][0]  # the seed matters


def test_echo_scores_every_prompt_position(client, llama):
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)
    (_,), (offline,) = llama.generate([ids], 0, logprobs=True, echo=True)
    for max_tokens in (0, 3):
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0
        )
        choice = out.choices[0]
        lp = choice.logprobs
        assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + max_tokens
        assert lp.tokens[: len(ids)] == [llama.tokenizer.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(offline[1:], abs=1e-4)
        assert all(len(top) == 2 and max(top.values()) <= 0 for top in lp.top_logprobs[1:])
        assert out.usage.completion_tokens == max_tokens


def test_a_scored_prompt_s_answer_is_built_off_the_event_loop(client, monkeypatch):
    """An answer with an entry per prompt token is built and encoded in a worker thread (the event loop goes on
    streaming to others meanwhile); a plain one, small, where it is."""
    from lamina.serve import responses

    threads, encode = [], responses.encode
    monkeypatch.setattr(responses, "encode", lambda body: threads.append(threading.current_thread()) or encode(body))
    prompt = "The quick brown fox jumps over the lazy dog " * 40
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert len(scored.choices[0].logprobs.tokens) > 300 and plain.choices[0].text
    worker, loop = threads  # asyncio's default executor names its threads asyncio_N
    assert worker.name.startswith("asyncio") and not loop.name.startswith("asyncio") and worker is not loop
    streamed = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, stream=True)
    )
    assert streamed[0].choices[0].logprobs.tokens[:300] == scored.choices[0].logprobs.tokens[:300]
    assert len(threads) == 3 and threads[2].name.startswith("asyncio")  # the chunk with the prompt's entries


def test_openai_limits_and_errors(client, server, llama):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * 500, max_tokens=100)
    assert "maximum context length is 512 tokens" in info.value.body["message"]
    assert "501 in the prompt, 100 in the completion" in info.value.body["message"]
    # No max_tokens: up to the context (the reply ends at its end-of-turn token well before it).
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="top_logprobs requires logprobs"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="0 only with echo"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    headers = {"content-type": "application/json"}
    for body in (b'{"prompt": "\xff\xfe"}', b"\xff\xfe\xfd"):
        r = httpx.post(f"{server}/v1/completions", content=body, headers=headers)
        assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"]["message"]


def test_stream_options_include_usage(client):
    for create, kwargs in (
        (client.completions.create, dict(prompt="1, 2, 3,")),
        (client.chat.completions.create, dict(messages=QUESTION)),
    ):
        chunks = list(
            create(
                model=MODEL, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}, **kwargs
            )
        )
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert all(c.usage is None for c in chunks[:-1])


def test_tokenizer_endpoints(server, llama):
    text = "Hello, world! <|im_end|>"
    r = httpx.post(f"{server}/tokenize", json={"prompt": text}).json()
    expected = llama.tokenizer.encode(text, bos=llama.tokenizer.add_bos, eos=False, allowed_special="all")
    assert r == {"tokens": expected, "count": len(expected), "max_model_len": 512}
    assert llama.tokenizer.eos_id in expected  # special tokens in the text are special, as vLLM reads them
    plain = httpx.post(f"{server}/tokenize", json={"prompt": "Hi", "add_special_tokens": False}).json()["tokens"]
    assert plain == llama.tokenizer.encode("Hi", bos=False, eos=False)
    chat = httpx.post(f"{server}/tokenize", json={"messages": QUESTION}).json()["tokens"]
    assert chat == llama.encode_dialog(QUESTION)
    assert httpx.post(f"{server}/detokenize", json={"tokens": expected}).json() == {
        "prompt": llama.tokenizer.decode(expected)
    }
    info = httpx.get(f"{server}/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 512
    assert info["chat_template"] and "im_start" in info["chat_template"]
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server}/tokenize", json={})
    assert bad.status_code == 400 and "prompt or messages" in bad.json()["error"]["message"]


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(client, server):
    """Two chats with one long system message: the second reports the cached prompt tokens in its usage (OpenAI's
    `prompt_tokens_details.cached_tokens`), answers as the first would without the cache, and /metrics counts the
    prefix cache's queries and hits under vLLM's names."""
    system = {"role": "system", "content": "You are a terse assistant. " * 20}

    def ask(question: str):
        messages = [system, {"role": "user", "content": question}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)

    def metric(name: str) -> float:
        lines = httpx.get(f"{server}/metrics").text.splitlines()
        return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))

    hits = metric("vllm:prefix_cache_hits_total")
    first = ask("Name a color.")
    second = ask("Name a fruit.")
    assert second.usage.prompt_tokens_details.cached_tokens >= 100  # the system message's full blocks
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < 16
    assert metric("vllm:prefix_cache_hits_total") - hits >= second.usage.prompt_tokens_details.cached_tokens
    assert metric("vllm:prefix_cache_queries_total") >= metric("vllm:prefix_cache_hits_total")
    assert 0 <= metric("vllm:kv_cache_usage_perc") <= 1


def _log_line(caplog, needle: str) -> str:
    """The server's log line holding `needle` (written once the response has ended, on the server's thread)."""
    for _ in range(100):
        found = [r.getMessage() for r in caplog.records if r.name == "lamina.serve" and needle in r.getMessage()]
        if found:
            return found[-1]
        time.sleep(0.02)
    raise AssertionError(f"no log line with {needle!r} in {[r.getMessage() for r in caplog.records]}")


def test_request_ids_are_echoed_and_each_request_is_logged(server, caplog):
    caplog.set_level(logging.INFO, logger="lamina.serve")
    body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    given = httpx.post(f"{server}/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42" and given.json()["id"] == "cmpl-trace-42"
    usage = given.json()["usage"]
    line = _log_line(caplog, "trace-42 ")
    assert re.fullmatch(
        rf"trace-42 POST /v1/completions 200 prompt_tokens={usage['prompt_tokens']} completion_tokens=5 "
        r"ttft=\d+\.\d{3}s finish=length total=\d+\.\d{3}s",
        line,
    ), line

    chat = {"messages": QUESTION, "max_tokens": 4, "stream": True, "n": 2, "temperature": 0.5, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=chat) as r:
        rid = r.headers["x-request-id"]
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    first = json.loads(events[0][6:])
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and first["id"] == f"chatcmpl-{rid}"  # a new id, the same in both
    assert re.search(
        r"POST /v1/chat/completions 200 prompt_tokens=\d+ completion_tokens=8 .* finish=length,length ",
        _log_line(caplog, rid),
    )

    # An id that could forge a log line or header is replaced; errors are logged with their status.
    bad = httpx.post(f"{server}/v1/completions", json={"prompt": ""}, headers={"X-Request-Id": "a b"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] != "a b"
    assert "POST /v1/completions 400 total=" in _log_line(caplog, bad.headers["x-request-id"])
    assert httpx.get(f"{server}/health").headers["x-request-id"]
    # A path that decodes to a line break stays one line (percent-encoded) in the log.
    forged = httpx.get(f"{server}/x%0A2026-01-01 INFO lamina.serve: forged", headers={"X-Request-Id": "path-1"})
    assert forged.status_code == 404
    line = _log_line(caplog, "path-1 ")
    assert "\n" not in line and line.startswith(
        "path-1 GET /x%0A2026-01-01%20INFO%20lamina.serve%3A%20forged 404 total="
    )


def test_the_page_and_without_it_none(llama):
    for ui in (True, False):
        server, thread, url = _serve(create_app(llama, model_name=MODEL, ui=ui))
        try:
            page = httpx.get(url + "/")
            assets = [httpx.get(f"{url}/static/{name}") for name in ("chat.js", "chat.css", "favicon.svg")]
            if not ui:
                assert page.status_code == 404 and page.json()["error"]["type"] == "not_found_error"
                assert {a.status_code for a in assets} == {404}
                assert httpx.get(f"{url}/v1/models").status_code == 200
                continue
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script may run
            assert '<script src="/static/chat.js"' in page.text
            assert {a.status_code for a in assets} == {200}
            assert httpx.get(f"{url}/static/secrets.txt").status_code == 404
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def test_speculative_decoding_through_the_cli_serve_keeps_replies_and_counts_drafts(llama):
    """`lamina serve --speculative-config` (prompt lookup): greedy replies, streamed or not, are the offline ones
    without speculation, usage counts the tokens, and /metrics has vLLM's spec-decode counters."""
    import subprocess
    import sys

    spec = {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    proc, url = _cli_server("--max-seq-len", "512", "--speculative-config", json.dumps(spec))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        prompt = "Repeat this line three times: the cat sat on the mat, the cat sat on the mat."
        ids = llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)
        (offline,), _ = llama.generate([ids], 40, temperature=0)
        name = client.models.list().data[0].id
        reply = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0)
        assert reply.choices[0].text == llama.tokenizer.decode(offline)
        assert reply.usage.completion_tokens == len(offline)
        streamed = client.completions.create(model=name, prompt=prompt, max_tokens=40, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
        metrics = httpx.get(f"{url}/metrics").text
        values = {
            line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("vllm:spec")
        }
        assert values["vllm:spec_decode_num_accepted_tokens_total"] <= values["vllm:spec_decode_num_draft_tokens_total"]
        positions = [v for k, v in values.items() if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos")]
        assert len(positions) == 6 and sum(positions) == values["vllm:spec_decode_num_accepted_tokens_total"]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # a malformed configuration is refused before the model loads
    bad = subprocess.run(
        [sys.executable, "-m", "lamina", "serve", "--speculative-config", '{"num_speculative_tokens": 0}'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "num_speculative_tokens must be an integer in 1..32" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_long_prompt_does_not_stall_the_streams():
    """Stall-free steps on the real server: while a fresh 2,000-token prompt is prefilled (and scored, as lm-eval
    asks), a stream that is decoding keeps getting tokens, its longest pause at most a quarter of the time the prompt's
    request takes. Before the pacer it paused for each 512-token chunk: four pauses, the longest about a third."""
    import random

    big = lamina.load(max_batch_size=4, max_seq_len=4096)
    server, thread, url = _serve(create_app(big, model_name=MODEL))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(
            model=MODEL, prompt="Count to a thousand:", max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        for _ in range(20):  # decoding: the pacer has measured decode steps
            next(chunks)
        rng = random.Random(0)
        for scored in (False, True):
            prompt = [rng.randrange(1000, 20000) for _ in range(2000)]  # fresh: nothing from the prefix cache
            done = {}

            def long_request():
                start = time.perf_counter()
                client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=1, echo=scored, logprobs=1 if scored else None
                )
                done["took"] = time.perf_counter() - start
                done["end"] = time.perf_counter()

            worker = threading.Thread(target=long_request)
            start = time.perf_counter()
            worker.start()
            arrivals = [start]
            while "end" not in done:
                next(chunks)
                arrivals.append(time.perf_counter())
            worker.join()
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
            assert len(arrivals) > 12, "the stream got few tokens while the prompt was prefilled"
            assert max(gaps) <= done["took"] / 4, (max(gaps), done["took"])
        stream.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_clients_that_go_away_queued_or_mid_prefill_leave_nothing_behind():
    """A client that disconnects while its request waits in the queue (streaming, or waiting for an answer in one
    piece), or while its 2,000-token prompt is being prefilled (spread over steps), has its request aborted: soon
    nothing runs or waits that should not, and at the end every KV block is free."""
    import random

    big = lamina.load(max_batch_size=2, max_seq_len=4096)
    server, thread, url = _serve(create_app(big, model_name=MODEL, max_queue=8))
    core = big.core

    def stream(prompt, max_tokens):
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        return httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60)

    def soon(condition) -> bool:
        for _ in range(200):
            if condition():
                return True
            time.sleep(0.05)
        return False

    def settled() -> bool:
        return soon(lambda: core.scheduler.idle and core.pool.num_used == 0)

    try:
        rng = random.Random(1)
        with stream("Count to a thousand:", 3000) as a, stream("Once upon a time", 3000) as b:  # the two rows
            lines_a, lines_b = a.iter_lines(), b.iter_lines()
            next(line for line in lines_a if line.startswith("data:"))
            next(line for line in lines_b if line.startswith("data:"))
            with stream("Queued, then gone", 50):  # waits for a row; its client leaves before it runs
                time.sleep(0.3)
                assert len(core.scheduler.waiting) == 1
            assert soon(lambda: not core.scheduler.waiting) and len(core.scheduler.running) == 2
            # a client waiting for an answer in one piece, which gives up while its request is queued
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 50}, timeout=0.5)
            assert soon(lambda: not core.scheduler.waiting) and len(core.scheduler.running) == 2
        assert settled(), (len(core.scheduler.running), len(core.scheduler.waiting), core.pool.num_used)
        with stream("Count to a thousand:", 1000) as a:
            lines_a = a.iter_lines()
            next(line for line in lines_a if line.startswith("data:"))
            prompt = [rng.randrange(1000, 20000) for _ in range(2000)]
            with stream(prompt, 20):  # its prompt is prefilled over many steps; its client leaves meanwhile
                time.sleep(0.5)
                (long,) = [r for r in core.scheduler.running if len(r.prompt) == 2000]
                assert 0 < long.computed < 2000  # mid-prefill
            assert soon(lambda: all(len(r.prompt) != 2000 for r in core.scheduler.running))
            assert len(core.scheduler.running) == 1 and long.blocks == []
        assert settled(), (len(core.scheduler.running), len(core.scheduler.waiting), core.pool.num_used)
        assert _metric(url, "lamina_kv_blocks_used") == 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)
