"""OpenAI `logprobs` objects from the engine's per-token logprobs, in the completions and the chat shapes.

A token's text is its own decode (a byte-level token that ends inside a UTF-8 character reads as U+FFFD, as
in vLLM); chat also gives its UTF-8 bytes. The alternatives are the `top_logprobs` most likely tokens.
"""

from __future__ import annotations

FLOOR = -9999.0  # vLLM's floor for a logprob: JSON has no -inf


class Logprobs:
    def __init__(self, tokenizer, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self._text: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id])
        return text

    def of(self, token_ids: list[int], logprobs: list[float], tops: list, offset: int = 0) -> dict:
        """The `logprobs` of a choice (or of one streamed chunk): tokens, their logprobs and alternatives.
        `offset`: where the first token's text starts in the choice's text (completions' text_offset)."""
        if self.chat:
            return {"content": [self._chat(t, lp, top) for t, lp, top in zip(token_ids, logprobs, tops, strict=True)]}
        texts = [self.text(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "text_offset": offsets,
            "token_logprobs": [max(lp, FLOOR) for lp in logprobs],
            "tokens": texts,
            "top_logprobs": [
                {self.text(a): max(alp, FLOOR) for a, alp in (top or ())} | {text: max(lp, FLOOR)}
                for text, lp, top in zip(texts, logprobs, tops, strict=True)
            ],
        }

    def _chat(self, token_id: int, logprob: float, top) -> dict:
        return {
            **self._entry(token_id, logprob),
            "top_logprobs": [self._entry(a, alp) for a, alp in (top or ())],
        }

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.text(token_id)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": list(text.encode())}
