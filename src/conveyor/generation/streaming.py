"""Turning a growing list of token ids into text pieces to print as they arrive.

Byte-level BPE tokens are bytes, not characters: one character may span several
tokens, and decoding a token alone can give a replacement character. So the whole
sequence is decoded each time and only the new suffix is emitted; while the text
ends in an incomplete character (decoded as U+FFFD) the suffix is held back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextStream"]

_INCOMPLETE = "\ufffd"


class TextStream:
    """Incremental decoder: ``push`` a token id, get the text it completes (maybe "")."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids)
        self._shown = len(decode(self._ids))  # the prompt is shown as the user typed it

    def push(self, token: int) -> str:
        """Add one token; return the newly completed text."""
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith(_INCOMPLETE):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        return self._take(self._decode(self._ids))

    def _take(self, text: str) -> str:
        piece = text[self._shown :]
        self._shown = max(self._shown, len(text))
        return piece
