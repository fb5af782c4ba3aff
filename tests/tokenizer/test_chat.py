"""The Llama 3 chat format against Meta's ChatFormat (llama-models)."""

import pytest

from lamina import ChatFormat, Llama3Tokenizer, RequestError

DIALOGS = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "What is 2**10?"},
        {"role": "assistant", "content": "print(2**10)"},
        {"role": "ipython", "content": "1024"},
        {"role": "assistant", "content": "It is 1024."},
        {"role": "user", "content": "Merci! 🦙 <|eot_id|> is just text here"},
    ],
]


@pytest.fixture(scope="module")
def formats(tokenizer_path, ref_tokenizer):
    from llama_models.llama3.chat_format import ChatFormat as RefChatFormat

    return ChatFormat(Llama3Tokenizer(tokenizer_path)), RefChatFormat(ref_tokenizer)


def _ref_messages(dialog):
    from llama_models.datatypes import RawMessage

    # llama-models names the ipython role "tool" and does not strip content.
    return [
        RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m["content"].strip()) for m in dialog
    ]


@pytest.mark.parametrize("dialog", DIALOGS)
def test_dialog_prompt_equals_reference(formats, dialog):
    ours, ref = formats
    assert ours.encode_dialog_prompt(dialog) == ref.encode_dialog_prompt(_ref_messages(dialog)).tokens


def test_content_is_stripped(formats):
    ours, _ = formats
    padded = [{"role": "user", "content": "  hello \n"}]
    assert ours.encode_dialog_prompt(padded) == ours.encode_dialog_prompt([{"role": "user", "content": "hello"}])


def test_tool_is_ipython(formats):
    ours, _ = formats
    as_tool = ours.encode_dialog_prompt([{"role": "tool", "content": "42"}])
    assert as_tool == ours.encode_dialog_prompt([{"role": "ipython", "content": "42"}])


@pytest.mark.parametrize(
    "dialog, message",
    [
        ([{"role": "wizard", "content": "hi"}], "unknown message role 'wizard'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": 3}], "content must be a str"),
        ("hello", "a dialog is a list of messages"),
    ],
)
def test_bad_messages(formats, dialog, message):
    with pytest.raises(RequestError, match=message):
        formats[0].encode_dialog_prompt(dialog)
