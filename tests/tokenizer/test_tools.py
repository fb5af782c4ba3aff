"""Tool calling in chat formats: the parsers on model outputs of each family (calls, several calls, no call,
JSON-looking prose, broken JSON), streaming that reassembles to the same result at every split, tools rendered as
each family expects (Meta's ChatFormat against llama-models' own encoder), and tool definitions checked."""

import json
from pathlib import Path

import pytest

from lamina import RequestError
from lamina.tokenizer import ChatFormat, ChatTemplate, Llama3Tokenizer
from lamina.tokenizer.tools import CallStream, HermesTools, Llama3JsonTools, check_tools

TOOLS = check_tools(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]
)

# Outputs in the shapes the models write them (Qwen 2.5 / Hermes 2 Pro / SmolLM2; Llama 3.1-3.3), and what each is.
HERMES = [
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})],
    ),
    (
        'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
        [("get_time", {})],
    ),
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ('Here is JSON: {"name": "get_time", "arguments": {}}', 'Here is JSON: {"name": "get_time", "arguments": {}}', []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None, None),  # cut short: content
    ('<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>', None, None),  # not a defined tool
    ("<tool_call>\nnot json at all\n</tool_call>", None, None),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),  # stopped before the close
]
# SmolLM2-135M-Instruct's own greedy replies (the default GGUF, lamina's Hermes-style tool prompt, TOOLS' two
# functions), recorded with tool_choice "required" (constrained) and "auto".
HERMES += [
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "New York"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"type": "object", "properties": {"celsius": 3.5}}}\n</tool_call>',
        None,
        [("get_weather", {"city": "New York"}), ("get_time", {"type": "object", "properties": {"celsius": 3.5}})],
    ),
    (  # cut short by max_tokens as a second call opened: not presented as calls
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "type": "object", '
        '"properties": {"temperature": {"type": "string"}, "temperature": {"type": "number", "value": 25.5}}}}\n'
        "</tool_call>\n<tool_call>",
        None,
        None,
    ),
    ("The time is 12:30 AM in the current timezone.", "The time is 12:30 AM in the current timezone.", []),
    (
        "Here's a function that can be used to get the weather in Berlin:\n```python\ndef get_weather_berlin(city):\n"
        '    return {\n        "type": "function",\n        "function": lambda: {\n            "name": "Berlin",',
        "Here's a function that can be used to get the weather in Berlin:\n```python\ndef get_weather_berlin(city):\n"
        '    return {\n        "type": "function",\n        "function": lambda: {\n            "name": "Berlin",',
        [],
    ),
]
LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    (
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}',
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", {"city": "Rome"}), ("get_time", {})],
    ),
    ("It is sunny in Paris today.", "It is sunny in Paris today.", []),
    ('{"answer": 42, "unit": "none"}', '{"answer": 42, "unit": "none"}', []),  # JSON, but no call
    ('{"name": "Alice", "parameters": {"age": 3}}', '{"name": "Alice", "parameters": {"age": 3}}', []),  # not a tool
    ('{"name": "get_weather", "parameters": {"city": "Par', '{"name": "get_weather", "parameters": {"city": "Par', []),
    ('The call is {"name": "get_time", "parameters": {}}', 'The call is {"name": "get_time", "parameters": {}}', []),
]


def _check(fmt, text, content, calls):
    got_content, got_calls = fmt.parse(text, TOOLS)
    if calls is None:  # malformed: the whole text is content, nothing is a call
        assert got_calls == [] and got_content == text
        return
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert got_content == content
    assert all(c.id.startswith("call_") for c in got_calls) and len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text, content, calls", HERMES)
def test_hermes_parser(text, content, calls):
    _check(HermesTools(), text, content, calls)


@pytest.mark.parametrize("text, content, calls", LLAMA3)
def test_llama3_json_parser(text, content, calls):
    _check(Llama3JsonTools(), text, content, calls)


@pytest.mark.parametrize(
    "fmt, text", [(HermesTools(), t) for t, _, _ in HERMES] + [(Llama3JsonTools(), t) for t, _, _ in LLAMA3]
)
def test_streaming_reassembles_to_the_parse_at_every_split(fmt, text):
    whole_content, whole_calls = fmt.parse(text, TOOLS)
    for pieces in ([text], list(text), [text[:7], text[7:19], text[19:]]):
        stream = CallStream(fmt, TOOLS)
        streamed = "".join(stream.add(p) for p in pieces)
        rest, calls = stream.finish()
        assert streamed + rest == (whole_content or "")
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


