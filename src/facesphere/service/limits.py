"""Request-body limit as ASGI middleware: refused from Content-Length up front, or counted while streaming."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 with a JSON error when a request body exceeds ``max_bytes`` (chunked uploads included)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send, int(declared) if declared.isdigit() else None)
            return
        seen, exceeded, started = 0, False, False

        async def counting_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return  # the app's answer to a body cut short (e.g. "error parsing the body") is replaced by 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            pass
        if exceeded and not started:
            await self._refuse(send, None)

    async def _refuse(self, send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else "the body"
        body = json.dumps({"error": f"request too large: {size} exceeds the limit of {self.max_bytes:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


__all__ = ["BodySizeLimit"]
