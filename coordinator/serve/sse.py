"""OpenAI's response shapes: whole bodies, streamed chunks, and server-sent-event framing.

`kind` is "text" for /v1/completions (object text_completion) or "chat" for
/v1/chat/completions (object chat.completion[.chunk], text under message/delta)."""

import json
import secrets
import time

DONE = b"data: [DONE]\n\n"


class ResponseShape:
    """One response's id, creation time and model name, and the bodies that carry them."""

    def __init__(self, kind: str, model: str):
        assert kind in ("text", "chat")
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list, usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage)

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """A streamed piece: text (None with a finish_reason: the closing chunk)."""
        if self.kind == "chat":
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: dict) -> dict:
        """stream_options.include_usage: a last chunk with no choices and the usage."""
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(object_name, [], usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def event(data: dict) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