def test_a_recorded_llama_3_1_call_from_metas_prompt_format_guide():
    """The model response that llama-models' own guide records for JSON tool calling (Llama 3.1), read from the
    installed package, parses into the call it makes."""
    import llama_models

    guide = (Path(llama_models.__file__).parent / "llama3_1" / "prompt_format.md").read_text()
    start = guide.index("<|python_tag|>{")
    reply = guide[start : guide.index("<|eom_id|>", start)]  # the text before the stop token, as lamina sees it
    songs = check_tools(
        [{"type": "function", "function": {"name": "trending_songs", "parameters": {"type": "object"}}}]
    )
    content, calls = Llama3JsonTools().parse(reply, songs)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("trending_songs", {"n": "10", "genre": "all"})
    ]


def test_meta_format_renders_tools_and_calls_as_llama_models_does(tokenizer_path, ref_tokenizer):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat as RefChatFormat

    ours = ChatFormat(Llama3Tokenizer(tokenizer_path))
    ref = RefChatFormat(ref_tokenizer)
    arguments = {"city": "Paris", "unit": "celsius"}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    expected, _ = ref.encode_message(
        RawMessage(
            role="assistant",
            content="",
            stop_reason=StopReason.end_of_message,
            tool_calls=[ToolCall(call_id="call_1", tool_name="get_weather", arguments=arguments)],
        ),
        tool_prompt_format=ToolPromptFormat.json,
    )
    assert ours.encode_message(message) == expected
    result, _ = ref.encode_message(RawMessage(role="tool", content="22 degrees"), ToolPromptFormat.json)
    assert ours.encode_message({"role": "tool", "content": "22 degrees", "tool_call_id": "call_1"}) == result
    # The tool prompt: "Environment: ipython" in the system message, the tools in a user message before the question.
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    text = ours.tokenizer.decode(ours.encode_dialog_prompt(dialog, TOOLS))
    assert (
        text.index("Environment: ipython\n\nBe brief.")
        < text.index('"name": "get_weather"')
        < text.index("Weather in Paris?")
    )


SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
# A template that reads tools itself (the shape of Qwen 2.5's).
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function.name }}{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endif %}"
    "{% endfor %}"
)


class _Tokenizer:  # what ChatTemplate needs of a tokenizer for render()
    special_tokens = {"<|im_end|>": 2}


def test_a_template_without_tools_gets_them_hermes_style():
    template = ChatTemplate(SMOL_TEMPLATE, _Tokenizer())
    assert not template.reads_tools and isinstance(template.tool_format, HermesTools)
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    dialog = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
    ]
    text = template.render(dialog, tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>" in text


def test_a_template_that_reads_tools_gets_them_with_argument_objects():
    template = ChatTemplate(TOOL_TEMPLATE, _Tokenizer())
    assert template.reads_tools and isinstance(template.tool_format, HermesTools)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    text = template.render([{"role": "assistant", "content": "", "tool_calls": [call]}], tools=TOOLS)
    assert text == '<tools>get_weather;get_time;</tools>[assistant]<tool_call>get_weather{"city": "Oslo"}</tool_call>'


def test_strict_tools_close_their_argument_objects():
    """OpenAI's function.strict: the constrained call's schema closes every object of the parameters."""
    params = {
        "type": "object",
        "properties": {
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
            "properties": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
        },
        "$defs": {"x": {"type": "object"}},
    }
    (loose,) = check_tools([{"function": {"name": "f", "parameters": params}}])
    (strict,) = check_tools([{"function": {"name": "f", "parameters": params, "strict": True}}])
    open_rule, closed_rule = (
        json.loads(HermesTools().grammar([t], several=False).split("%json ", 1)[1]) for t in (loose, strict)
    )
    assert open_rule["properties"]["arguments"] == params
    closed = closed_rule["properties"]["arguments"]
    assert closed["additionalProperties"] is False and closed["$defs"]["x"]["additionalProperties"] is False
    assert closed["properties"]["where"]["additionalProperties"] is False
    assert closed["properties"]["properties"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]  # an array, named "properties"
    assert params["properties"]["where"] == {"type": "object", "properties": {"city": {"type": "string"}}}  # untouched


@pytest.mark.parametrize(
    "tools, message",
    [
        ("get_time", "tools must be a list"),
        ([{"type": "function"}], "needs a name"),
        ([{"type": "retrieval", "function": {"name": "x"}}], "must be {'type': 'function'"),
        ([{"function": {"name": "bad name!"}}], "letters, digits"),
        ([{"function": {"name": "a", "parameters": [1]}}], "JSON Schema object"),
        ([{"function": {"name": "a"}}, {"function": {"name": "a"}}], "unique"),
        ([{"function": {"name": "a", "strict": "yes"}}], "strict must be true or false"),
    ],
)
def test_tool_definitions_are_checked(tools, message):
    with pytest.raises(RequestError, match=message):
        check_tools(tools)
