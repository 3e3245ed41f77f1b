"""Request bodies that did not arrive whole, or arrive too slowly or too large, store nothing (issue 11).

Through the real app (ASGI), and through a real uvicorn on loopback with raw sockets where what the
client does on the wire is the point (a Content-Length shorter than the body, a stalled upload, a
hang-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import sessionmaker

from app.body_guard import BodyIncomplete, MultipartWatch, PartTooLarge
from app.config import Settings
from app.main import create_app
from app.models import Photo, Subject, User
from app.storage import Storage
from tests.app import photo_factory
from tests.app.serving import serving

FIELDS = {"name": "Rex", "kind": "dog", "consent": "yes"}


def multipart(photos: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A studio creation body as httpx encodes it, and its Content-Type (with the boundary)."""
    request = httpx.Request(
        "POST", "http://testserver/api/v1/subjects", data=fields if fields is not None else FIELDS,
        files=[("photos", (name, data, "image/jpeg")) for name, data in photos],
    )
    return request.read(), request.headers["content-type"]


def stored(engine: Engine, storage: Storage) -> tuple[int, int, list[str]]:
    with sessionmaker(bind=engine)() as session:
        subjects = session.scalar(select(func.count()).select_from(Subject)) or 0
        photos = session.scalar(select(func.count()).select_from(Photo)) or 0
    return subjects, photos, storage.list("users/")


@pytest.fixture(scope="module")
def four_photos() -> list[tuple[str, bytes]]:
    return photo_factory.make_photos(4, start_seed=50)


@pytest.fixture
def owner_headers(make_user: Callable[..., User], api_headers: Callable[[User], dict[str, str]]) -> dict[str, str]:
    return api_headers(make_user("owner@example.com"))


# --- the multipart watch on its own ---------------------------------------------------------------


def feed_in_chunks(watch: MultipartWatch, body: bytes, size: int) -> None:
    for start in range(0, len(body), size):
        watch.feed(body[start : start + size])


@pytest.mark.parametrize("chunk", [1, 2, 7, 61, 4096, 1 << 20])
def test_a_whole_body_is_seen_to_end_whatever_its_chunks(chunk: int) -> None:
    body, content_type = multipart([("a.jpg", b"\xff\xd8" + b"\r\n--x" * 50), ("b.jpg", b"\r\n" * 100)])
    boundary = content_type.split("boundary=")[1].encode()
    watch = MultipartWatch(boundary, part_limit=10_000, photo_limit=10_000)
    feed_in_chunks(watch, body, chunk)
    watch.finish()
    assert watch.closed


def test_a_body_cut_anywhere_before_its_close_delimiter_is_incomplete() -> None:
    body, content_type = multipart([("a.jpg", b"\xff\xd8 pixels \xff\xd9")], fields={"name": "Rex"})
    boundary = content_type.split("boundary=")[1].encode()
    close = body.rindex(b"--" + boundary + b"--") + len(boundary) + 4
    for cut in range(close):
        watch = MultipartWatch(boundary, part_limit=10_000, photo_limit=10_000)
        watch.feed(body[:cut])
        with pytest.raises(BodyIncomplete):
            watch.finish()


@pytest.mark.parametrize("chunk", [1000, 65536])
def test_a_part_over_the_limit_is_refused_as_it_passes_the_limit(chunk: int) -> None:
    body, content_type = multipart([("small.jpg", b"x" * 1000), ("IMG_1.heic", b"y" * 200_000)])
    boundary = content_type.split("boundary=")[1].encode()
    watch = MultipartWatch(boundary, part_limit=50_000, photo_limit=48_000)
    fed = 0
    with pytest.raises(PartTooLarge) as caught:
        for start in range(0, len(body), chunk):
            fed += chunk
            watch.feed(body[start : start + chunk])
    assert fed < 50_000 + 2 * 1000 + 2 * chunk  # refused within a chunk of the limit, not at the end
    assert [name for name, _reason in caught.value.files] == ["IMG_1.heic"]
    assert caught.value.files[0][1].endswith("limit for one photo")


