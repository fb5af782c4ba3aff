"""The HTTP app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, vLLM's /tokenize, /detokenize and
/tokenizer_info, /health and /metrics. Routes turn bodies into engine requests (lamina.serve.protocol), submit them
to the engine thread (lamina.serve.loop) and build OpenAI's answers from the outputs (lamina.serve.responses).

A client that goes away mid-stream cancels its handler, which aborts its requests: their KV-cache blocks are free the
next step. Every request has an id (`X-Request-Id`) and a log line (lamina.serve.log); `/` is the chat page
(lamina.serve.page) unless the app is made without it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from lamina.engine import Request, StructuredOutputs
from lamina.errors import CapacityError, LaminaError, RequestError, ShuttingDown
from lamina.llama import Llama
from lamina.tokenizer.tools import CallStream, Tool, check_tools
from lamina.serve import page
from lamina.serve import responses as r
from lamina.serve.log import RequestLog, Trace
from lamina.serve.loop import EngineLoop
from lamina.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    token_budget,
)


@dataclass
class Served:
    """What the routes need: the model, its name, the engine thread."""

    llama: Llama
    name: str
    loop: EngineLoop
    created: int

    def token_text(self, token: int) -> str:
        return self.llama.tokenizer.decode([token])


def create_app(
    llama: Llama, *, model_name: str, api_key: str | None = None, max_queue: int = 256, ui: bool = True
) -> FastAPI:
    """The app serving `llama` as `model_name` on the model's one engine core. The engine thread starts and stops
    with the app (its lifespan). At most `max_queue` requests wait beyond the running batch (then 429). `ui`: the
    chat page at `/` (it asks for the API key where one is set; the key guards /v1/ only, as for any client)."""
    loop = EngineLoop(llama, max_queue)

    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="lamina", lifespan=lifespan)
    app.state.engine_loop = loop
    app.state.served = Served(llama, model_name, loop, int(time.time()))
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)

    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(RequestLog)  # outermost: a refused request has its id and its log line too
    app.include_router(router)
    if ui:
        app.include_router(page.router)
    return app


router = APIRouter()


class ApiKey:
    """Requests to /v1/ need `Authorization: Bearer <key>`. A plain ASGI middleware: Starlette's "http" middleware
    (BaseHTTPMiddleware) hides a client's disconnect from the handlers behind it (`Request.is_disconnected` stays
    False), and a handler answering in one piece needs it (`_while_connected`)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                refused = _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, **headers: str
) -> JSONResponse:
    return JSONResponse(r.error_body(message, kind, param), status_code=status, headers=headers or None)


# Retry-After (seconds) of a refusal: a full queue frees a place as soon as a request finishes; a server shutting
# down will not take the request again (another replica may, after a load balancer has seen its /health).
RETRY_FULL_S, RETRY_DRAINING_S = 1, 5


