"""Structured output and tool calling through the real server, spoken to with the official `openai` client: every
JSON Schema response validates (greedy and sampled, streaming and not), regex / choice / grammar constraints through
vLLM's `structured_outputs`, grammars that do not compile get a 400; tool calls come back as OpenAI `tool_calls`
(required, named, auto, none), stream as deltas that reassemble to the non-streamed reply, survive a round trip
with a `tool` message, and parse whatever the weights on a random Meta checkpoint in Llama 3's own format."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import lark
import openai
import pytest

import lamina
from lamina.serve.app import create_app

from ..engine.test_structured import SCHEMAS
from .test_server import _serve

MODEL = "smollm2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "strict": True,  # OpenAI's: the call's arguments hold only the keys the schema names
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server():
    llama = lamina.load(max_batch_size=8, max_seq_len=1024)
    server, thread, url = _serve(create_app(llama, model_name=MODEL))
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _schema_reply(client, name: str, temperature: float, stream: bool) -> tuple[str, str]:
    body = dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"Give an example of {name} as JSON."}],
        max_tokens=200,
        temperature=temperature,
        seed=11,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[name], "strict": True}},
    )
    if not stream:
        out = client.chat.completions.create(**body)
        return out.choices[0].message.content, out.choices[0].finish_reason
    chunks = list(client.chat.completions.create(stream=True, **body))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("temperature, stream", [(0.0, False), (0.0, True), (0.8, False), (0.8, True)])
def test_every_json_schema_response_validates(client, temperature, stream):
    with ThreadPoolExecutor(8) as pool:
        replies = dict(zip(SCHEMAS, pool.map(lambda n: _schema_reply(client, n, temperature, stream), SCHEMAS)))
    for name, (text, finish) in replies.items():
        assert finish == "stop", f"{name}: {finish} {text!r}"
        jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=jsonschema.FormatChecker())


def test_json_object_regex_choice_and_grammar(client):
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    regex = r"[0-9]{1,2}:[0-9]{2} (am|pm)"
    out = client.completions.create(
        model=MODEL,
        prompt="The time is",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": regex}},
    )
    assert re.fullmatch(regex, out.choices[0].text)
    choices = ["sunny", "rainy", "cloudy"]
    out = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=10,
        temperature=0.7,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert out.choices[0].message.content in choices and out.choices[0].finish_reason == "stop"
    grammar = 'start: "The weather is " WORD "."\nWORD: /[a-z]{2,12}/'
    out = client.completions.create(
        model=MODEL, prompt="Q: weather?\nA:", max_tokens=20, temperature=0, extra_body={"guided_grammar": grammar}
    )
    lark.Lark(grammar).parse(out.choices[0].text)


def test_cut_short_says_so(client):
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMAS["flat object"]}}
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0, response_format=schema)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and "not valid" in choice.model_extra["stop_reason"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"structured_outputs": {"regex": "(unclosed"}}, "regex constraint does not compile"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "grammar constraint does not compile"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
        ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "one structured-output constraint"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "needs a name"),
    ],
)
def test_bad_constraints_and_tools_are_400s(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra)


def _call_args(call, tools=(WEATHER, TIME)) -> dict:
    tool = next(t for t in tools if t["function"]["name"] == call.function.name)
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    if tool["function"].get("strict"):
        assert set(arguments) <= set(tool["function"]["parameters"]["properties"])
    return arguments


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_tool_calls_always_parse(client, temperature):
    out = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=temperature,
        seed=5,
        max_tokens=200,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        _call_args(call)


def test_a_named_tool_and_streamed_deltas_reassemble(client):
    body = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        temperature=0,
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    out = client.chat.completions.create(**body)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and _call_args(call)["unit"] in ("celsius", "fahrenheit")
    chunks = list(client.chat.completions.create(stream=True, **body))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    calls: dict[int, dict] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
        entry["name"] += (d.function.name or "") if d.function else ""
        entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert list(calls.values()) == [{"name": call.function.name, "arguments": call.function.arguments}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_none_and_auto_never_fail_and_a_round_trip(client):
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30
    )
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=temperature, seed=1, max_tokens=80
        )
        choice = out.choices[0]
        assert choice.message.tool_calls or choice.message.content is not None
        for call in choice.message.tool_calls or []:
            _call_args(call)
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=100
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=40)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens


def test_required_calls_parse_on_a_random_meta_checkpoint(tiny_ckpt, tokenizer_path):
    """Llama 3's own format (Meta's ChatFormat, tiktoken vocabulary): with tool_choice required the reply is a call
    whatever the weights, and it comes back as tool_calls."""
    llama = lamina.Llama.build(tiny_ckpt, tokenizer_path, 1024, 2, device="cpu", dtype="float32")
    server, thread, url = _serve(create_app(llama, model_name="meta"))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for temperature in (0.0, 1.0):
            out = client.chat.completions.create(
                model="meta",
                messages=ASK,
                tools=[WEATHER, TIME],
                tool_choice="required",
                temperature=temperature,
                seed=2,
                max_tokens=120,
            )
            choice = out.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            for call in choice.message.tool_calls:
                _call_args(call)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
