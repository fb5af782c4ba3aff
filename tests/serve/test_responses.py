"""OpenAI's response bodies from RequestOutputs, without HTTP: legacy completion logprobs (with echoed prompt
positions), chat logprobs, stream deltas and usage, checked against the shapes OpenAI's client parses."""

import openai.types as ot
import openai.types.chat as oc
import pytest

from lamina.engine import RequestOutput
from lamina.serve import responses as r

TEXT = {1: "The", 2: " cat", 3: " sat", 4: " down"}


def token_text(t: int) -> str:
    return TEXT[t]


def out(token, text, lp=None, top=None, finish=None, prompt_lps=None):
    return RequestOutput("x", token, text, lp, top, finish, 2, 1, prompt_lps)


def test_completion_with_echo_and_logprobs():
    first = out(3, " sat", -0.5, ((3, -0.5), (4, -1.5)), prompt_lps=(None, (-2.0, ((2, -2.0), (4, -2.5)))))
    last = out(None, "", finish="stop")
    pieces = [
        r.completion_piece(first, echo=("The cat", [1, 2]), logprobs=True, token_text=token_text),
        r.completion_piece(last, echo=None, logprobs=True, token_text=token_text),
    ]
    text = "".join(t for t, _ in pieces)
    lp = r.merge_logprobs([p for _, p in pieces])
    assert text == "The cat sat"
    assert lp == {
        "tokens": ["The", " cat", " sat"],
        "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {" cat": -2.0, " down": -2.5}, {" sat": -0.5, " down": -1.5}],
        "text_offset": [0, 3, 7],
    }
    body = r.completion_body("cmpl-1", 0, "m", [r.completion_choice(0, text, lp, "stop")], r.usage(2, 1))
    # OpenAI's typed model has no None for the first prompt position (its client does not check); the rest fits it.
    plain = r.completion_body(
        "cmpl-1",
        0,
        "m",
        [
            r.completion_choice(
                0,
                " sat",
                pieces[0][1]
                | {"token_logprobs": [-0.5], "top_logprobs": [{" sat": -0.5}], "tokens": [" sat"], "text_offset": [0]},
                "stop",
            )
        ],
        r.usage(2, 1),
    )
    assert ot.Completion.model_validate(plain).usage.total_tokens == 3
    assert body["object"] == "text_completion" and body["choices"][0]["logprobs"]["top_logprobs"][0] is None
    chunk = r.completion_body("cmpl-1", 0, "m", [], r.usage(2, 1), chunk=True)
    assert ot.Completion.model_validate(chunk).usage.completion_tokens == 1
    assert "usage" not in r.completion_body("cmpl-1", 0, "m", [], None, chunk=True)


def test_completion_without_logprobs_or_echo():
    text, lp = r.completion_piece(out(3, " sat"), echo=None, logprobs=False, token_text=token_text)
    assert (text, lp) == (" sat", None) and r.merge_logprobs([None]) is None


def test_chat_logprobs_deltas_and_body():
    outs = [out(3, " sat", -0.5, ((3, -0.5),)), out(4, " down", -0.1, ((4, -0.1),), finish="length")]
    lp = r.chat_logprobs(outs, token_text)
    assert [e["token"] for e in lp["content"]] == [" sat", " down"]
    assert lp["content"][0]["bytes"] == list(b" sat") and lp["content"][0]["top_logprobs"][0]["logprob"] == -0.5
    body = r.chat_body("c-1", 0, "m", [r.chat_choice(0, " sat down", lp, "length")], r.usage(2, 2))
    parsed = oc.ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == " sat down" and parsed.choices[0].logprobs.content[1].logprob == -0.1
    role = r.chat_delta(0, None, None)
    assert role["delta"] == {"role": "assistant", "content": ""}
    end = r.chat_delta(0, out(None, "", finish="stop"), None)
    assert end["delta"] == {} and end["finish_reason"] == "stop"
    chunk = oc.ChatCompletionChunk.model_validate(r.chat_body("c-1", 0, "m", [end], None, chunk=True))
    assert chunk.choices[0].finish_reason == "stop" and chunk.usage is None


def test_errors_and_events():
    assert r.error_body("bad", param="x") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}
    }
    assert r.sse("[DONE]") == "data: [DONE]\n\n" and r.sse({"a": 1}) == 'data: {"a": 1}\n\n'


def test_token_budget_names_both_numbers():
    import pytest

    from lamina.errors import RequestError
    from lamina.serve.protocol import token_budget

    assert token_budget(10, None, 64) == 54 and token_budget(10, 54, 64) == 54 and token_budget(10, 0, 64) == 0
    with pytest.raises(RequestError, match=r"context length is 64 tokens.*65 tokens \(10 in the prompt, 55 in"):
        token_budget(10, 55, 64)
    with pytest.raises(RequestError, match="your prompt has 64 tokens"):
        token_budget(64, None, 64)


def test_encode_writes_what_json_dumps_writes_in_pieces(monkeypatch):
    import json

    n = 3 * r.PIECE + 5
    logprobs = {
        "tokens": [f'tok{i} é"\n' for i in range(n)],
        "token_logprobs": [None, *(-0.5 * i for i in range(1, n))],
        "top_logprobs": [None, *({f"a{i}": -1.0, "b": -2.5} for i in range(1, n))],
        "text_offset": list(range(n)),
    }
    body = {"id": "x", "choices": [{"index": 0, "text": "日本", "logprobs": logprobs, "e": [], "f": {}}], "usage": None}
    calls = []
    dumps = r._dumps
    monkeypatch.setattr(r, "_dumps", lambda v: calls.append(len(v) if isinstance(v, list) else 0) or dumps(v))
    assert r.encode(body) == json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    assert max(calls) == r.PIECE  # no call encodes more than a piece of a long list
    with pytest.raises(ValueError):  # as FastAPI's JSONResponse: no NaN or infinity in JSON
        r.encode({"logprob": float("-inf")})
