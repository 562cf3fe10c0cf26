"""The HTTP API: OpenAI's ``POST /v1/images/generations`` plus models, health, readiness, metrics.

Handlers never touch the pipeline: they validate, enqueue a ``Job`` with the engine's scheduler
and await its future, so the event loop stays free while the GPU works. A request that waits past
``serve.request_timeout_s`` (504) or whose client goes away leaves the queue.
"""

# No ``from __future__ import annotations``: FastAPI reads the request model (made at start-up from
# the server's limits) from the handler's annotations at runtime.

import asyncio
import base64
import contextlib
import json
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .body_limit import BodyLimit
from .engine import LocalEngine
from .scheduler import BatchKey, Job, QueueFull, Stopped
from .schemas import ErrorResponse, ImageData, ImageResponse, ModelCard, ModelList, parse_size, request_model

GENERATIONS = "/v1/images/generations"
SHOWN_ERRORS = 5
"""A 422 lists this many validation errors at most (and how many there were): a body of 200,000
unknown keys once made an 18 MB reply."""
TEXT_CHARS = 200
"""Longest field name or message a reply repeats (an unknown key may be as long as the body allows)."""


def error(status: int, message: str, kind: str, param: Optional[str] = None,
          headers: Optional[dict[str, str]] = None, **extra: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param}, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