# --- through the app (ASGI) -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside the last photo", "inside the close delimiter"])
def test_a_truncated_multipart_body_stores_nothing(
    client: TestClient,
    owner_headers: dict[str, str],
    four_photos: list[tuple[str, bytes]],
    clean_db: Engine,
    app_storage: Storage,
    where: str,
) -> None:
    body, content_type = multipart(four_photos)
    # Cut inside the last photo, leaving three whole ones (enough for a studio) before it, or after
    # every part but before the final "--" that says the body ends here.
    cut = len(body) - len(four_photos[-1][1]) // 2 if where == "inside the last photo" else len(body) - 4
    response = client.post("/api/v1/subjects", content=body[:cut],
                           headers={**owner_headers, "Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert "did not arrive whole" in response.json()["detail"]
    assert stored(clean_db, app_storage) == (0, 0, [])


def asgi_scope(path: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(name.lower().encode(), value.encode())
                    for name, value in {"host": "testserver", **headers}.items()],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {},
    }


class Wire:
    """The client side of one ASGI request: chunks handed over on demand, then ``then`` (disconnect or stall)."""

    def __init__(self, chunks: list[bytes], then: str) -> None:
        self.chunks = chunks
        self.then = then
        self.handed = 0  # body bytes the app has pulled
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            chunk = self.chunks.pop(0)
            self.handed += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks) or self.then != "end"}
        if self.then == "disconnect":
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # a stalled client: nothing more, ever
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [message for message in self.sent if message["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    @property
    def response_headers(self) -> dict[str, str]:
        start = next(message for message in self.sent if message["type"] == "http.response.start")
        return {name.decode(): value.decode() for name, value in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent if message["type"] == "http.response.body")


def call(app: FastAPI, scope: dict[str, Any], wire: Wire, timeout: float = 30) -> None:
    async def run() -> None:
        await asyncio.wait_for(app(scope, wire.receive, wire.send), timeout)

    asyncio.run(run())


def chunked(body: bytes, size: int = 65536) -> list[bytes]:
    return [body[start : start + size] for start in range(0, len(body), size)]


def test_an_oversized_photo_is_refused_while_it_streams_naming_it(
    settings: Settings, clean_db: Engine, owner_headers: dict[str, str]
) -> None:
    app = create_app(settings.model_copy(update={"max_photo_bytes": 1024 * 1024}))
    huge = b"\xff\xd8" + b"\0" * 8_000_000
    body, content_type = multipart([("ok.jpg", photo_factory.make_photo(1)), ("huge.jpg", huge)])
    wire = Wire(chunked(body), then="end")
    call(app, asgi_scope("/api/v1/subjects", {**owner_headers, "content-type": content_type,
                                              "content-length": str(len(body))}), wire)
    assert wire.status == 413
    assert wire.handed < 1024 * 1024 + 200_000  # the 8 MB were never read, let alone spooled
    answer = httpx.Response(413, content=wire.body).json()
    assert answer["files"] == [{"name": "huge.jpg", "reason": "over the 1.0 MB limit for one photo"}]
    assert wire.response_headers["connection"] == "close"


def test_a_content_length_over_the_photos_limits_is_refused_before_reading(
    settings: Settings, clean_db: Engine, owner_headers: dict[str, str]
) -> None:
    # 3 photos of at most 1 MB: a body over 3 MB (+ 1 MB for the form) cannot be a valid upload.
    app = create_app(settings.model_copy(update={"max_photos": 3, "max_photo_bytes": 1024 * 1024}))
    wire = Wire([b"x" * 65536] * 80, then="end")
    call(app, asgi_scope("/api/v1/subjects", {**owner_headers, "content-type": "multipart/form-data; boundary=b",
                                              "content-length": str(80 * 65536)}), wire)
    assert wire.status == 413
    assert wire.handed == 0


def test_a_stalled_body_is_dropped_after_the_read_timeout(
    settings: Settings, clean_db: Engine, owner_headers: dict[str, str], four_photos: list[tuple[str, bytes]]
) -> None:
    app = create_app(settings.model_copy(update={"request_body_timeout_seconds": 0.5}))
    body, content_type = multipart(four_photos)
    wire = Wire([body[:1000]], then="stall")
    started = time.monotonic()
    call(app, asgi_scope("/api/v1/subjects", {**owner_headers, "content-type": content_type,
                                              "content-length": str(len(body))}), wire, timeout=30)
    assert wire.status == 408
    assert wire.response_headers["connection"] == "close"
    assert time.monotonic() - started < 20


def test_a_client_that_hangs_up_mid_upload_is_one_log_line(
    settings: Settings, clean_db: Engine, owner_headers: dict[str, str], four_photos: list[tuple[str, bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(settings)
    body, content_type = multipart(four_photos)
    wire = Wire([body[:5000]], then="disconnect")
    with caplog.at_level(logging.INFO):
        call(app, asgi_scope("/api/v1/subjects", {**owner_headers, "content-type": content_type,
                                                  "content-length": str(len(body))}), wire)
    assert wire.status is None  # nobody to answer
    hang_ups = [record for record in caplog.records if "hung up" in record.getMessage()]
    assert len(hang_ups) == 1, [record.getMessage() for record in caplog.records]
    assert hang_ups[0].levelno == logging.INFO and hang_ups[0].exc_info is None
    assert "POST /api/v1/subjects" in hang_ups[0].getMessage()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


# --- through a real server ------------------------------------------------------------------------


@contextmanager
def served_port(app: FastAPI) -> Iterator[int]:
    """``app`` under uvicorn on loopback; its log records reach pytest's caplog (no log config of its own)."""
    with serving(app, log_config=None, log_level="info") as url:
        yield int(url.rsplit(":", 1)[1])


def raw_post(port: int, path: str, headers: dict[str, str], content_length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {content_length}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 30 s pass)."""
    connection.settimeout(30)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
        if b"\r\n\r\n" in received and b"connection: close" not in received.lower():
            break
    return received


def test_a_content_length_shorter_than_the_body_stores_nothing(
    app: FastAPI, owner_headers: dict[str, str], four_photos: list[tuple[str, bytes]], clean_db: Engine,
    app_storage: Storage,
) -> None:
    body, content_type = multipart(four_photos)
    short = len(body) - 6  # the server reads the body up to just before the final "--\r\n" (and 2 more)
    with served_port(app) as port, socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(raw_post(port, "/api/v1/subjects", {**owner_headers, "Content-Type": content_type},
                                    short) + body[:short])
        answer = read_response(connection)  # the server's answer to the body it was told about
        with contextlib.suppress(OSError):  # the server may have closed the connection already
            connection.sendall(body[short:])  # the rest, which the server takes for a next request
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert stored(clean_db, app_storage) == (0, 0, [])


def test_a_stalled_upload_is_dropped_by_the_server(
    settings: Settings, clean_db: Engine, owner_headers: dict[str, str], four_photos: list[tuple[str, bytes]]
) -> None:
    app = create_app(settings.model_copy(update={"request_body_timeout_seconds": 1.0}))
    body, content_type = multipart(four_photos)
    with served_port(app) as port, socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(raw_post(port, "/api/v1/subjects", {**owner_headers, "Content-Type": content_type},
                                    len(body)) + body[:2000])
        started = time.monotonic()
        answer = read_response(connection)
        assert connection.recv(1) == b"", "the connection is still open"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 20


def test_a_hang_up_mid_upload_logs_no_traceback(
    app: FastAPI, owner_headers: dict[str, str], four_photos: list[tuple[str, bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    body, content_type = multipart(four_photos)
    with caplog.at_level(logging.INFO), served_port(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(raw_post(port, "/api/v1/subjects", {**owner_headers, "Content-Type": content_type},
                                        len(body)) + body[:3000])
        deadline = time.monotonic() + 20
        while not any("hung up" in record.getMessage() or record.levelno >= logging.ERROR
                      for record in caplog.records):
            assert time.monotonic() < deadline, "the server never noticed the hang-up"
            time.sleep(0.05)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert not errors, [record.getMessage() for record in errors]
    assert len([record for record in caplog.records if "hung up" in record.getMessage()]) == 1


def test_the_page_gets_a_page_when_its_upload_is_cut(
    client: TestClient, make_user: Callable[..., User], login: Callable[..., TestClient],
    csrf_token: Callable[[TestClient], str], four_photos: list[tuple[str, bytes]], clean_db: Engine,
    app_storage: Storage,
) -> None:
    signed_in = login(client, make_user("page@example.com"))
    body, content_type = multipart(four_photos, fields={**FIELDS, "csrf_token": csrf_token(signed_in)})
    response = signed_in.post("/studios", content=body[: len(body) - 3000], headers={"Content-Type": content_type},
                              follow_redirects=False)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "did not arrive whole" in response.text and "/studios/new" in response.text
    assert stored(clean_db, app_storage) == (0, 0, [])
