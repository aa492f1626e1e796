"""OpenAI `logprobs` objects from the engine's per-token logprobs, in the completions and the chat shapes, and
the prompt's (completions `echo`; vLLM's `prompt_logprobs`).

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
        return self._completions(token_ids, logprobs, tops, offset)

    def prompt(self, prompt_ids: list[int], entries: list) -> dict:
        """Completions `echo` with `logprobs`: the prompt's tokens in the completions shape (the first has none)."""
        logprobs = [None if e is None else e.logprob for e in entries]
        return self._completions(prompt_ids, logprobs, [None if e is None else e.top for e in entries], 0)

    def _completions(self, token_ids: list[int], logprobs: list, tops: list, offset: int) -> dict:
        """A token without a logprob (a prompt's first) has None for it and for its alternatives."""
        texts = [self.text(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "text_offset": offsets,
            "token_logprobs": [None if lp is None else max(lp, FLOOR) for lp in logprobs],
            "tokens": texts,
            "top_logprobs": [
                None
                if lp is None
                else {self.text(a): max(alp, FLOOR) for a, alp in (top or ())} | {text: max(lp, FLOOR)}
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

    def vllm_prompt(self, prompt_ids: list[int], entries: list) -> list:
        """vLLM's `prompt_logprobs`: per prompt token (None for the first) {token id: {logprob, rank,
        decoded_token}} for the token itself and the most likely ones."""
        out = []
        for token_id, e in zip(prompt_ids, entries, strict=True):
            if e is None:
                out.append(None)
                continue
            alts = {str(a): self._ranked(a, alp, rank) for rank, (a, alp) in enumerate(e.top, start=1)}
            out.append(alts | {str(token_id): self._ranked(token_id, e.logprob, e.rank)})
        return out

    def _ranked(self, token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": max(logprob, FLOOR), "rank": rank, "decoded_token": self.text(token_id)}


def joined(first: dict, then: dict) -> dict:
    """Two completions-shape logprobs one after the other (the prompt's, then the generated tokens')."""
    return {key: first[key] + then[key] for key in first}
