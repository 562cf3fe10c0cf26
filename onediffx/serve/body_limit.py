"""A request body limit, counted as the body arrives (``serve.max_body_bytes``).

FastAPI reads a request's whole body before validation sees any field, so without a limit four
200 MB bodies take 1.6 GB before the prompt-length check runs. This ASGI middleware refuses a body
whose ``Content-Length`` is over the limit before reading any of it, and a chunked body as soon as
the bytes received pass the limit. It raises FastAPI's ``HTTPException`` from ``receive``: FastAPI
lets that through its body parsing (other errors become a 400), and the app's handler answers it
in the API's error shape and counts it, as every other refusal. Starlette 1.x ships a
``RequestBodyLimitMiddleware`` too; its plain-text reply is not the API's error shape, and the
oldest FastAPI the ``serve`` extra allows has none.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from fastapi import HTTPException

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def content_length(scope: dict[str, Any]) -> Optional[int]:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses such a request before it gets here
    return None


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` end in 413 (and the connection closes)."""

    def __init__(self, app: App, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> HTTPException:
        # Connection: close, so uvicorn stops taking the rest of the body instead of discarding it.
        return HTTPException(413, f"the request body is {size}; at most serve.max_body_bytes={self.max_bytes} bytes "
                                  "are accepted", headers={"Connection": "close"})

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise self._too_large(f"{declared} bytes (Content-Length)")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"more than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)
