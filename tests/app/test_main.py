"""The app as a whole: the factory, security headers, trusted hosts, the body limit, error answers."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import DEFAULT_SECRET_KEY, Settings
from app.main import create_app, request_slots
from tests.app.conftest import page_context, page_template

ROOT = Path(__file__).resolve().parents[2]


def client_for(settings: Settings, base_url: str = "http://testserver") -> TestClient:
    return TestClient(create_app(settings), base_url=base_url)


@pytest.fixture
def small_limit_client(settings: Settings, clean_db: object) -> Iterator[TestClient]:
    limited = settings.model_copy(update={"max_request_bytes": 2000})
    with client_for(limited) as client:
        yield client


def test_web_app_does_not_import_torch() -> None:
    code = "import app.main, sys; app.main.create_app(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "STUDIO_VAR_DIR": str(ROOT / "var")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("environment", "started"), [("development", True), ("test", False)])
def test_start_up_freezes_objects_and_loads_the_face_model_outside_tests(
    tmp_path: Path, environment: str, started: bool
) -> None:
    """Full garbage collections walk only what requests made, not the whole app (a 40-75 ms pause
    each); the face model is loaded before the first person's upload, and still without torch."""
    code = (
        "import gc, sys; from fastapi.testclient import TestClient; from app.main import create_app\n"
        "from worker.engine.faces import face_model\n"
        "with TestClient(create_app()):\n"
        "    print(gc.get_freeze_count() > 10_000, face_model.cache_info().currsize == 1, 'torch' in sys.modules)"
    )
    env = {"PATH": "/usr/bin:/bin", "STUDIO_VAR_DIR": str(tmp_path), "STUDIO_ENVIRONMENT": environment}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(started), str(started), "False"]


def test_requests_hold_at_most_the_pool_and_half_of_all_connections() -> None:
    assert request_slots(10, 20) == 10  # the pool, so steady polling never opens overflow connections
    assert request_slots(10, 0) == 5  # half, so a request's second session always finds a connection
    assert request_slots(1, 0) == 1


def test_importing_main_creates_no_app() -> None:
    import app.main as main_module

    assert not hasattr(main_module, "app")


def test_production_settings_refuse_the_default_secret() -> None:
    with pytest.raises(ValidationError, match="STUDIO_SECRET_KEY"):
        Settings(environment="production", secret_key=DEFAULT_SECRET_KEY)
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(environment="production", secret_key="short")


def test_without_arguments_the_app_uses_the_process_settings(settings: Settings, clean_db: object) -> None:
    from app import db as db_module
    from app import storage as storage_module

    app = create_app()
    assert app.state.settings is settings
    assert app.state.sessionmaker is db_module.get_sessionmaker()  # one engine for the process
    assert app.state.storage is storage_module.get_storage()


def test_lifespan_creates_the_var_folders(settings: Settings, clean_db: object) -> None:
    with client_for(settings) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
    assert settings.resolved_media_dir.is_dir()
    assert settings.scratch_dir.is_dir()


def test_home_page_for_a_visitor_and_a_member(client: TestClient, make_user, login) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/")
    assert response.status_code == 200
    assert page_template(response) == "home.html"
    assert page_context(response)["user"] is None
    assert 'href="/signup"' in response.text

    user = make_user("home@example.com")
    login(client, user)
    response = client.get("/")
    assert page_context(response)["user"].id == user.id
    assert 'href="/studios"' in response.text


@pytest.mark.parametrize("path", ["/", "/api/v1/me", "/login", "/no-such-page", "/api/v1/no-such-route"])
def test_security_headers_on_every_answer(client: TestClient, path: str) -> None:
    response = client.get(path)
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["cache-control"] == "no-store"


def test_static_files_are_cacheable_and_versioned(client: TestClient) -> None:
    home = client.get("/")
    assert "/static/studio.css?v=" in home.text
    response = client.get("/static/studio.css")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert response.headers["cache-control"].startswith("public")
    assert response.headers["x-content-type-options"] == "nosniff"


def test_hsts_only_behind_tls(settings: Settings, clean_db: object) -> None:
    with client_for(settings) as client:
        assert "strict-transport-security" not in client.get("/").headers
    with client_for(settings.model_copy(update={"cookie_secure": True})) as client:
        assert client.get("/").headers["strict-transport-security"].startswith("max-age=")


def test_csp_allows_the_bucket_for_images_with_s3(settings: Settings) -> None:
    from app.main import content_security_policy

    s3 = settings.model_copy(update={"storage_backend": "s3", "s3_endpoint_url": "https://files.example.com/x/"})
    csp = content_security_policy(s3)
    assert "img-src 'self' data: blob: https://files.example.com;" in csp
    assert "files.example.com" not in content_security_policy(settings)


def test_csp_prefers_the_public_bucket_endpoint(settings: Settings) -> None:
    from types import SimpleNamespace

    from app.main import content_security_policy

    # s3_public_endpoint_url is optional: read only when the settings have it.
    values = {**settings.model_dump(), "storage_backend": "s3", "s3_endpoint_url": "http://minio:9000",
              "s3_public_endpoint_url": "http://localhost:9000"}
    csp = content_security_policy(SimpleNamespace(**values))  # type: ignore[arg-type]
    assert "img-src 'self' data: blob: http://localhost:9000;" in csp and "minio" not in csp


def test_trusted_host_refuses_other_hosts(settings: Settings, clean_db: object) -> None:
    strict = settings.model_copy(update={"allowed_hosts": ["studio.example.com"]})
    with client_for(strict) as client:
        assert client.get("/").status_code == 400
    with client_for(strict, base_url="http://studio.example.com") as client:
        assert client.get("/").status_code == 200


