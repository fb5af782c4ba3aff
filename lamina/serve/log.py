"""Request ids and the server's log: one line per request, written when its response has been sent in full.

A request's id is the client's `X-Request-Id` header where it sends one (echoed back, and used in the response's
own id: `chatcmpl-<id>`, as vLLM does), or a new one; every response carries it back in `X-Request-Id`. The routes
fill the request's `Trace` (prompt tokens; the outputs as they come); the line is written once the last byte is out,
so a stream is logged at its end, with what it produced; a choice that did not finish (its client went away, and the
request was aborted) is logged as `cancelled`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

from lamina.engine import RequestOutput
from lamina.serve.responses import error_body

logger = logging.getLogger("lamina.serve")

# Visible ASCII only: the id goes into a log line and a header; it may not forge either.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_QUIET = {"/health", "/metrics"}  # polled by probes and Prometheus: logged at DEBUG, not INFO


@dataclass
class Trace:
    """What the log line says of one request. `finish` has each choice's finish reason, in choice order."""

    id: str
    method: str
    path: str
    start: float = field(default_factory=time.perf_counter)
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    first_token: float | None = None
    finish: dict[int, str] = field(default_factory=dict)
    choices: int = 0
    failed: bool = False  # a step failed while the route read its outputs

    def output(self, index: int, out: RequestOutput) -> None:
        """Count one output of choice `index` (called on the event loop, as the route reads it)."""
        if out.token is not None:
            self.completion_tokens += 1
            if self.first_token is None:
                self.first_token = time.perf_counter()
        if out.finish_reason is not None:
            self.finish[index] = out.finish_reason

    def line(self, status: int) -> str:
        """The log line: id, method, path (percent-encoded: a decoded path could forge a line), status, then for a
        request that reached the engine its tokens, time to first token and each choice's finish reason, and the
        total time."""
        total = time.perf_counter() - self.start
        parts = [f"{self.id} {self.method} {quote(self.path, safe='/')} {status}"]
        if self.prompt_tokens is not None:
            missing = "error" if self.failed else "cancelled"
            finish = [self.finish.get(i, missing) for i in range(self.choices)]
            ttft = f"{self.first_token - self.start:.3f}s" if self.first_token is not None else "-"
            parts += [
                f"prompt_tokens={self.prompt_tokens}",
                f"completion_tokens={self.completion_tokens}",
                f"ttft={ttft}",
                f"finish={','.join(finish) or '-'}",
            ]
        parts.append(f"total={total:.3f}s")
        return " ".join(parts)


class RequestLog:
    """ASGI middleware: gives each HTTP request its id and Trace (`request.state.trace`), sets `X-Request-Id` on the
    response, and logs the request's line when the response has ended (sent, or its client gone)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1").strip()
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        trace = Trace(rid, scope["method"], scope["path"])
        scope.setdefault("state", {})["trace"] = trace
        status, started = [500], [False]  # what the log says where the app fails before it answers

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # a bug: logged with its traceback, answered as a 500 that carries the id
            logger.exception("%s %s %s failed", rid, scope["method"], quote(scope["path"], safe="/"))
            if started[0]:
                raise
            body = json.dumps(error_body(f"internal error: {type(e).__name__}: {e}", "server_error")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_with_id({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            level = logging.DEBUG if scope["path"] in _QUIET else logging.INFO
            if logger.isEnabledFor(level):
                logger.log(level, trace.line(status[0]))
