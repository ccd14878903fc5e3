"""`lorakit serve`: an OpenAI-compatible HTTP server (starlette on uvicorn) over one base model
and many adapters, backed by the continuous-batching `Engine`.

Every handler checks its request completely (fields, model, lengths) before anything reaches
the engine; the engine's scheduler thread is the only code that touches the model. GET /metrics
gives Prometheus' text format (`lorakit.serving.metrics`); like every endpoint, it asks for the
API key when the server has one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from lorakit.errors import InputNotFoundError, UserError
from lorakit.inference.adapters import AdapterNotFound
from lorakit.inference.engine import (
    MAX_BATCH,
    MAX_WAITING,
    PREFILL_TOKENS_PER_STEP,
    Draining,
    Engine,
    Event,
    QueueFull,
    Request,
    Sampling,
)
from lorakit.lora import BASE_ADAPTER
from lorakit.serving import metrics as prometheus
from lorakit.serving import openai_api as api
from lorakit.serving.metrics import Watch
from lorakit.serving.openai_api import ApiError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """What `lorakit serve` was asked for, beyond the model and its adapters."""

    base_names: tuple[str, ...]  # `model` values that mean the base (served name, path)
    max_tokens_limit: int = 1024
    max_body_bytes: int = 4 << 20
    api_key: str | None = None
    adapter_root: Path | None = None  # where runtime loads may read adapters from (None: any)
    retry_after_s: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Server:
    """The HTTP side: request checking, the event bridge from the engine, response shapes."""

    def __init__(self, engine: Engine, config: ServeConfig, context_length: int) -> None:
        self.engine = engine
        self.config = config
        self.context_length = context_length
        self.tokenizer = engine.tokenizer
        self.stopping = False  # set on SIGTERM: new requests get 503
        self.metrics = prometheus.create(engine, self.base_name)  # None: no prometheus_client
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus_metrics, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/load_lora_adapter", self.load_adapter, methods=["POST"]),
                Route("/v1/unload_lora_adapter", self.unload_adapter, methods=["POST"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    @property
    def base_name(self) -> str:
        return self.config.base_names[0]

    # -- endpoints -----------------------------------------------------------------------------
    async def health(self, request: HttpRequest) -> Response:
        return await self._guarded(request, self._health)

    async def models(self, request: HttpRequest) -> Response:
        return await self._guarded(request, self._models)

    async def prometheus_metrics(self, request: HttpRequest) -> Response:
        return await self._guarded(request, self._prometheus_metrics)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._counted(request, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._counted(request, chat=True)

    async def load_adapter(self, request: HttpRequest) -> Response:
        return await self._guarded(request, self._load_adapter)

    async def unload_adapter(self, request: HttpRequest) -> Response:
        return await self._guarded(request, self._unload_adapter)

    # -- implementations -----------------------------------------------------------------------
    async def _guarded(self, request: HttpRequest, handler) -> Response:
        try:
            self._authorize(request)
            return await handler(request)
        except ApiError as e:
            return JSONResponse(e.body(), e.status, headers=e.headers)

    async def _counted(self, request: HttpRequest, chat: bool) -> Response:
        """A generation request, counted by adapter and HTTP status once answered."""
        try:
            response = await self._guarded(request, lambda r: self._generate(r, chat))
        except Exception:  # starlette answers 500
            self._answered(request, 500)
            raise
        self._answered(request, response.status_code)
        return response

    def _answered(self, request: HttpRequest, status: int) -> None:
        if self.metrics is not None:
            # set by _generate once the request names a model this server serves
            adapter = getattr(request.state, "adapter_label", prometheus.UNKNOWN_LABEL)
            self.metrics.answered(adapter, status)

    def _authorize(self, request: HttpRequest) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                code="invalid_api_key",
            )

    async def _health(self, request: HttpRequest) -> Response:
        return JSONResponse(
            {
                "status": "stopping" if self.stopping else "ok",
                "running": self.engine.running,
                "waiting": self.engine.busy - self.engine.running,
            }
        )

    async def _prometheus_metrics(self, request: HttpRequest) -> Response:
        if self.metrics is None:
            raise ApiError(501, prometheus.MISSING, code="metrics_unavailable")
        body, content_type = self.metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def _models(self, request: HttpRequest) -> Response:
        root = self.config.base_names[-1]
        cards = [api.model_card(self.base_name, root, None, self.context_length)]
        for name, path in sorted(self.engine.adapter_paths().items()):
            cards.append(api.model_card(name, str(path), self.base_name, self.context_length))
        return JSONResponse({"object": "list", "data": cards})

    async def _generate(self, request: HttpRequest, chat: bool) -> Response:
        body = api.check_fields(await self._json(request), api.CHAT if chat else api.COMPLETION)
        adapter = self._adapter_for(body["model"])
        if adapter == BASE_ADAPTER or adapter in self.engine.adapter_paths():
            request.state.adapter_label = prometheus.adapter_label(adapter)
        prompt_ids = self._prompt_ids(body, chat)
        sampling = self._sampling(body, len(prompt_ids))
        if self.stopping:
            raise self._unavailable("the server is shutting down")
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        arrived = time.monotonic()
        on_event = sink if self.metrics is None else self.metrics.watch(adapter, arrived, sink)
        job = Request(prompt_ids, adapter, sampling, on_event, arrived=arrived)
        try:
            self.engine.submit(job)
        except UserError as e:  # full, shutting down, or an unknown model
            raise self._error_for(e) from None
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        model = body["model"]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stream = self._stream(job, events, rid, model, chat, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        result = await self._collect_unless_disconnected(request, job, events)
        if result is None:  # the client went away: nobody to answer
            return Response(status_code=499)
        text, last = result
        if last.error is not None:
            raise self._error_for(last.error)
        use = api.usage(last.prompt_tokens, last.completion_tokens)
        return JSONResponse(api.completion_body(rid, model, text, last.finish_reason, use, chat))

    async def _collect_unless_disconnected(self, request, job, events):
        async def collect() -> tuple[str, Event]:
            parts = []
            while True:
                event = await events.get()
                parts.append(event.text)
                if event.finish_reason is not None or event.error is not None:
                    return "".join(parts), event

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                self._cancel(job)
        return work.result() if work in done else None

    def _cancel(self, job: Request) -> None:
        """Drop a request whose client went away."""
        self.engine.cancel(job)
        if isinstance(job.on_event, Watch):
            job.on_event.abort()

    async def _stream(
        self, job: Request, events, rid: str, model: str, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        try:
            if chat:  # the first chat chunk announces the role
                yield _sse(api.completion_body(rid, model, "", None, None, chat))
            while True:
                event = await events.get()
                if event.error is not None:
                    yield _sse(self._error_for(event.error).body())
                    break
                if event.text or event.finish_reason:
                    yield _sse(
                        api.completion_body(rid, model, event.text, event.finish_reason, None, chat)
                    )
                if event.finish_reason is not None:
                    if include_usage:
                        use = api.usage(event.prompt_tokens, event.completion_tokens)
                        yield _sse(api.usage_chunk(rid, model, use, chat))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (starlette cancels the stream)
            if not job.done:
                self._cancel(job)

    async def _load_adapter(self, request: HttpRequest) -> Response:
        body = await self._json(request)
        body = api.check_fields(
            body,
            {
                "lora_name": api.Field((str,), required=True),
                "lora_path": api.Field((str,), required=True),
                "load_inplace": api.Field((bool,)),
            },
        )
        name, path = body["lora_name"], self._adapter_path(body["lora_path"])
        if name in self.config.base_names:
            raise ApiError(400, f"'{name}' is the base model's name", "lora_name")
        if name in self.engine.adapter_paths() and not body.get("load_inplace"):
            raise ApiError(400, f"the LoRA adapter '{name}' has already been loaded", "lora_name")
        try:
            await asyncio.wrap_future(self.engine.load_adapter(name, str(path)))
        except (UserError, ValueError) as e:
            raise self._error_for(e, "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_adapter(self, request: HttpRequest) -> Response:
        body = await self._json(request)
        body = api.check_fields(
            body, {"lora_name": api.Field((str,), required=True), "lora_int_id": api.Field((int,))}
        )
        try:
            self.engine.unload_adapter(body["lora_name"])
        except AdapterNotFound as e:
            raise self._error_for(e, "lora_name") from None
        return PlainTextResponse(
            f"Success: LoRA adapter '{body['lora_name']}' removed successfully."
        )

    # -- request parts -------------------------------------------------------------------------
    async def _json(self, request: HttpRequest) -> Any:
        """The body as JSON; a body over the limit is read to its end (up to a bound) and
        dropped, so that the client, still sending, gets the 413 rather than a reset."""
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 16 * limit:
                break
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def _adapter_for(self, model: str) -> str:
        """The adapter a request's `model` names (BASE_ADAPTER: the base). Whether an adapter of
        that name exists is the engine's to say, when the request is submitted."""
        if model in self.config.base_names:
            return BASE_ADAPTER
        if model == BASE_ADAPTER:  # the engine's own spelling, not a name clients may use
            raise self._error_for(AdapterNotFound(f"the model '{model}' does not exist"))
        return model

    def _adapter_path(self, given: str) -> Path:
        path = Path(given).expanduser()
        root = self.config.adapter_root
        if root is not None:
            resolved = (root / path).resolve()  # an absolute `given` replaces root here
            if not resolved.is_relative_to(root.resolve()):
                raise ApiError(
                    400, f"lora_path must be inside {root} (--adapter-root)", "lora_path"
                )
            return resolved
        return path

    def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            messages = api.messages_of(body)
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(
                    400,
                    "this model's tokenizer has no chat template; use /v1/completions",
                    "messages",
                )
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception as e:  # the template rejects the conversation (roles, order)
                raise ApiError(
                    400, f"the chat template rejected 'messages': {e}", "messages"
                ) from e
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt = api.prompt_of(body)
            if isinstance(prompt, list):
                vocab = len(self.tokenizer)
                if any(t < 0 or t >= vocab for t in prompt):
                    raise ApiError(400, f"'prompt' token ids must be in [0, {vocab})", "prompt")
                ids = list(prompt)
            else:
                ids = self.tokenizer(prompt)["input_ids"]  # special tokens as `generate` adds
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) >= self.context_length:
            raise ApiError(
                413,
                f"the prompt has {len(ids)} tokens; this model's context is "
                f"{self.context_length} tokens",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        return ids

    def _sampling(self, body: dict[str, Any], prompt_tokens: int) -> Sampling:
        limit = self.config.max_tokens_limit
        room = self.context_length - prompt_tokens
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if asked is not None and asked > limit:
            raise ApiError(
                400,
                f"'max_tokens' is {asked}; this server allows at most {limit} (--max-tokens-limit)",
                "max_tokens",
            )
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"this model's context is {self.context_length} tokens: "
                f"{prompt_tokens} in the prompt leave {room} for the completion, "
                f"not {asked}",
                "max_tokens",
                "context_length_exceeded",
            )
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        return Sampling(
            max_tokens=asked if asked is not None else min(limit, room),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            seed=body.get("seed"),
            stop=api.stops_of(body),
        )

    def _unavailable(self, message: str) -> ApiError:
        return ApiError(
            503,
            message,
            code="unavailable",
            headers={"Retry-After": str(self.config.retry_after_s)},
        )

    def _error_for(self, error: Exception, param: str = "model") -> ApiError:
        """The HTTP answer to an error the engine raised or reported (`param`: the field of
        the request it is about)."""
        if isinstance(error, QueueFull):
            retry = {"Retry-After": str(self.config.retry_after_s)}
            return ApiError(429, f"too many requests: {error}", code="queue_full", headers=retry)
        if isinstance(error, Draining):
            return self._unavailable(str(error))
        if isinstance(error, AdapterNotFound):
            code = "model_not_found" if param == "model" else None
            return ApiError(404, str(error), param, code)
        if isinstance(error, InputNotFoundError) and param == "lora_path":
            return ApiError(404, str(error), param)  # the directory given is not there
        if isinstance(error, (UserError, ValueError)):  # e.g. an adapter that failed to load
            return ApiError(400, str(error), param)
        return ApiError(500, f"internal error: {type(error).__name__}: {error}")

    async def _not_found(self, request: HttpRequest, exc: Exception) -> Response:
        return JSONResponse(ApiError(404, f"no endpoint {request.url.path}").body(), 404)

    async def _not_allowed(self, request: HttpRequest, exc: Exception) -> Response:
        message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(ApiError(405, message).body(), 405)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def build(
    model_name: str | None,
    adapters: list[str],
    dtype: str = "auto",
    quantization: str | None = None,
    served_name: str | None = None,
    max_loras: int = 8,
    max_batch: int = MAX_BATCH,
    max_waiting: int = MAX_WAITING,
    max_prefill_tokens: int = PREFILL_TOKENS_PER_STEP,
    **config: Any,
) -> Server:
    """Load the base, wrap it for adapters, read `name=DIR` (or `DIR`) adapters, and return the
    server (not yet serving). Every problem here is a one-line error before anything binds."""
    from lorakit.base import load_model
    from lorakit.inference.adapters import AdapterPool
    from lorakit.lora import LoraModel
    from lorakit.lora.decode_kernel import decode_kernel

    pairs = [_adapter_arg(a) for a in adapters]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"--adapter names repeat: {names}")
    if len(pairs) > max_loras:
        print(
            f"lorakit: {len(pairs)} adapters, --max-loras {max_loras}: the least recently "
            "used ones are loaded again from disk when requested",
            file=sys.stderr,
        )
    model, tokenizer = load_model(model_name, dtype=dtype, quantization=quantization)
    decode_kernel()  # built now (once per machine) rather than in the first request
    lora = LoraModel(model, None)
    pool = AdapterPool(lora, max_loras)
    for name, path in pairs:
        files = pool.read(name, path, keep=False).result()
        if pool.make_room():
            pool.install(files)
        else:  # cannot happen at start (nothing is pinned); keep the rule in one place anyway
            raise UserError(f"no adapter slot for '{name}'")
    # the adapters beyond --max-loras were evicted while installing: still known, by path
    served = served_name or _served_name(model_name)
    base_names = tuple(dict.fromkeys([served] + ([model_name] if model_name else [])))
    clash = sorted(set(base_names) & set(names))
    if clash:
        raise UserError(f"adapter name {clash[0]!r} is the base model's name; rename it")
    engine = Engine(
        lora,
        tokenizer,
        pool,
        max_batch=max_batch,
        max_waiting=max_waiting,
        prefill_tokens_per_step=max_prefill_tokens,
    )
    return Server(engine, ServeConfig(base_names, **config), _context_length(model, tokenizer))


