"""The OpenAI-compatible HTTP API over a Batcher (FastAPI; the `serve` extra).

Endpoints: GET /health (no key needed), GET /v1/models, GET /v1/models/{id}, POST
/v1/completions, POST /v1/chat/completions (both with server-sent-event streaming), GET /metrics.
Every failure is answered with OpenAI's error body {"error": {"message", "type", "param",
"code"}}: 400 for a bad request, 401 without the API key, 404 for an unknown model or path, 413
for a body over the limit, 429 when the queue is full, 503 when the server is shutting down or
failed, 504 past the request timeout. A client that disconnects frees its slot.

Chat prompts go through the checkpoint's chat template; a checkpoint without one gets the plain
template PLAIN_CHAT: "role: content" lines, then "assistant:"."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import threading
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from dynaexq_jax.errors import GenerationError, PromptTooLongError, QueueFullError, ServerError
from dynaexq_jax.server import MAX_BODY_BYTES, REQUEST_TIMEOUT_S
from dynaexq_jax.server import batcher as batching
from dynaexq_jax.server.metrics import CONTENT_TYPE, prometheus_text
from dynaexq_jax.server.protocol import ChatRequest, CompletionRequest, error_body, validation_message


def plain_chat(messages: list[dict]) -> str:
    """PLAIN_CHAT, the template of a checkpoint without one."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def create_app(batcher: batching.Batcher, *, model_name: str, api_key: str | None = None,
               request_timeout: float = REQUEST_TIMEOUT_S, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="dynaexq-jax", docs_url=None, redoc_url=None, openapi_url=None)
    codec, created = batcher.codec, int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    async def authorized(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error",
                           code="invalid_api_key")

    keyed = [Depends(authorized)]

    async def body_of(request: Request, model_type):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            raise ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                raise ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = model_type.model_validate(body)
        except ValidationError as e:
            message, param = validation_message(e)
            raise ApiError(400, message, param=param) from None
        if req.model != model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist: this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return req

    def job(prompt: list[int], max_tokens: int | None, req) -> batching.Request:
        if max_tokens is None:                  # chat without a limit: what the context leaves
            max_tokens = max(1, batcher.max_len - len(prompt))
        try:
            batcher.check(prompt, max_tokens)
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded") from None
        except GenerationError as e:
            raise ApiError(400, str(e), param="prompt") from None
        return batching.Request(prompt, max_tokens, on_event=None, temperature=req.temperature,
                                top_k=max(req.top_k, 0), top_p=req.top_p,
                                seed=req.seed if req.seed is not None else secrets.randbits(31), stop=req.stops)

    async def run(request: Request, jobs: list[batching.Request], req, render):
        """Submit the jobs and answer with render's JSON, or stream its chunks."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for i, j in enumerate(jobs):   # called from the batcher's thread
            j.on_event = lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))
        try:
            for j in jobs:
                batcher.submit(j)
        except (QueueFullError, ServerError) as e:
            for j in jobs:
                batcher.cancel(j)
            full = isinstance(e, QueueFullError)
            raise ApiError(429 if full else 503, str(e), "rate_limit_error" if full else "server_error") from None
        deadline = loop.time() + request_timeout

        async def receive():
            """(choice index, Event) until every job is done; ends early if the client left."""
            open_ = len(jobs)
            try:
                while open_:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise ApiError(504, f"the request did not finish within {request_timeout:g} s", "timeout")
                    try:
                        i, ev = await asyncio.wait_for(events.get(), min(left, 0.5))
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if ev.kind == "error":
                        raise ApiError(500, f"generation failed: {ev.text}", "server_error")
                    open_ -= ev.kind == "done"
                    yield i, ev
            finally:
                for j in jobs:
                    if not j.finished:
                        batcher.cancel(j)

        ident, usage = f"{render.prefix}-{uuid.uuid4().hex}", lambda: dict(
            prompt_tokens=sum(len(j.prompt) for j in jobs), completion_tokens=sum(len(j.tokens) for j in jobs),
            total_tokens=sum(len(j.prompt) + len(j.tokens) for j in jobs))
        head = dict(id=ident, created=int(time.time()), model=model_name)
        if not req.stream:
            [_ async for _ in receive()]      # each job's text accumulates on it; only wait for the ends
            return dict(**head, object=render.object, usage=usage(),
                        choices=[render.choice(i, j.text, j.finish_reason) for i, j in enumerate(jobs)])

        async def sse():
            def event(data) -> str:
                return f"data: {json.dumps(data)}\n\n"
            try:
                for i in range(len(jobs)):
                    if render.opening is not None:
                        yield event(dict(**head, object=render.chunk_object, choices=[render.opening(i)]))
                async for i, ev in receive():
                    delta = ev.text if ev.kind == "text" else ""
                    yield event(dict(**head, object=render.chunk_object,
                                     choices=[render.delta(i, delta, ev.finish_reason)]))
                if req.include_usage:
                    yield event(dict(**head, object=render.chunk_object, choices=[], usage=usage()))
            except ApiError as e:
                yield event(e.body)
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        if batcher.error:
            return JSONResponse(error_body(f"the server failed: {batcher.error}", "server_error"), status_code=503)
        return {"status": "ok"}

    def model_card():
        return dict(id=model_name, object="model", created=created, owned_by="dynaexq-jax",
                    max_model_len=batcher.max_len)

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return dict(object="list", data=[model_card()])

    @app.get("/v1/models/{model_id:path}", dependencies=keyed)
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics", dependencies=keyed)
    async def metrics():
        return PlainTextResponse(prometheus_text(batcher), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        req = await body_of(request, CompletionRequest)
        prompts = [codec.encode(p) if isinstance(p, str) else p for p in req.prompts()]
        return await run(request, [job(p, req.max_tokens, req) for p in prompts], req, _Completion)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(request: Request):
        req = await body_of(request, ChatRequest)
        messages = [dict(role=m.role, content=m.text()) for m in req.messages]
        options = req.chat_template_kwargs or {}
        if codec.chat_template is None:
            if options:
                raise ApiError(400, "chat_template_kwargs: this model has no chat template (the plain one takes "
                                    "no options)", param="chat_template_kwargs")
            prompt = codec.encode(plain_chat(messages))
        else:
            try:
                prompt = codec.encode(codec.render_chat(messages, True, **options), add_special_tokens=False)
            except GenerationError as e:
                raise ApiError(400, str(e), param="messages") from None
        return await run(request, [job(prompt, req.limit, req)], req, _Chat)

    return app


class _Completion:
    """The shapes of /v1/completions answers."""
    prefix, object, chunk_object, opening = "cmpl", "text_completion", "text_completion", None

    @staticmethod
    def choice(i, text, finish_reason):
        return dict(index=i, text=text, finish_reason=finish_reason, logprobs=None)

    delta = choice


class _Chat:
    """The shapes of /v1/chat/completions answers."""
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def choice(i, text, finish_reason):
        return dict(index=i, message=dict(role="assistant", content=text), finish_reason=finish_reason,
                    logprobs=None)

    @staticmethod
    def opening(i):
        return dict(index=i, delta=dict(role="assistant", content=""), finish_reason=None, logprobs=None)

    @staticmethod
    def delta(i, text, finish_reason):
        return dict(index=i, delta=dict(content=text) if text else {}, finish_reason=finish_reason, logprobs=None)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info"):
    """Run the app on uvicorn until interrupted."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serving_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run the app on uvicorn in a background thread (tests, benchmarks): yields its base URL
    (port 0: a free port), stops it on exit."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dynaexq-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ServerError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join()