async def _invalid_body(request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return _error(400, f"{where or 'body'}: {message}", param=where or None)


async def _http_error(request, exc: HTTPException):
    """Starlette's own errors (a body that is not UTF-8, an unknown route) in OpenAI's error shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, str(exc.detail), kind)


class ClientGone(Exception):
    """The client of a request answered in one piece went away before its answer was ready."""


async def _while_connected(request: HTTPRequest, outputs):
    """`outputs` as a handler that answers in one piece reads them, watching the connection meanwhile (a stream
    notices a client that goes away when it writes; this answer writes only at the end): when the client goes away,
    the handler is interrupted there and its requests are aborted (their blocks free by the next step), raising
    ClientGone, instead of running to their ends for nobody."""
    task, gone = asyncio.current_task(), asyncio.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        gone.set()
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for item in outputs:
            yield item
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        task.uncancel()
        raise ClientGone("the client went away before the answer was ready") from None
    finally:
        watcher.cancel()


def _failure(e: BaseException) -> JSONResponse:
    if isinstance(e, ClientGone):  # nobody reads it; the log says 499, as nginx's does
        return _error(499, str(e), "client_closed_request")
    if isinstance(e, ShuttingDown):  # draining (SIGTERM): the requests it has finish, new ones go elsewhere
        return _error(503, str(e), "service_unavailable", **{"Retry-After": str(RETRY_DRAINING_S)})
    if isinstance(e, CapacityError):  # the queue is full: try again later
        return _error(429, str(e), "rate_limit_error", **{"Retry-After": str(RETRY_FULL_S)})
    if isinstance(e, (RequestError, ValueError, ValidationError)):
        return _error(400, str(e))
    # A failed step (a bug, not the request): this request fails, the server goes on.
    return _error(500, f"the engine failed while running this request: {type(e).__name__}: {e}", "server_error")


async def _answer(build, *, large: bool) -> Response:
    """A one-piece answer, `build()` giving its JSON. A `large` one (logprobs: an entry per token, for a scored
    prompt thousands) is built in a worker thread, encoded in pieces (responses.encode): the event loop meanwhile
    goes on streaming to others, and the engine thread runs between the pieces."""
    content = await asyncio.to_thread(build) if large else build()
    return Response(content, media_type="application/json")


def _served(request: HTTPRequest) -> Served:
    return request.app.state.served


def _logged(request: HTTPRequest, outputs, choices: int, prompt_tokens: int):
    """The request's log record (lamina.serve.log, set by RequestLog), told what it runs, and the engine's outputs
    counted in it as they are read. Called once the engine has the requests: a refused request's line has no token
    fields."""
    trace: Trace = request.scope["state"]["trace"]
    trace.prompt_tokens, trace.choices = prompt_tokens, choices
    return trace, _traced(outputs, trace)


def _unknown_model(served: Served, name: str | None) -> JSONResponse | None:
    if name is not None and name != served.name:
        message = f"The model `{name}` does not exist; this server serves `{served.name}`"
        return _error(404, message, "not_found_error", "model")
    return None


@router.get("/health")
async def health(request: HTTPRequest):
    """{"status": "ok"}; "overloaded" (still 200: it answers, but a request now would get 429) with the queue's
    size; "draining" with 503 once it shuts down (a load balancer's readiness check sends no more)."""
    loop = _served(request).loop
    if loop.draining:
        return JSONResponse({"status": "draining", "in_flight": loop.in_flight}, status_code=503)
    if loop.overloaded:
        return {"status": "overloaded", "in_flight": loop.in_flight, "max_queue": loop.max_queue}
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: HTTPRequest):
    served = _served(request)
    return PlainTextResponse(served.loop.metrics.text(served.loop.engine), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: HTTPRequest):
    served = _served(request)
    card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "lamina"}
    return {"object": "list", "data": [card]}


# ---------------------------------------------------------------------------------------------------------------------
# Completions


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: HTTPRequest):
    served = _served(request)
    if (bad := _unknown_model(served, body.model)) is not None:
        return bad
    try:
        prompts = _prompt_ids(body.prompt, served.llama)
        requests = _completion_requests(body, prompts, served.llama)
        await _compile_constraints(served, requests)
        outputs = await served.loop.submit(requests)
    except (LaminaError, ValueError, ValidationError) as e:
        return _failure(e)
    trace, outputs = _logged(request, outputs, len(requests), sum(len(p) for p in prompts))
    rid, now = f"cmpl-{trace.id}", int(time.time())
    tokenizer = served.llama.tokenizer
    echoed: set[int] = set()

    def piece(i: int, out) -> tuple[str, dict | None]:
        echo = None
        if body.echo and i not in echoed:
            echoed.add(i)
            echo = (tokenizer.decode(requests[i].prompt), requests[i].prompt)
        return r.completion_piece(out, echo=echo, logprobs=body.logprobs is not None, token_text=served.token_text)

    scored = body.echo and body.logprobs is not None  # a body as long as the prompt: built off the event loop

    if body.stream:

        def event(i: int, out, large: bool = False) -> str:
            text, lp = piece(i, out)
            choice = r.completion_choice(i, text, lp, out.finish_reason, unmet=out.constraint_unmet)
            chunk = r.completion_body(rid, now, served.name, [choice], None, chunk=True)
            return r.sse_large(chunk) if large else r.sse(chunk)

        async def events():
            completion, cached = 0, {}
            async for i, out in outputs:
                completion += out.token is not None
                cached.setdefault(i, out.cached_tokens)
                yield await asyncio.to_thread(event, i, out, True) if scored and i not in echoed else event(i, out)
            if body.include_usage:
                use = _usage(prompts, completion, cached, body.n)
                yield r.sse(r.completion_body(rid, now, served.name, [], use, chunk=True))
            yield r.sse("[DONE]")

        return StreamingResponse(_guarded(events()), media_type="text/event-stream")
    try:
        outs = [item async for item in _while_connected(request, outputs)]
    except Exception as e:  # noqa: BLE001
        return _failure(e)

    def answer() -> bytes:
        pieces: dict[int, list] = {i: [] for i in range(len(requests))}
        finish: dict[int, str] = {}
        unmet: dict[int, bool] = {}
        completion, cached = 0, {}
        for i, out in outs:
            pieces[i].append(piece(i, out))
            completion += out.token is not None
            cached.setdefault(i, out.cached_tokens)
            finish[i] = out.finish_reason or finish.get(i)
            unmet[i] = out.constraint_unmet or unmet.get(i, False)
        choices = [
            r.completion_choice(
                i, "".join(t for t, _ in ps), r.merge_logprobs([lp for _, lp in ps]), finish[i], unmet=unmet[i]
            )
            for i, ps in pieces.items()
        ]
        use = _usage(prompts, completion, cached, body.n)
        return r.encode(r.completion_body(rid, now, served.name, choices, use))

    return await _answer(answer, large=body.logprobs is not None)


