"""The HTTP face of the scheduler: OpenAI's /v1/completions, /v1/chat/completions and
/v1/models, plus /health, /metrics and the chat page, as a Starlette app.

Every request body is read under a size limit, parsed by schemas.py and answered with
OpenAI's JSON error shape on any fault. The scheduler's events cross from its thread to the
event loop through one asyncio queue per request; a client that goes away cancels its request,
which frees its slot at the scheduler's next step."""

import asyncio
import hmac
import json
import math
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmtp.common.formats.chat_template import ChatTemplate, TemplateError, encode_chat

from . import sse
from .scheduler import Finished, Rejected, SamplingParams, Scheduler, TextDelta
from .schemas import ApiError, Sampling, parse_chat, parse_completion

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    queue_timeout: float = 30.0  # seconds a request may wait for a slot before a 503


class _ClientGone(Exception):
    pass


class _Channel:
    """Scheduler thread -> event loop: events of one request, in order."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self, request: Request | None):
        """The next event; with a request, give up once its client has disconnected."""
        if request is None:
            return await self.queue.get()
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone from None


class ServeApp:
    def __init__(self, scheduler: Scheduler, tokenizer, template: ChatTemplate, settings: ServeSettings):
        self.scheduler, self.tokenizer, self.template, self.settings = scheduler, tokenizer, template, settings
        self.seq_len = scheduler.seq_len
        self.longest_piece = max(len(piece) for piece in tokenizer.pieces)

    def build(self) -> Starlette:
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"]),
                  Route("/", self.chat_page, methods=["GET"])]
        handlers = {ApiError: self.api_error, HTTPException: self.http_error, Exception: self.server_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # --- routes ---

    async def completions(self, request: Request) -> Response:
        self.check_key(request)
        parsed = parse_completion(await self.read_json(request), self.tokenizer.vocab_size)
        if isinstance(parsed.prompt, tuple):
            prompt_ids = list(parsed.prompt)
        else:
            self.check_length(len(parsed.prompt))
            prompt_ids = await asyncio.to_thread(self.tokenizer.encode, parsed.prompt, True)
        return await self.respond(request, sse.ResponseShape("text", self.settings.model_name), prompt_ids,
                                  parsed.sampling, ())

    async def chat_completions(self, request: Request) -> Response:
        self.check_key(request)
        parsed = parse_chat(await self.read_json(request))
        self.check_length(sum(len(m.content) for m in parsed.messages))
        try:
            prompt_ids = await asyncio.to_thread(encode_chat, self.tokenizer, self.template, list(parsed.messages))
        except TemplateError as error:  # the template refused these messages (raise_exception)
            raise ApiError(400, f"chat template {self.template.name}: {error}", "messages") from None
        if not prompt_ids or prompt_ids[0] != self.tokenizer.bos_id:
            prompt_ids = [self.tokenizer.bos_id] + prompt_ids  # llama2.c-style models start at BOS
        return await self.respond(request, sse.ResponseShape("chat", self.settings.model_name), prompt_ids,
                                  parsed.sampling, self.template.stop)

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse(dict(self.model_card(), id=request.path_params["model"]))  # any name is this model

    async def health(self, request: Request) -> Response:
        metrics = self.scheduler.metrics
        return JSONResponse({"status": "ok", "slots": metrics.n_slots, "slots_busy": metrics.running,
                             "waiting": metrics.waiting})

    async def metrics(self, request: Request) -> Response:
        self.check_key(request)
        return Response(self.scheduler.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def chat_page(self, request: Request) -> Response:
        if not CHAT_PAGE.exists():
            raise ApiError(404, "no chat page in this installation", error_type="not_found_error")
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    # --- generation ---

    async def respond(self, request: Request, shape: sse.ResponseShape, prompt_ids: list[int], sampling: Sampling,
                      template_stop: tuple[str, ...]) -> Response:
        if len(prompt_ids) >= self.seq_len:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.seq_len} "
                                f"tokens and needs room for one more", "messages" if shape.kind == "chat" else "prompt",
                           code="context_length_exceeded")
        room = self.seq_len - len(prompt_ids) + 1  # the token sampled at the last position is emitted, not fed
        params = SamplingParams(max_tokens=min(sampling.max_tokens or room, room), temperature=sampling.temperature,
                                top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                                stop=sampling.stop + template_stop)
        channel = _Channel()
        ticket = self.scheduler.submit(prompt_ids, params, channel, self.settings.queue_timeout)
        streaming = False
        try:
            first = await channel.next(request)
            if isinstance(first, Rejected):
                retry = {"Retry-After": str(math.ceil(first.retry_after))} if first.retry_after else {}
                raise ApiError(first.status, first.message, error_type="server_error" if first.status >= 500
                               else "invalid_request_error", headers=retry)
            if sampling.stream:
                streaming = True
                return StreamingResponse(self.stream(shape, ticket, channel, first, sampling.include_usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await self.whole(request, shape, channel, first)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the slot is freed below
        finally:
            if not streaming:
                ticket.cancel()

    async def whole(self, request: Request, shape: sse.ResponseShape, channel: _Channel, event) -> Response:
        texts = []
        while isinstance(event, TextDelta):
            texts.append(event.text)
            event = await channel.next(request)
        self.check_finished(event)
        return JSONResponse(shape.whole("".join(texts), event.reason,
                                        sse.usage(event.prompt_tokens, len(event.token_ids))))

    async def stream(self, shape: sse.ResponseShape, ticket, channel: _Channel, event, include_usage: bool):
        try:
            if shape.kind == "chat":
                yield sse.event(shape.chunk("", first=True))
            while isinstance(event, TextDelta):
                if event.text:
                    yield sse.event(shape.chunk(event.text))
                event = await channel.next(None)
            try:
                self.check_finished(event)
            except ApiError as error:
                yield sse.event(error.body())
            else:
                yield sse.event(shape.chunk(None, event.reason))
                if include_usage:
                    yield sse.event(shape.usage_chunk(sse.usage(event.prompt_tokens, len(event.token_ids))))
            yield sse.DONE
        finally:  # also when the client went away and the server cancelled this generator
            ticket.cancel()

    @staticmethod
    def check_finished(event) -> None:
        assert isinstance(event, Finished), event
        if event.reason not in ("stop", "length"):
            raise ApiError(503 if event.reason == "error" else 499, event.error or f"request {event.reason}",
                           error_type="server_error")

    # --- checks ---

    def check_key(self, request: Request) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {expected}".encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           error_type="authentication_error", code="invalid_api_key")

    def check_length(self, n_chars: int) -> None:
        """Refuse, before tokenizing, a text that cannot fit: no piece spans more than longest_piece chars."""
        if n_chars > self.seq_len * self.longest_piece:
            raise ApiError(400, f"the prompt is {n_chars} characters, more than this model's context of "
                                f"{self.seq_len} tokens can hold", code="context_length_exceeded")

    async def read_json(self, request: Request):
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, f"the request body is over the {limit}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the {limit}-byte limit")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None
        except RecursionError:
            raise ApiError(400, "the request body nests too deeply") from None

    def model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "llmtp"}

    # --- errors ---

    def count_error(self, status: int) -> None:
        errors = self.scheduler.metrics.http_errors
        errors[status] = errors.get(status, 0) + 1

    async def api_error(self, request: Request, error: ApiError) -> Response:
        self.count_error(error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def http_error(self, request: Request, error: HTTPException) -> Response:
        self.count_error(error.status_code)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return JSONResponse(ApiError(error.status_code, message, error_type=kind).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    async def server_error(self, request: Request, error: Exception) -> Response:
        self.count_error(500)
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}", error_type="server_error").body(),
                            status_code=500)
