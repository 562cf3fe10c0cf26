"""A small client of ``onediffx serve`` (httpx), used by the tests and the serving bench.

    from onediffx.client import Client
    with Client("http://127.0.0.1:8000") as c:
        c.wait_ready()
        images = c.generate("a red fox", size="1024x1024", seed=3, loras={"emoji": 0.8})

``generate`` returns PIL images; ``request`` returns the raw ``httpx.Response`` (status codes,
headers) and ``stream`` yields the server-sent events. ``AsyncClient`` is the same over asyncio,
for driving many requests at once.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any, AsyncIterator, Iterator, Optional

import httpx

GENERATIONS = "/v1/images/generations"


class ServeError(Exception):
    """A non-200 answer; ``status`` and the server's one-line ``message``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param = status, message, param


def decode(response: dict[str, Any]) -> list[Any]:
    """The PIL images of an images response (b64_json PNGs)."""
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB") for item in response["data"]]


def body(prompt: str, **fields: Any) -> dict[str, Any]:
    """A request body: ``prompt`` plus the fields given (``None`` ones left out)."""
    return {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code == 200:
        return
    try:
        err = response.json().get("error", {})
    except (ValueError, AttributeError):
        err = {}
    raise ServeError(response.status_code, err.get("message", response.text[:200]), err.get("param"))


def _events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


class Client:
    """Blocking client: one connection pool to one server."""

    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def wait_ready(self, timeout: float = 300.0, poll_s: float = 0.1) -> float:
        """Seconds until ``/readyz`` answered 200; ``TimeoutError`` past ``timeout``."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            try:
                response = self.http.get("/readyz")
                if response.status_code == 200:
                    return time.perf_counter() - start
                if response.json().get("status") == "failed":
                    raise ServeError(503, response.json().get("error", "the pipeline failed to load"))
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"the server was not ready within {timeout:g} s")

    def request(self, payload: dict[str, Any]) -> httpx.Response:
        return self.http.post(GENERATIONS, json=payload)

    def generate(self, prompt: str, **fields: Any) -> list[Any]:
        response = self.request(body(prompt, **fields))
        _raise_for(response)
        return decode(response.json())

    def stream(self, prompt: str, **fields: Any) -> Iterator[tuple[str, Any]]:
        """``("progress", {"step", "steps"})`` events, then ``("image", response)`` (or ``("error", ...)``)."""
        with self.http.stream("POST", GENERATIONS, json=body(prompt, stream=True, **fields)) as response:
            if response.status_code != 200:
                response.read()
                _raise_for(response)
            yield from _events(response.iter_lines())

    def models(self) -> dict[str, Any]:
        return self.http.get("/v1/models").json()

    def metrics(self) -> str:
        return self.http.get("/metrics").text


class AsyncClient:
    """The same over asyncio (``httpx.AsyncClient``), for many requests in flight at once."""

    def __init__(self, base_url: str, timeout: float = 600.0, max_connections: int = 256) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.http.aclose()

    async def request(self, payload: dict[str, Any]) -> httpx.Response:
        return await self.http.post(GENERATIONS, json=payload)

    async def generate(self, prompt: str, **fields: Any) -> list[Any]:
        response = await self.request(body(prompt, **fields))
        _raise_for(response)
        return decode(response.json())

    async def stream(self, prompt: str, **fields: Any) -> AsyncIterator[tuple[str, Any]]:
        async with self.http.stream("POST", GENERATIONS, json=body(prompt, stream=True, **fields)) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_for(response)
            lines = [line async for line in response.aiter_lines()]
        for event in _events(iter(lines + [""])):
            yield event
