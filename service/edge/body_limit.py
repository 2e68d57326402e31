"""Refuses request bodies over the size limit before they are read into memory.

A declared Content-Length over the limit is answered 413 at once, without reading a byte.
A body that streams (chunked) or lies about its length is counted as it arrives; once
past the limit, reading stops and the client gets 413, whatever the endpoint made of the
truncated body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.edge.body_deadline import body_headers
from service.errors import BodyTooLarge, response_for


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _error(self, received: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"the request body is {received}; this server accepts at most {self.max_body_bytes} "
            "bytes (VAE_MAX_BODY_BYTES). Send fewer or smaller images per request"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = body_headers(scope)[0]
        if declared is not None and declared > self.max_body_bytes:
            response = response_for(self._error(f"{declared} bytes (Content-Length)"), scope.get("path"))
            await response(scope, receive, send)
            return

        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise self._error(f"over {self.max_body_bytes} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                return  # the app answered its own error about the cut-off body; ours replaces it
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not exceeded:
                raise
        if exceeded and not response_started:
            response = response_for(self._error(f"over {self.max_body_bytes} bytes"), scope.get("path"))
            await response(scope, receive, send)
