"""Incremental detokenization with stop strings (no torch).

Decodes a short window of recent tokens each step (not the whole output), holds back incomplete
UTF-8 and any tail that could still become a stop string, and truncates the text at a stop string.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context so leading spaces come out right


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        # a fast tokenizer's Rust decode gives the same text for a third of the cost per call (0.9 vs 3.1 µs for a
        # 6-token window, ad hoc timeit; twice per token), unless the wrapper post-processes it
        rust = getattr(tokenizer, "_tokenizer", None)
        plain = rust is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode = rust.decode if plain else tokenizer.decode
        self.stop = stop
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""  # all output text decoded so far (truncated at a stop string)
        self._sent = 0  # characters of self.text already handed out

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one output token; returns (text safe to emit now, whether a stop string matched)."""
        self._ids.append(token_id)
        decode = self._decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return "", False  # nothing new, or an incomplete UTF-8 sequence
        old_len = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self.stop:
            longest = max(map(len, self.stop))
            window = max(0, old_len - longest + 1)
            hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._emit(len(self.text)), True
            return self._emit(len(self.text) - self._stop_prefix_len()), False
        return self._emit(len(self.text)), False

    def flush(self) -> str:
        """The held-back tail, once the sequence has finished for another reason."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self._sent)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest text tail that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
