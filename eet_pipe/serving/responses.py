"""OpenAI-format response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from eet_pipe.serving.sequences import Event, Logprob

__all__ = ["ResponseBuilder", "Choice", "sse", "SSE_DONE"]

SSE_DONE = "data: [DONE]\n\n"


def sse(data: dict) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass
class Choice:
    """What a non-streaming response accumulates for one choice."""

    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class ResponseBuilder:
    """Builds the bodies of one request. `chat` selects the chat.completion format."""

    def __init__(self, chat: bool, model: str, token_text: Callable[[int], str], logprobs: bool,
                 token_ids: bool = False) -> None:
        self.chat, self.model, self.token_text, self.want_logprobs = chat, model, token_text, logprobs
        self.want_ids = token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets: dict[int, int] = {}
        # a stream chunk without logprobs is this prefix, the choice's fields and a fixed tail: the same bytes
        # as `sse` of the chunk's dict (compact separators, ASCII escapes), without building and encoding it
        head = json.dumps(self._head(True), separators=(",", ":"))
        self._chunk_prefix = f'data: {head[:-1]},"choices":[{{"index":'

    def _head(self, streaming: bool) -> dict:
        obj = self.object + (".chunk" if streaming and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, entries: list[Logprob], index: int) -> dict | None:
        """The `logprobs` object of a choice (None unless requested)."""
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_entry(tok, lp, alts) for tok, lp, alts in entries]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp, alts in entries:
            text = self.token_text(tok)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.token_text(t): v for t, v in alts})
            out["text_offset"].append(self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return out

    def _chat_entry(self, tok: int, lp: float, alts: list[tuple[int, float]]) -> dict:
        def one(t: int, v: float) -> dict:
            text = self.token_text(t)
            return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

        return {**one(tok, lp), "top_logprobs": [one(t, v) for t, v in alts]}

    # ---- streaming ----

    def role_chunk(self, index: int) -> str:
        """Chat streams open each choice with the assistant role."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return sse({**self._head(True), "choices": [choice]})

    def event_chunk(self, ev: Event) -> str | None:
        """The SSE chunk of a 'token' or 'finish' event (None when there is nothing to send)."""
        if ev.kind == "token" and not ev.text and not self.want_ids and not (self.want_logprobs and ev.logprobs):
            return None
        if not ev.logprobs:
            return self._plain_chunk(ev)
        return self._dict_chunk(ev, self.logprobs(ev.logprobs, ev.index))

    def _dict_chunk(self, ev: Event, lp: dict | None) -> str:
        """The chunk of `ev` with the `logprobs` object `lp`, through its dict."""
        if self.chat:
            delta = {"content": ev.text} if ev.text or ev.kind == "token" else {}
            choice = {"index": ev.index, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
        else:
            choice = {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
        if self.want_ids:
            choice["token_ids"] = ev.token_ids
        return sse({**self._head(True), "choices": [choice]})

    def _plain_chunk(self, ev: Event) -> str:
        """`_dict_chunk(ev, None)`, from the precomputed prefix."""
        text = json.dumps(ev.text)
        if self.chat:
            body = f'"delta":{{"content":{text}}}' if ev.text or ev.kind == "token" else '"delta":{}'
        else:
            body = f'"text":{text}'
        reason = "null" if ev.finish_reason is None else json.dumps(ev.finish_reason)
        ids = f',"token_ids":[{",".join(map(str, ev.token_ids))}]' if self.want_ids else ""
        return f'{self._chunk_prefix}{ev.index},{body},"logprobs":null,"finish_reason":{reason}{ids}}}]}}\n\n'

    def usage_chunk(self, usage: dict) -> str:
        return sse({**self._head(True), "choices": [], "usage": usage})

    # ---- whole response ----

    def response(self, choices: list[Choice], usage: dict) -> dict:
        """The non-streaming response body."""
        out = []
        for i, c in enumerate(choices):
            lp = self.logprobs(c.logprobs, i)
            if self.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
            else:
                out.append({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
            if self.want_ids:
                out[-1]["token_ids"] = c.token_ids
        return {**self._head(False), "choices": out, "usage": usage}