def test_body_over_the_declared_limit_is_413_json_for_the_api(small_limit_client: TestClient) -> None:
    response = small_limit_client.post("/api/v1/auth/signup", content=b"x" * 5000,
                                       headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_body_over_the_limit_is_413_html_for_pages(small_limit_client: TestClient) -> None:
    response = small_limit_client.post("/login", content=b"a=" + b"x" * 5000,
                                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("text/html")
    assert "too large" in response.text


def _chunks(total: int, size: int = 500) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/api/v1/auth/signup", "application/json"), ("/login", "application/x-www-form-urlencoded")],
)
def test_streamed_body_without_length_is_cut_at_the_limit(
    small_limit_client: TestClient, path: str, content_type: str
) -> None:
    # A generator body is sent chunked, with no Content-Length: only counting the stream catches it.
    response = small_limit_client.post(path, content=_chunks(10_000), headers={"content-type": content_type})
    assert response.status_code == 413


def test_body_under_the_limit_passes(small_limit_client: TestClient) -> None:
    response = small_limit_client.post(
        "/api/v1/auth/signup", json={"email": "small@example.com", "password": "long enough pass"}
    )
    assert response.status_code == 201


def test_api_errors_keep_the_detail_shape(client: TestClient) -> None:
    missing = client.get("/api/v1/no-such-route")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not Found"}
    invalid = client.post("/api/v1/auth/signup", json={"email": "a@example.com"})
    assert invalid.status_code == 422
    assert isinstance(invalid.json()["detail"], list)
    assert invalid.json()["detail"][0]["loc"][-1] == "password"


def test_page_errors_render_the_error_page(client: TestClient) -> None:
    response = client.get("/no-such-page")
    assert response.status_code == 404
    assert page_template(response) == "error.html"
    assert page_context(response)["title"] == "Page not found"
    assert page_context(response)["message"].startswith("We could not find that page.")


def test_private_pages_redirect_to_login_with_next(client: TestClient) -> None:
    response = client.get("/account?tab=tokens", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Faccount%3Ftab%3Dtokens"


def test_api_docs_allow_exactly_their_own_inline_script(client: TestClient) -> None:
    import base64
    import hashlib
    import re

    response = client.get("/api/v1/docs")
    assert response.status_code == 200
    script_src = next(
        part for part in response.headers["content-security-policy"].split("; ") if part.startswith("script-src")
    )
    assert "unsafe-inline" not in script_src
    inline = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in script_src
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    # Everything the page loads comes from this site: no CDN sees who reads the docs.
    assets = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert assets and all(url.startswith("/") and not url.startswith("//") for url in assets), assets
    assert "http" not in response.headers["content-security-policy"]
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url


def test_openapi_lists_the_accounts_api(client: TestClient) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert {"/api/v1/auth/signup", "/api/v1/auth/token", "/api/v1/me", "/api/v1/tokens"} <= set(paths)
    assert "/login" not in paths


@pytest.mark.parametrize(("path", "content_type"), [("/api/v1/test-crash", "application/json"),
                                                    ("/test-crash", "text/html")])
def test_a_500_carries_the_security_headers(settings: Settings, clean_db: object, path: str,
                                            content_type: str) -> None:
    app = create_app(settings.model_copy(update={"cookie_secure": True}))

    def crash() -> None:
        raise RuntimeError("a bug")

    app.add_api_route(path, crash)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get(path)
    assert response.status_code == 500
    assert response.headers["content-type"].startswith(content_type)
    assert "a bug" not in response.text
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["strict-transport-security"].startswith("max-age=")


def _http_exchange(connection: socket.socket, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open connection and its whole response (status, headers, body)."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers.items())]
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    length = int(answer.get("content-length", "0"))
    while len(body) < length:
        chunk = connection.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(status_line.split()[1]), answer, body


def test_a_database_outage_answers_503_with_retry_after_and_keeps_the_connection(
        settings: Settings, tmp_path: Path) -> None:
    import threading
    import time
    import uuid

    import uvicorn
    from sqlalchemy.orm import sessionmaker

    from app.accounts import service as accounts_service
    from app.db import make_engine
    from app.security import SESSION_COOKIE
    from tests.app.conftest import free_port
    from tests.conftest import run_migrations
    from tests.servers import PrivatePostgres

    database = PrivatePostgres()
    database.start()
    engine = None
    server = None
    thread = None
    try:
        url = database.create_database("studio")
        run_migrations(url)
        engine = make_engine(url)
        with sessionmaker(bind=engine, expire_on_commit=False)() as session:
            user = accounts_service.sign_up(session, "outage@example.com", "a long enough password 123")
            token = accounts_service.create_api_token(session, user, "script").token
            session.commit()
        app = create_app(settings.model_copy(update={"database_url": url}))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        api = (f"/api/v1/jobs/{uuid.uuid4()}", {"Authorization": f"Bearer {token}"})
        page = ("/studios", {"Cookie": f"{SESSION_COOKIE}=some-session", "Accept": "text/html"})

        with socket.create_connection(("127.0.0.1", server.config.port), timeout=30) as connection:
            assert _http_exchange(connection, *api)[0] == 404  # up: no such job
            database.stop()
            for path, headers in (api, page, api):
                status, answer, body = _http_exchange(connection, path, headers)
                assert status == 503, body
                assert answer["retry-after"] == "5" and answer.get("connection") != "close"
                assert b"try again in a few seconds" in body
            database.start()
            # Same connection throughout: the server never dropped it. And the pool recovers by itself.
            assert _http_exchange(connection, *api)[0] == 404
    finally:
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=10)
        if engine is not None:
            engine.dispose()
        database.remove()
