"""Guards on request bodies while they arrive, for every route.

- A body that sends nothing for ``read_timeout`` seconds is dropped with 408 and the connection
  closed: a stalled upload no longer holds its connection (and its spooled parts) for ever.
- A multipart body is followed delimiter by delimiter as it streams: a part larger than
  ``part_limit`` is refused with 413 as soon as it passes the limit, naming its file, instead of
  being spooled whole before the sanitizer looks at it.
- A multipart body must end with its close delimiter (``--boundary--``). One that ends before it
  (cut by the client, or by a Content-Length shorter than what was sent) is refused with 400
  before the parser hands its parts to the app, so nothing of it is stored. The parser itself
  (python-multipart through Starlette) accepts such a body and silently drops the unfinished part.
- A client that hangs up mid-body is one line in the log, not an error with a traceback.

The refusals are raised from ``receive``, inside the app's read of the body, so whatever was
reading stops there (Starlette closes the parts it spooled), and are answered here.
"""

from __future__ import annotations

import asyncio
import logging
from html import escape

from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.photos.sanitize import display_name, format_megabytes

log = logging.getLogger(__name__)

# A part's own headers (Content-Disposition, Content-Type) on top of its content.
PART_HEADER_SLACK = 16 * 1024
# How much of a part's start is kept to read its filename from, should the part be refused.
PART_HEAD_BYTES = 2048


class BodyRefused(Exception):
    """The body was refused while it arrived; answered with ``status_code`` and ``detail``."""

    status_code = 400

    def __init__(self, detail: str, files: list[tuple[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.files = files or []


class BodyTimedOut(BodyRefused):
    status_code = 408


class BodyIncomplete(BodyRefused):
    status_code = 400


class PartTooLarge(BodyRefused):
    status_code = 413


class MultipartWatch:
    """Follows the delimiters of a multipart body chunk by chunk: each part's size and its end.

    The boundary cannot occur inside a part (that is what it is chosen for), so "CRLF--boundary"
    marks the end of one part and, followed by "--", the end of the body. The body's first
    delimiter has no CRLF before it; the watch starts as if one had been sent.
    """

    def __init__(self, boundary: bytes, part_limit: int, photo_limit: int) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.part_limit = part_limit
        self.photo_limit = photo_limit
        self.pending = b"\r\n"  # bytes not yet searched through to the end
        self.offset = -2  # the body offset of pending[0]
        self.part_start = 0  # the body offset where the current part (its headers) begins
        self.part_head = b""  # the current part's first bytes, for its filename
        self.closed = False

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body; raises :class:`PartTooLarge`."""
        if self.closed or not chunk:
            return
        data = self.pending + chunk
        base = self.offset
        searched = 0
        while True:
            found = data.find(self.delimiter, searched)
            after = found + len(self.delimiter)
            if found < 0 or after + 2 > len(data):
                break  # no delimiter, or one whose next two bytes (end or not) have not arrived
            self._keep_head(data, base, found)
            self._check_size(base + found)
            if data[after : after + 2] == b"--":
                self.closed = True
                return
            self.part_start, self.part_head = base + after, b""
            searched = after
        keep = found if found >= 0 else max(searched, len(data) - len(self.delimiter) - 1)
        self._keep_head(data, base, keep)
        self._check_size(base + keep)
        self.pending, self.offset = data[keep:], base + keep

    def finish(self) -> None:
        """The body has ended; raises :class:`BodyIncomplete` when its close delimiter never came."""
        if not self.closed:
            raise BodyIncomplete(
                "The upload did not arrive whole (it ends before its last part does), so nothing was "
                "stored. Please send it again."
            )

    def _keep_head(self, data: bytes, base: int, end: int) -> None:
        if len(self.part_head) < PART_HEAD_BYTES:
            start = self.part_start + len(self.part_head) - base
            self.part_head += data[max(0, start) : min(end, start + PART_HEAD_BYTES - len(self.part_head))]

    def _check_size(self, position: int) -> None:
        if position - self.part_start > self.part_limit:
            name = self._filename()
            reason = f"over the {format_megabytes(self.photo_limit)} limit for one photo"
            raise PartTooLarge(
                f"{name}: {reason}. Nothing was stored; choose a smaller photo." if name else
                f"A part of the form is over the {format_megabytes(self.photo_limit)} limit. Nothing was stored.",
                [(name, reason)] if name else [],
            )

    def _filename(self) -> str | None:
        headers, _, _ = self.part_head.partition(b"\r\n\r\n")
        for line in headers.split(b"\r\n"):
            field, _, value = line.partition(b":")
            if field.strip().lower() == b"content-disposition":
                _disposition, options = parse_options_header(value.strip())
                filename = options.get(b"filename")
                if filename is not None:
                    return display_name(filename.decode("utf-8", "replace"))
        return None


def multipart_boundary(scope: Scope) -> bytes | None:
    """The boundary of a multipart/form-data request, or None for any other body."""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            content_type, options = parse_options_header(value)
            if content_type == b"multipart/form-data":
                boundary = options.get(b"boundary")
                return boundary or None
    return None


def _wants_json(scope: Scope) -> bool:
    if scope["path"].startswith("/api/"):
        return True
    accept = next((value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"accept"), "")
    return "application/json" in accept and "text/html" not in accept


def refusal_response(scope: Scope, refusal: BodyRefused) -> Response:
    # The rest of the body is never read, so the connection cannot carry another request.
    headers = {"Connection": "close"}
    if _wants_json(scope):
        content: dict[str, object] = {"detail": refusal.detail}
        if refusal.files:
            content["files"] = [{"name": name, "reason": reason} for name, reason in refusal.files]
        return JSONResponse(content, status_code=refusal.status_code, headers=headers)
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Upload not received</title></head>"
        f"<body><h1>Upload not received</h1><p>{escape(refusal.detail)}</p>"
        '<p><a href="/studios/new">Back to the form</a></p></body></html>'
    )
    return HTMLResponse(body, status_code=refusal.status_code, headers=headers)


class BodyGuardMiddleware:
    """See the module docstring. ``photo_limit`` is the largest photo (settings.max_photo_bytes)."""

    def __init__(self, app: ASGIApp, read_timeout: float, photo_limit: int) -> None:
        self.app = app
        self.read_timeout = read_timeout
        self.photo_limit = photo_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        boundary = multipart_boundary(scope)
        watch = MultipartWatch(boundary, self.photo_limit + PART_HEADER_SLACK, self.photo_limit) if boundary else None
        body_ended = False
        received = 0
        response_started = False

        async def guarded_receive() -> Message:
            nonlocal body_ended, received
            if body_ended:
                return await receive()  # e.g. a streaming response listening for a disconnect
            try:
                async with asyncio.timeout(self.read_timeout):
                    message = await receive()
            except TimeoutError:
                raise BodyTimedOut(
                    f"The upload stalled: nothing arrived for {self.read_timeout:g} seconds, so it was "
                    "dropped and nothing was stored. Please send it again."
                ) from None
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if watch is not None:
                    watch.feed(chunk)
                if not message.get("more_body", False):
                    body_ended = True
                    if watch is not None:
                        watch.finish()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except BodyRefused as refusal:
            log.info("%s %s refused after %d bytes of its body: %s", scope["method"], scope["path"], received,
                     refusal.detail)
            if not response_started:
                await refusal_response(scope, refusal)(scope, receive, send)
        except ClientDisconnect:
            log.info("%s %s: the client hung up after %d bytes of its body; nothing was stored",
                     scope["method"], scope["path"], received)