def _usage(prompts: list[list[int]], completion: int, cached: dict[int, int], n: int) -> dict:
    """Usage of a completions call: each prompt counted once (its n choices share it: choice i is prompt i // n),
    its cached tokens as its first choice found them."""
    return r.usage(sum(len(p) for p in prompts), completion, sum(cached.get(j * n, 0) for j in range(len(prompts))))


def _completion_requests(body: CompletionRequest, prompts: list[list[int]], llama: Llama) -> list[Request]:
    """A request per choice: n for each prompt (choice i is prompt i // n), each within the context."""
    context = llama.config.max_seq_len
    scored = body.echo and body.logprobs is not None
    extra = {"prompt_logprobs": body.logprobs} if scored else {}
    params = body.choices(
        max_tokens=body.max_tokens or None, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0, **extra
    )
    requests = []
    for prompt in prompts:
        budget = token_budget(len(prompt), body.max_tokens, context)
        requests += [llama.new_request(prompt, p, max_tokens=budget) for p in params]
    return requests


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


async def _traced(outputs, trace: Trace):
    """The engine's outputs, each counted in the request's log record as it is read; closing this closes the
    outputs, which aborts what still runs."""
    try:
        async for i, out in outputs:
            trace.output(i, out)
            yield i, out
    except Exception:
        trace.failed = True  # a failed step: its unfinished choices are logged as "error", not "cancelled"
        raise
    finally:
        await outputs.aclose()


async def _compile_constraints(served: Served, requests: list[Request]) -> None:
    """Compile the requests' structured-output constraints on a worker thread, before they reach the engine thread:
    a new grammar then delays only its own request, never the running ones (a compiled one is cached)."""
    specs = {r.params.structured_outputs for r in requests} - {None}
    for spec in specs:
        await asyncio.to_thread(served.llama.core.grammars.compile, spec)


async def _guarded(events):
    """A stream's events; a failure mid-stream ends it with an error event instead of a broken connection."""
    try:
        async for event in events:
            yield event
    except Exception as e:  # noqa: BLE001
        yield r.sse(
            r.error_body(f"the engine failed while running this request: {type(e).__name__}: {e}", "server_error")
        )


