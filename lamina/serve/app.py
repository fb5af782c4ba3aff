"""The OpenAI-compatible HTTP app: FastAPI routes around an Engine that runs on a thread of its own (loop.py).

A client that goes away mid-stream cancels its handler, which aborts its requests: their KV-cache blocks are free the
next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from lamina.engine.engine import Engine, RequestOutput
from lamina.engine.generate import Llama
from lamina.engine.sampling import SamplingParams
from lamina.errors import CapacityError, LaminaError, RequestError
from lamina.serve.loop import EngineLoop
from lamina.serve.protocol import ChatCompletionRequest, CompletionRequest


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def create_app(
    llama: Llama,
    *,
    model_name: str,
    api_key: str | None = None,
    max_queue: int = 256,
    max_step_tokens: int = 512,
    seed: int = 0,
    kv_cache_memory: int | None = None,
    block_size: int = 16,
) -> FastAPI:
    """The app serving `llama` as `model_name`. The engine thread starts and stops with the app (its lifespan)."""
    engine = Engine(
        llama,
        max_waiting=max_queue,
        max_step_tokens=max_step_tokens,
        seed=seed,
        kv_cache_memory=kv_cache_memory,
        block_size=block_size,
    )
    loop = EngineLoop(engine)
    created = int(time.time())

    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="lamina", lifespan=lifespan)
    app.state.engine_loop = loop

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(loop.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "lamina"}
        return {"object": "list", "data": [card]}

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != model_name:
            return _error(
                404, f"The model `{name}` does not exist; this server serves `{model_name}`", "not_found_error", "model"
            )
        return None

    async def start(prompts: list[list[int]], params: list[SamplingParams], ignore_eos: bool):
        """Submit every choice's request; on any refusal, abort those already queued and raise."""
        started = []
        try:
            for prompt, p in zip(prompts, params):
                started.append(await loop.submit(prompt, p, ignore_eos))
        except BaseException:
            for request_id, _ in started:
                loop.abort(request_id)
            raise
        return started

    async def merged(started) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's outputs as they come: (choice index, output); aborts the unfinished ones if cancelled."""
        pending = {i: q for i, (_, q) in enumerate(started)}
        getters = {asyncio.ensure_future(q.get()): i for i, q in pending.items()}
        try:
            while getters:
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = getters.pop(task)
                    out = task.result()
                    if isinstance(out, Exception):
                        raise out
                    yield i, out
                    if out.finish_reason is None:
                        getters[asyncio.ensure_future(pending[i].get())] = i
                    else:
                        pending.pop(i)
        finally:
            for task in getters:
                task.cancel()
            for i in pending:
                loop.abort(started[i][0])

    async def collect(started) -> dict[int, list[RequestOutput]]:
        """Every choice's outputs, to the end (a non-streaming response)."""
        per_choice: dict[int, list[RequestOutput]] = {i: [] for i in range(len(started))}
        async for i, out in merged(started):
            per_choice[i].append(out)
        return per_choice

    def failure(e: BaseException) -> JSONResponse:
        if isinstance(e, CapacityError):  # the queue is full, or the server is shutting down: try again later
            return _error(429, str(e), "rate_limit_error")
        if isinstance(e, (RequestError, ValueError, ValidationError)):
            return _error(400, str(e))
        # A failed step (a bug, not the request): this request fails, the server goes on.
        return _error(500, f"the engine failed while running this request: {type(e).__name__}: {e}", "server_error")

    def chunk(rid: str, kind: str, now: int, choice: dict) -> str:
        """One server-sent event of a stream: a chunk holding one choice's update."""
        payload = {"id": rid, "object": kind, "created": now, "model": model_name, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    def token_text(token: int) -> str:
        return llama.tokenizer.decode([token])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if (bad := check_model(body.model)) is not None:
            return bad
        try:
            prompts = _prompt_ids(body.prompt, llama)
            choice = body.choices(
                max_tokens=body.max_tokens, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0
            )
            params = [p for _ in prompts for p in choice]
            choice_prompts = [p for p in prompts for _ in range(body.n)]
            echo_lps = None
            if body.echo and body.logprobs is not None:
                echo_lps = await loop.call(
                    lambda: [llama.generate([p], 0, logprobs=True, echo=True)[1][0] for p in prompts]
                )
            started = await start(choice_prompts, params, body.ignore_eos)
        except (LaminaError, ValueError, ValidationError) as e:
            return failure(e)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def echo_text(i: int) -> str:
            return llama.tokenizer.decode(choice_prompts[i]) if body.echo else ""

        def echo_logprobs(i: int) -> dict:
            ids = choice_prompts[i]
            lps = echo_lps[i // body.n]
            return {
                "tokens": [token_text(t) for t in ids],
                "token_logprobs": [None, *lps[1:]],
                "top_logprobs": [None] * len(ids),
            }

        def logprobs_of(outs: list[RequestOutput]) -> dict:
            outs = [o for o in outs if o.token is not None]
            return {
                "tokens": [token_text(o.token) for o in outs],
                "token_logprobs": [o.logprob for o in outs],
                "top_logprobs": [{token_text(t): lp for t, lp in (o.top_logprobs or ())} for o in outs],
            }

        if body.stream:

            async def events():
                if body.echo:
                    for i in range(len(started)):
                        yield chunk(
                            rid,
                            "text_completion",
                            now,
                            {"index": i, "text": echo_text(i), "logprobs": None, "finish_reason": None},
                        )
                async for i, out in merged(started):
                    lp = logprobs_of([out]) if body.logprobs is not None and out.token is not None else None
                    yield chunk(
                        rid,
                        "text_completion",
                        now,
                        {"index": i, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason},
                    )
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        try:
            per_choice = await collect(started)
        except Exception as e:  # noqa: BLE001
            return failure(e)
        choices = []
        for i, outs in per_choice.items():
            lp = None
            if body.logprobs is not None:
                lp = logprobs_of(outs)
                if echo_lps is not None:
                    head = echo_logprobs(i)
                    lp = {k: head[k] + lp[k] for k in lp}
            choices.append(
                {
                    "index": i,
                    "text": echo_text(i) + "".join(o.text for o in outs),
                    "logprobs": lp,
                    "finish_reason": outs[-1].finish_reason,
                }
            )
        completion = sum(outs[-1].completion_tokens for outs in per_choice.values())
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        if (bad := check_model(body.model)) is not None:
            return bad
        try:
            prompt = llama.encode_dialog([m.model_dump() for m in body.messages])
            top = (body.top_logprobs or 0) if body.logprobs else 0
            max_tokens = body.max_completion_tokens or body.max_tokens
            params = body.choices(max_tokens=max_tokens, logprobs=body.logprobs, top_logprobs=top)
            started = await start([prompt] * body.n, params, body.ignore_eos)
        except (LaminaError, ValueError, ValidationError) as e:
            return failure(e)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def content_logprobs(outs: list[RequestOutput]) -> dict | None:
            if not body.logprobs:
                return None
            entries = []
            for o in outs:
                if o.token is None:
                    continue
                text = token_text(o.token)
                alts = [
                    {"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())}
                    for t, lp in (o.top_logprobs or ())
                ]
                entries.append(
                    {"token": text, "logprob": o.logprob, "bytes": list(text.encode()), "top_logprobs": alts}
                )
            return {"content": entries}

        if body.stream:

            async def events():
                for i in range(len(started)):
                    yield chunk(
                        rid,
                        "chat.completion.chunk",
                        now,
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        },
                    )
                async for i, out in merged(started):
                    delta = {"content": out.text} if out.text or out.finish_reason is None else {}
                    yield chunk(
                        rid,
                        "chat.completion.chunk",
                        now,
                        {
                            "index": i,
                            "delta": delta,
                            "logprobs": content_logprobs([out]),
                            "finish_reason": out.finish_reason,
                        },
                    )
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        try:
            per_choice = await collect(started)
        except Exception as e:  # noqa: BLE001
            return failure(e)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
                "logprobs": content_logprobs(outs),
                "finish_reason": outs[-1].finish_reason,
            }
            for i, outs in per_choice.items()
        ]
        completion = sum(outs[-1].completion_tokens for outs in per_choice.values())
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion,
                "total_tokens": len(prompt) + completion,
            },
        }

    return app


def _prompt_ids(prompt, llama: Llama) -> list[list[int]]:
    """A completions prompt (text, ids, or a list of either) as token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt is empty")
    out = []
    for p in prompt:
        ids = llama.tokenizer.encode(p, bos=llama.tokenizer.add_bos, eos=False) if isinstance(p, str) else list(p)
        if not ids:
            raise RequestError("a prompt has no tokens")
        out.append(ids)
    return out
