"""The text of a growing reply, released piece by piece, never a character that must be taken back.

Two things keep text back for a while. A token can end inside a multi-byte character (byte-level BPE
splits UTF-8 sequences), which decodes to U+FFFD until the next token completes it: text is decoded over
a small window of recent tokens and released only once it no longer ends in U+FFFD (the way TGI and vLLM
detokenize incrementally, so each step costs O(1), not O(reply)). And the end of the text may be the
beginning of a stop string: that part waits until the next tokens confirm or rule it out. A stop string
ends the reply, cut before it. At the end the rest is released as it is.

The pieces joined equal the reply's text as `Generator.generate` returns it for the same tokens: the
decoded ids without the EOS, cut before the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from forge_lm.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest_stop = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        """Decoded so far (complete characters only)."""
        self.released = 0
        """Characters of `text` handed out."""
        self.stopped = False
        self._prefix = 0  # the window [_prefix, _read) decodes to text already in self.text
        self._read = 0

    def push(self, token: int) -> str:
        """Add one token; return the text that can be released now ("" if none). After a stop string
        (`stopped` becomes True) nothing more is released."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            searched_from = max(0, len(self.text) - self._longest_stop + 1)
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            cut = self._first_stop(searched_from)
            if cut is not None:
                self.stopped = True
                return self._release(cut)
        return self._release(len(self.text) - self._partial_stop())

    def finish(self) -> str:
        """The reply ended (EOS or length): release everything left, incomplete characters included."""
        if self.stopped:
            return ""
        rest = self.tokenizer.decode(self.ids[self._prefix :])
        done = self.tokenizer.decode(self.ids[self._prefix : self._read])
        if len(rest) > len(done):
            searched_from = max(0, len(self.text) - self._longest_stop + 1)
            self.text += rest[len(done) :]
            cut = self._first_stop(searched_from)
            if cut is not None:
                self.stopped = True
                return self._release(cut)
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.released : end] if end > self.released else ""
        self.released = max(self.released, end)
        return piece

    def _first_stop(self, start: int) -> int | None:
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self) -> int:
        """Length of the longest end of `text` that begins some stop string (it may still complete)."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
