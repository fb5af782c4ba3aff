"""Tokenizers and chat formats. Nothing here imports torch."""

from lamina.tokenizer.base import Tokenizer, tokenizer_difference
from lamina.tokenizer.chat import ChatFormat, Dialog, Message
from lamina.tokenizer.gguf import tokenizer_from_gguf
from lamina.tokenizer.hf import HFTokenizer
from lamina.tokenizer.llama3 import Llama3Tokenizer
from lamina.tokenizer.stream import StreamDecoder
from lamina.tokenizer.template import ChatTemplate

__all__ = [
    "ChatFormat",
    "ChatTemplate",
    "Dialog",
    "HFTokenizer",
    "Llama3Tokenizer",
    "Message",
    "StreamDecoder",
    "Tokenizer",
    "tokenizer_difference",
    "tokenizer_from_gguf",
]
