"""Tokenizers and chat formats. Nothing here imports torch."""

from lamina.tokenizer.chat import ChatFormat, Dialog, Message
from lamina.tokenizer.llama3 import Llama3Tokenizer

__all__ = ["ChatFormat", "Dialog", "Message", "Llama3Tokenizer"]
