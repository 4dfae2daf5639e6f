"""A request's output text: incremental detokenization and stop strings.

Stop strings are matched on text, which arrives in pieces, so a stop string can span several
tokens. ``StopStringMatcher`` never emits text that could be the start of a stop string: it
holds back the longest tail of the text that is a prefix of some stop string until the next
piece decides it. Hence a stop string always lies inside (held text + new text), and the text
the client sees ends right before the first stop string.
"""
from __future__ import annotations

from typing import Sequence

from models.tokenizer import IncrementalDetokenizer, Tokenizer


class StopStringMatcher:
    """Cuts streamed text before the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]):
        if not stops or any(not s for s in stops):
            raise ValueError("stop strings must be non-empty, and at least one is needed")
        self.stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text. Returns (text safe to emit now, whether a stop string matched).

        After a match the returned text ends right before the stop string; nothing after it
        is ever emitted.
        """
        buf = self._held + text
        first = -1
        for stop in self.stops:
            i = buf.find(stop)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._held = ""
            return buf[:first], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, once no more text will come (it did not become a stop string)."""
        held, self._held = self._held, ""
        return held


class OutputProcessor:
    """Turns output token ids into the text to stream. Without a tokenizer all text is empty."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: Sequence[int], stops: Sequence[str]):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self._matcher = StopStringMatcher(stops) if stops else None

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text completed by one more token, and whether a stop string ended the output."""
        if self._detok is None:
            return "", False
        text = self._detok.push((token_id,))
        if self._matcher is None or not text:
            return text, False
        return self._matcher.push(text)

    def finish(self) -> tuple[str, bool]:
        """The remaining text when the output ends for another reason than a stop string
        (the last piece may still complete a stop string: then the bool is True)."""
        if self._detok is None:
            return "", False
        text = self._detok.flush()
        if self._matcher is None:
            return text, False
        emitted, matched = self._matcher.push(text)
        return (emitted, True) if matched else (emitted + self._matcher.flush(), False)
