"""Incremental detokenization of one sequence: text comes out as tokens arrive, never a character split in two."""

from __future__ import annotations

from lamina.tokenizer.base import Tokenizer

_REPLACEMENT = "\ufffd"
# A UTF-8 character spans at most 4 bytes, so at most 4 tokens. Held text that still ends in U+FFFD after this many
# tokens is invalid bytes rather than an unfinished character: let it out, so the window (and the cost) stays bounded.
_MAX_HELD = 16


class StreamDecoder:
    """Turns the token ids of one sequence, fed one at a time, into text pieces.

    `add(id)` returns the text that the new token makes final, possibly "": while the decoded tail ends in U+FFFD (a
    character whose bytes are split across tokens) it holds that text back. `flush()` returns what is still held at
    the end. The pieces concatenate to `tokenizer.decode(all ids)`.

    Only `tokenizer.decode` is used, on a window of recent ids (the prefix/read offsets of vLLM and mlx-lm): the text
    of ids[prefix:read] was emitted already and gives the decoder its context (a leading space, a byte-fallback
    run); the text beyond it is new. The cost of a step does not grow with the length of the sequence.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # ids from the window start on; earlier ones are dropped
        self._read = 0  # ids[:read] have been emitted, as far as ids[:read] reach
        self._prefix_text = ""  # decode(ids[:read])

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        if text.endswith(_REPLACEMENT) and len(self._ids) - self._read < _MAX_HELD:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return whatever is still held (an unfinished character comes out as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self.tokenizer.decode(self._ids))

    def _emit(self, text: str) -> str:
        # The window starts where an earlier emission ended, at a character boundary, so the text of the emitted ids
        # is a prefix of `text`; what follows it is new. Then the ids just emitted become the next window.
        new = text[len(self._prefix_text) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self.tokenizer.decode(self._ids)
        return new
