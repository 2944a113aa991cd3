"""Request bodies of /v1/completions and /v1/chat/completions, checked field by field.

Whatever a client sends arrives here as parsed JSON of any shape; every field the server uses
is type- and range-checked, and a bad one becomes an ApiError naming it (a 400 in OpenAI's
error format). Fields the server does not use are ignored, as OpenAI-compatible servers do."""

import secrets
from dataclasses import dataclass

from llmtp.common.formats.chat_template import ROLES, ChatMessage

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, the offending field, type and code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 error_type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.error_type, self.code, self.headers = error_type, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """The fields both endpoints share. max_tokens None: as many as the context allows."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carrying usage


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | tuple[int, ...]
    sampling: Sampling


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    sampling: Sampling


def parse_completion(body, vocab_size: int) -> CompletionRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
        prompt = tuple(prompt)
    elif not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string, or a list of one string or of token ids "
                            "(this server runs one prompt per request)", "prompt")
    return CompletionRequest(prompt, _sampling(body, default_max_tokens=16))


def parse_chat(body) -> ChatRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    parsed = tuple(_message(message, index) for index, message in enumerate(messages))
    return ChatRequest(parsed, _sampling(body, default_max_tokens=None))


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _message(message, index: int) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object with role and content", where)
    role = "system" if message.get("role") == "developer" else message.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {message.get('role')!r}",
                       f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones can reach a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}.content parts must all be {{\"type\": \"text\", \"text\": ...}}",
                           f"{where}.content")
        content = "".join(part["text"] for part in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string", f"{where}.content")
    return ChatMessage(role, content)


def _sampling(body: dict, default_max_tokens: int | None) -> Sampling:
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, "n must be 1 (one choice per request)", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = body.get("top_k", 0)
    if top_k is None:
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise ApiError(400, f"top_k must be an integer >= 0, got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63) | 1  # the sampler's xorshift must not start at 0
    elif not _is_int(seed):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return Sampling(max_tokens, temperature, top_p, top_k, seed, _stop(body.get("stop")), bool(stream),
                    bool(options.get("include_usage", False)))


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings "
                            f"of up to {MAX_STOP_CHARS} characters", "stop")
    return tuple(s for s in stops if s)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