class Rejected(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _short(text: Any) -> str:
    text = str(text)
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"


def _param(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return _short(".".join(parts) or "body")


KINDS = {404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}
"""OpenAI's error ``type`` by status; other 4xx are ``invalid_request_error``, 5xx ``server_error``."""


def kind_of(status: int) -> str:
    return KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def create_app(engine: LocalEngine, lifespan: bool = True) -> FastAPI:
    """The FastAPI app over ``engine``; with ``lifespan`` it starts the engine and drains it on shutdown."""
    limits = engine.limits
    ImageRequest = request_model(limits)
    started = int(time.time())
    metrics = engine.metrics

    @contextlib.asynccontextmanager
    async def run_engine(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)  # every queued and running request is answered first

    app = FastAPI(
        title="onediffx serve", version="1",
        description="A diffusers pipeline assembled by onediffx, behind an OpenAI-style images API. "
                    "Requests that share size, steps, guidance, LoRAs and DeepCache are batched; "
                    "each image is the one its request would give alone with its seed.",
        lifespan=run_engine if lifespan else None,
    )

    app.add_middleware(BodyLimit, max_bytes=engine.cfg.serve.max_body_bytes)

    def counted(request: Request, status: int) -> None:
        if request.url.path == GENERATIONS:
            metrics.requests.labels(str(status)).inc()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        every = exc.errors()
        errors = [{"loc": [_short(p) if isinstance(p, str) else p for p in (e.get("loc") or ())][:8],
                   "msg": _short(e.get("msg")), "type": _short(e.get("type"))} for e in every[:SHOWN_ERRORS]]
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        param = _param(tuple(first["loc"] or ()))
        more = f" (and {len(every) - 1} more errors)" if len(every) > 1 else ""
        counted(request, 422)
        return error(422, f"{param}: {first['msg']}{more}", "invalid_request_error", param, detail=errors,
                     error_count=len(every))

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own refusals (a body over the limit, JSON that is not UTF-8, an
        unknown route) in the API's error shape, counted as every answer to an image request is."""
        counted(request, exc.status_code)
        param = "body" if exc.status_code in (400, 413) else None
        return error(exc.status_code, _short(exc.detail), kind_of(exc.status_code), param, headers=exc.headers)

    def key_of(req: Any) -> BatchKey:
        width, height = parse_size(req.size, limits.max_size)
        costly = engine.cost.problem(width, height, req.steps, req.n)
        if costly:
            raise Rejected(error(422, costly[1], "invalid_request_error", costly[0]))
        if req.loras is None:
            weights = engine.lora_defaults
        else:
            unknown = [name for name in req.loras if name not in engine.lora_keys]
            if unknown:
                have = ", ".join(engine.lora_keys) or "none (start the server with lora=[...])"
                raise Rejected(error(404, f"loras: {unknown[0]!r} is not preloaded; preloaded: {have}",
                                     "not_found_error", "loras"))
            weights = tuple(float(req.loras.get(k, 0.0)) for k in engine.lora_keys)
        interval = req.deepcache if req.deepcache is not None else engine.default_deepcache
        return BatchKey(height=height, width=width, steps=req.steps, guidance=float(req.guidance),
                        loras=weights, deepcache=int(interval), negative=bool(req.negative_prompt))

    def enqueue(req: Any, key: BatchKey, stream: bool) -> Job:
        if engine.error is not None:
            raise Rejected(error(503, f"the pipeline failed to load: {engine.error}", "server_error"))
        if not engine.ready:
            raise Rejected(error(503, "the pipeline is still loading; poll /readyz", "server_error",
                                 headers={"Retry-After": "5"}))
        loop = asyncio.get_running_loop()
        job = Job(key=key, prompt=req.prompt, negative_prompt=req.negative_prompt or None,
                  seeds=[req.seed + i for i in range(req.n)], loop=loop, future=loop.create_future(),
                  progress=asyncio.Queue() if stream else None)
        try:
            engine.scheduler.submit(job)
        except QueueFull:
            wait = engine.scheduler.retry_after_s(len(engine.replicas))
            raise Rejected(error(429, f"the queue is full ({engine.scheduler.queue_limit} requests waiting); "
                                      f"retry after {wait} s", "rate_limit_error",
                                 headers={"Retry-After": str(wait)})) from None
        except Stopped:
            raise Rejected(error(503, "the server is shutting down", "server_error")) from None
        return job

    def answer(job: Job, pngs: list[bytes]) -> dict[str, Any]:
        data = [ImageData(b64_json=base64.b64encode(png).decode("ascii"), seed=seed)
                for png, seed in zip(pngs, job.seeds)]
        return ImageResponse(created=int(time.time()), data=data).model_dump()

    def failed(job: Job, err: BaseException) -> JSONResponse:
        return error(500, f"generation failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                     "server_error")

    async def disconnected(request: Request) -> None:
        """Returns once the client has gone (the body is read, so the next message is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    def drop(job: Job, reason: str) -> None:
        if engine.scheduler.cancel(job):
            metrics.dropped.labels(reason).inc()

    def finish(status: int, started_at: float, images: int = 0) -> None:
        metrics.requests.labels(str(status)).inc()
        if status == 200:
            metrics.images.inc(images)
            metrics.latency.labels(GENERATIONS).observe(time.perf_counter() - started_at)

    @app.post(GENERATIONS, response_model=ImageResponse, summary="Create images",
              responses={404: {"model": ErrorResponse, "description": "a LoRA not in the preloaded stack"},
                         422: {"model": ErrorResponse, "description": "a field out of range, named in param"},
                         429: {"model": ErrorResponse, "description": "queue full; see Retry-After"},
                         500: {"model": ErrorResponse, "description": "the batch failed"},
                         503: {"model": ErrorResponse, "description": "not ready yet"},
                         504: {"model": ErrorResponse, "description": "not done within request_timeout_s"}})
    async def generations(req: ImageRequest, request: Request) -> Any:  # type: ignore[valid-type]
        started_at = time.perf_counter()
        try:
            job = enqueue(req, key_of(req), req.stream)
        except Rejected as rejected:
            metrics.requests.labels(str(rejected.response.status_code)).inc()
            return rejected.response
        timeout = engine.cfg.serve.request_timeout_s
        if req.stream:
            return StreamingResponse(_events(job, timeout, started_at), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        gone = asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({job.future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job.future.done():
            if job.future.exception() is not None:
                finish(500, started_at)
                return failed(job, job.future.exception())
            finish(200, started_at, job.images)
            return answer(job, job.future.result())
        if gone in done:
            drop(job, "disconnect")
            finish(499, started_at)
            return Response(status_code=499)
        drop(job, "timeout")
        finish(504, started_at)
        return error(504, f"not done within serve.request_timeout_s={timeout:g} s", "timeout_error")

    async def _events(job: Job, timeout: float, started_at: float) -> AsyncIterator[str]:
        deadline = time.monotonic() + timeout
        steps = job.key.steps
        try:
            while not job.future.done():
                step = asyncio.ensure_future(job.progress.get())
                done, _ = await asyncio.wait({step, job.future}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if step in done:
                    yield _sse("progress", {"step": step.result(), "steps": steps})
                else:
                    step.cancel()
                if not done:
                    drop(job, "timeout")
                    finish(504, started_at)
                    yield _sse("error", {"error": {"message": f"not done within serve.request_timeout_s={timeout:g} s",
                                                   "type": "timeout_error", "param": None}})
                    return
            if job.future.exception() is not None:
                finish(500, started_at)
                yield _sse("error", json.loads(failed(job, job.future.exception()).body))
                return
            finish(200, started_at, job.images)
            yield _sse("image", answer(job, job.future.result()))
        finally:
            if not job.future.done():
                drop(job, "disconnect")

    @app.get("/v1/models", response_model=ModelList, summary="The served model and its preloaded LoRAs")
    async def models() -> Any:
        return ModelList(data=[ModelCard(id=engine.model_id, created=started, loras=list(engine.lora_keys))])

    @app.get("/healthz", summary="The process is alive (answers while the pipeline loads)")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", summary="200 once every replica is assembled and warm; 503 before")
    async def readyz() -> Any:
        if engine.error is not None:
            return JSONResponse({"status": "failed", "error": str(engine.error)}, status_code=503)
        if not engine.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "replicas": [str(r.asm.device) for r in engine.replicas],
                "ready_seconds": engine.ready_seconds,
                "queue_depth": engine.scheduler.depth}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