# ---------------------------------------------------------------------------------------------------------------------
# Chat


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: HTTPRequest):
    served = _served(request)
    if (bad := _unknown_model(served, body.model)) is not None:
        return bad
    llama = served.llama
    try:
        tools, constraint = _tools(body, llama)
        prompt = llama.encode_dialog([m.as_dict() for m in body.messages], tools=tools)
        max_tokens = body.max_completion_tokens or body.max_tokens
        budget = token_budget(len(prompt), max_tokens, llama.config.max_seq_len)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        extra = {"structured_outputs": constraint} if constraint is not None else {}
        params = body.choices(max_tokens=max_tokens, logprobs=body.logprobs, top_logprobs=top, **extra)
        requests = [llama.new_request(prompt, p, max_tokens=budget) for p in params]
        await _compile_constraints(served, requests)
        outputs = await served.loop.submit(requests)
    except (LaminaError, ValueError, ValidationError) as e:
        return _failure(e)
    trace, outputs = _logged(request, outputs, len(requests), len(prompt))
    rid, now = f"chatcmpl-{trace.id}", int(time.time())
    fmt = llama.formatter.tool_format if tools else None

    def logprobs(outs) -> dict | None:
        return r.chat_logprobs(outs, served.token_text) if body.logprobs else None

    if body.stream:

        async def events():
            for i in range(len(requests)):
                yield r.sse(r.chat_body(rid, now, served.name, [r.chat_delta(i, None, None)], None, chunk=True))
            completion, cached = 0, {}
            readers = {i: CallStream(fmt, tools) for i in range(len(requests))} if fmt else {}
            async for i, out in outputs:
                completion += out.token is not None
                cached.setdefault(i, out.cached_tokens)
                if fmt is None:
                    delta = r.chat_delta(i, out, logprobs([out]))
                else:
                    text, calls = readers[i].add(out.text), []
                    if out.finish_reason is not None:
                        rest, calls = readers[i].finish()
                        text += rest
                    if not text and out.finish_reason is None and not body.logprobs:
                        continue  # held back: it may be a call
                    delta = r.chat_delta(i, out, logprobs([out]), text=text, tool_calls=calls)
                yield r.sse(r.chat_body(rid, now, served.name, [delta], None, chunk=True))
            if body.include_usage:
                use = r.usage(len(prompt), completion, cached.get(0, 0))
                yield r.sse(r.chat_body(rid, now, served.name, [], use, chunk=True))
            yield r.sse("[DONE]")

        return StreamingResponse(_guarded(events()), media_type="text/event-stream")
    try:
        per_choice: dict[int, list] = {i: [] for i in range(len(requests))}
        async for i, out in _while_connected(request, outputs):
            per_choice[i].append(out)
    except Exception as e:  # noqa: BLE001
        return _failure(e)

    def answer() -> bytes:
        choices = []
        for i, outs in per_choice.items():
            content, calls = "".join(o.text for o in outs), []
            if fmt is not None:
                content, calls = fmt.parse(content, tools)
            unmet, finish = outs[-1].constraint_unmet, outs[-1].finish_reason
            choices.append(r.chat_choice(i, content, logprobs(outs), finish, tool_calls=calls, unmet=unmet))
        completion = sum(o.token is not None for outs in per_choice.values() for o in outs)
        cached = per_choice[0][0].cached_tokens if per_choice[0] else 0
        return r.encode(r.chat_body(rid, now, served.name, choices, r.usage(len(prompt), completion, cached)))

    return await _answer(answer, large=bool(body.logprobs))


def _tools(body: ChatCompletionRequest, llama: Llama) -> tuple[list[Tool], StructuredOutputs | None]:
    """The tools the model is told of (none with tool_choice "none"), and the constraint that tool_choice
    "required" or a named function puts on the reply: calls only, of the tools' parameter schemas."""
    if not body.tools or body.tool_choice == "none":
        return [], None
    if llama.formatter is None:
        raise RequestError("this model has no chat template, so it cannot be given tools")
    tools = check_tools(body.tools)
    choice = body.tool_choice or "auto"
    if choice == "auto":
        return tools, None
    if choice == "required":
        chosen, several = tools, body.parallel_tool_calls
    else:
        chosen = [t for t in tools if t.name == choice.function.name]
        if not chosen:
            raise RequestError(f"tool_choice names the function {choice.function.name!r}, which is not among the tools")
        several = False
    if body.constraint() is not None:
        raise RequestError("tool_choice 'required' or a named function cannot be combined with response_format")
    grammar = llama.formatter.tool_format.grammar(chosen, several=several)
    return tools, StructuredOutputs(grammar=grammar)


# ---------------------------------------------------------------------------------------------------------------------
# vLLM's tokenizer endpoints


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: HTTPRequest):
    served = _served(request)
    if (bad := _unknown_model(served, body.model)) is not None:
        return bad
    llama, tokenizer = served.llama, served.llama.tokenizer
    try:
        if body.messages is not None:
            tokens = llama.encode_dialog([m.as_dict() for m in body.messages])
        else:
            bos = body.add_special_tokens and tokenizer.add_bos
            tokens = tokenizer.encode(body.prompt, bos=bos, eos=False, allowed_special="all")
    except LaminaError as e:
        return _failure(e)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": llama.config.max_seq_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: HTTPRequest):
    served = _served(request)
    if (bad := _unknown_model(served, body.model)) is not None:
        return bad
    vocab = served.llama.model.config.vocab_size
    outside = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if outside is not None:
        return _error(400, f"token id {outside} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    return {"prompt": served.llama.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: HTTPRequest):
    served = _served(request)
    llama, tokenizer = served.llama, served.llama.tokenizer

    def text(token: int | None) -> str | None:
        return None if token is None else tokenizer.decode([token])

    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": text(tokenizer.bos_id),
        "eos_token": text(tokenizer.eos_id),
        "pad_token": text(tokenizer.special_tokens.get("pad_token")),
        "add_bos_token": tokenizer.add_bos,
        "chat_template": getattr(llama.formatter, "source", None),
        "model_max_length": llama.config.max_seq_len,
        "vocab_size": llama.model.config.vocab_size,
        "stop_token_ids": sorted(llama.stop_tokens),
    }