def _adapter_arg(arg: str) -> tuple[str, Path]:
    name, sep, path = arg.partition("=")
    if not sep:
        path, name = arg, Path(arg).resolve().name
    if not Path(path).is_dir():
        raise InputNotFoundError(f"--adapter {arg}: {path} is not a directory")
    return name, Path(path)


def _served_name(model_name: str | None) -> str:
    if model_name is None:
        from lorakit.base.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(model_name).name if Path(model_name).exists() else model_name


def _context_length(model: Any, tokenizer: Any) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return min(int(getattr(tokenizer, "model_max_length", 2048)), 1 << 20)


def run(server: Server, host: str, port: int, grace_s: float) -> None:
    """Serve until SIGINT / SIGTERM; then stop admitting, let running requests finish within
    `grace_s` seconds, stop the engine and return."""
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                print(f"lorakit: serving on http://{host}:{port}", flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not server.stopping:
                server.stopping = True
                server.engine.drain()
                # what has not finished within the grace period gets an error answer (an
                # error chunk, or a 503), rather than a connection cut by uvicorn's timeout
                late = Draining(
                    f"the server stopped; the request did not finish within the "
                    f"{grace_s:g} s grace period"
                )
                timer = threading.Timer(grace_s, server.engine.abort, [late])
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        server.app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=grace_s + 5,  # a backstop: abort() answers first
        lifespan="off",
    )
    # uvicorn re-raises the signal it caught once it has shut down; a handler that does
    # nothing lets `lorakit serve` exit 0 after a graceful stop instead of dying by SIGTERM
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.engine.start()
    try:
        _Uvicorn(config).run()
    finally:
        server.engine.stop()
    print("lorakit: server stopped", file=sys.stderr, flush=True)
