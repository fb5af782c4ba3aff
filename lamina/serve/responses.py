"""OpenAI's response bodies built from the engine's RequestOutputs: pure functions of their inputs (no HTTP, no
engine), so tests call them directly. Token texts come from a `token_text(id) -> str` the caller gives."""

from __future__ import annotations

import json
from typing import Callable, Sequence

from lamina.engine.request import RequestOutput, TopLogprobs
from lamina.tokenizer.tools import ToolCall

TokenText = Callable[[int], str]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict | str) -> str:
    """One server-sent event: a JSON payload, or the closing "[DONE]"."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def sse_large(payload: dict) -> str:
    """sse() for a payload with long lists (a scored prompt's logprobs), encoded in pieces as encode() does."""
    return f"data: {encode(payload).decode()}\n\n"


PIECE = 256  # list items encoded by one json.dumps call


def encode(body) -> bytes:
    """A response body's JSON (as FastAPI's JSONResponse writes it), encoded in pieces: a long list (a prompt's
    logprobs, thousands of entries) PIECE items at a time. One json.dumps call holds the interpreter until it returns,
    so a thread encoding a large body in one call would stop the event loop and the engine thread for its whole
    length; between pieces they run."""
    out: list[str] = []
    _encode(body, out)
    return "".join(out).encode()


def _encode(value, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for n, (key, item) in enumerate(value.items()):
            out.append(("," if n else "") + _dumps(str(key)) + ":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)) and len(value) > PIECE:
        out.append("[")
        for at in range(0, len(value), PIECE):
            out.append(("," if at else "") + _dumps(value[at : at + PIECE])[1:-1])
        out.append("]")
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        out.append("[")
        for n, item in enumerate(value):
            out.append("," if n else "")
            _encode(item, out)
        out.append("]")
    else:
        out.append(_dumps(value))


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _alternatives(top: TopLogprobs | None, token_text: TokenText) -> dict[str, float]:
    return {token_text(t): lp for t, lp in (top or ())}


# ---------------------------------------------------------------------------------------------------------------------
# /v1/completions (OpenAI's legacy logprobs: parallel lists of tokens, their logprobs and dicts of alternatives)


def completion_piece(
    out: RequestOutput,
    *,
    echo: tuple[str, Sequence[int]] | None,
    logprobs: bool,
    token_text: TokenText,
) -> tuple[str, dict | None]:
    """The text and logprobs one output adds to its choice. `echo`: (prompt text, prompt ids), on the choice's first
    output when echo is on: the prompt's text comes first, and with logprobs its tokens, each with its
    log-probability and alternatives from `out.prompt_logprobs` (null for the first token)."""
    text, lp = out.text, None
    if logprobs:
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    if echo is not None:
        prompt_text, prompt = echo
        text = prompt_text + text
        if lp is not None:
            scored = out.prompt_logprobs or (None,) * len(prompt)
            lp["tokens"] += [token_text(t) for t in prompt]
            lp["token_logprobs"] += [None if e is None else e[0] for e in scored]
            lp["top_logprobs"] += [None if e is None else _alternatives(e[1], token_text) for e in scored]
    for token, logprob, top in _generated(out) if lp is not None else ():
        lp["tokens"].append(token_text(token))
        lp["token_logprobs"].append(logprob)
        lp["top_logprobs"].append(_alternatives(top, token_text))
    if lp is not None:
        lp["text_offset"] = _offsets(lp["tokens"])
    return text, lp


def _generated(out: RequestOutput) -> list[tuple[int, float | None, TopLogprobs | None]]:
    """The tokens an output gives logprobs entries for: its token, or the stop token that finished the request
    (OpenAI's rule, and vLLM's: the stop token has an entry, its text not in the choice's; lm-eval's loglikelihood
    drops a reply's last entry as the generated token, so without it a continuation's own last token is dropped)."""
    if out.token is not None:
        return [(out.token, out.logprob, out.top_logprobs)]
    if out.stop_token is not None:
        return [(out.stop_token, out.stop_logprob, out.stop_top_logprobs)]
    return []


def _offsets(tokens: list[str]) -> list[int]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return offsets


def merge_logprobs(pieces: Sequence[dict | None]) -> dict | None:
    """One choice's logprobs from its pieces, in order."""
    pieces = [p for p in pieces if p is not None]
    if not pieces:
        return None
    merged = {key: [v for p in pieces for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs")}
    merged["text_offset"] = _offsets(merged["tokens"])
    return merged


# vLLM's `stop_reason` field of a choice, when a structured output ended before its constraint was complete
UNMET = "the output ended before its structured-output constraint was complete: it is not valid"


def completion_choice(
    index: int, text: str, logprobs: dict | None, finish_reason: str | None, *, unmet: bool = False
) -> dict:
    return _said_unmet({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}, unmet)


def _said_unmet(choice: dict, unmet: bool) -> dict:
    """The choice, with vLLM's `stop_reason` saying so when its structured output was cut short."""
    if unmet:
        choice["stop_reason"] = UNMET
    return choice


def completion_body(rid: str, created: int, model: str, choices: list[dict], use: dict | None, *, chunk=False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


# ---------------------------------------------------------------------------------------------------------------------
# /v1/chat/completions


def chat_logprobs(outs: Sequence[RequestOutput], token_text: TokenText) -> dict:
    """OpenAI's chat logprobs: an entry per generated token (the stop token that ended the reply included), with its
    bytes and alternatives."""
    entries = []
    for token, logprob, top in (g for o in outs for g in _generated(o)):
        text = token_text(token)
        alternatives = [
            {"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())} for t, lp in (top or ())
        ]
        entries.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": alternatives})
    return {"content": entries}


def chat_choice(
    index: int,
    content: str | None,
    logprobs: dict | None,
    finish_reason: str | None,
    *,
    tool_calls: Sequence[ToolCall] = (),
    unmet: bool = False,
) -> dict:
    """A chat choice; with tool calls, OpenAI's `tool_calls` and finish reason "tool_calls"."""
    message: dict = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [c.as_openai() for c in tool_calls]
        finish_reason = "tool_calls"
    return _said_unmet(
        {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}, unmet
    )


def chat_delta(
    index: int,
    out: RequestOutput | None,
    logprobs: dict | None,
    *,
    text: str | None = None,
    tool_calls: Sequence[ToolCall] = (),
) -> dict:
    """A streamed chat choice: the role first (`out` None), then each output's text (or `text`, when tool calls
    are being read out of it), the calls themselves with the last (OpenAI's deltas: index, id, type, name and the
    whole arguments) and finish reason "tool_calls"."""
    if out is None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    text = out.text if text is None else text
    delta: dict = {"content": text} if text or (out.finish_reason is None and not tool_calls) else {}
    finish = out.finish_reason
    if tool_calls:
        delta["tool_calls"] = [{"index": j, **c.as_openai()} for j, c in enumerate(tool_calls)]
        finish = "tool_calls"
    return _said_unmet(
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}, out.constraint_unmet
    )


def chat_body(rid: str, created: int, model: str, choices: list[dict], use: dict | None, *, chunk=False) -> dict:
    kind = "chat.completion.chunk" if chunk else "chat.completion"
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body
