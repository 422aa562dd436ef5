"""Incremental detokenization and stop sequences.

Text is decoded from a sliding window of tokens (TGI's prefix/read offsets): a token's
text is what decoding the window with it adds to decoding the window without it, and a
result ending in U+FFFD (half of a multi-byte character) is held back until the next
token completes it. Special tokens are left out of the text. Text that could still be
the start of a stop sequence is held back too, so a stop sequence split across tokens is
never streamed; when one completes, the text before it is released and generation ends.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text increments."""

    def __init__(self, tokenizer: Any, prompt_ids: Seq[int], stop: Seq[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.prefix_offset = max(0, len(self.ids) - 5)
        self.read_offset = len(self.ids)
        self.stop = [s for s in stop if s]
        self.text = ""  # every character decoded so far
        self.released = 0  # how much of ``text`` has been handed out
        self.stopped_by: str | None = None

    def _decode(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)  # type: ignore[no-any-return]

    def add(self, token_id: int) -> str:
        """Append ``token_id``; returns the text that can be released now (nothing once a
        stop sequence has matched)."""
        self.ids.append(token_id)
        if self.stopped_by is not None:
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        for stop in self.stop:
            found = self.text.find(stop, max(0, self.released - len(stop) + 1))
            if found != -1:
                self.stopped_by = stop
                self.text = self.text[:found]
                break
        end = len(self.text)
        if self.stopped_by is None:
            end -= self._held_back()
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that starts some stop sequence."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if stop.startswith(self.text[-size:]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """At the end of generation: release whatever was held back, for stop sequences or
        as an incomplete character (decoded as U+FFFD, as a full decode would)."""
        if self.stopped_by is None:
            before = self._decode(self.ids[self.prefix_offset : self.read_offset])
            after = self._decode(self.ids[self.prefix_offset :])
            if len(after) > len(before):
                self.text += after[len(before) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        piece = self.text[self.released :]
        self.released = len(self.text)
        return piece

    def token_text(self, token_id: int) -> str:
        """One token's own text (special tokens included), for token listings."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)  # type: ignore[no-any-return]
