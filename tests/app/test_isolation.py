"""Two accounts: every route that takes an object id answers 404 to the account that does not own it.

The routes come from the app itself: a new route with an id in its path and no case below fails
``test_every_object_route_has_a_case`` until someone decides how to test its isolation. Each case
is requested by the stranger (pages with the session cookie and a valid CSRF token, the API with a
bearer token) and must answer 404 — not 403, which would confirm the id exists — and must leave the
owner's data exactly as it was. The owner's GET requests must succeed, so a route that answers 404
to everybody cannot pass for an isolated one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app import queue
from app.accounts.export import export_key
from app.galleries import sharing
from app.models import ApiToken, DataExport, GeneratedImage, Job, PriorBank, ShareLink, Subject, User, utcnow
from app.storage import Storage
from app.storage.base import preview_key
from tests.app.factories import make_image, make_job, make_photo, make_subject, png_bytes


@dataclass(frozen=True)
class Case:
    """How to call one route: JSON for the API, a form for pages (the CSRF token is added)."""

    json: dict[str, Any] | None = None
    form: dict[str, str] = field(default_factory=dict)


# (method, path as the app declares it) → how to call it. Every route with "{" in its path is here.
CASES: dict[tuple[str, str], Case] = {
    # accounts (W1): API tokens belong to an account too
    ("DELETE", "/api/v1/tokens/{token_id}"): Case(),
    ("POST", "/account/tokens/{token_id}/revoke"): Case(form={}),
    # "export my data" (accounts): an export is its account's
    ("GET", "/api/v1/me/exports/{export_id}"): Case(),
    ("GET", "/api/v1/me/exports/{export_id}/download"): Case(),
    ("GET", "/account/exports/{export_id:uuid}"): Case(),
    # subjects and their photos (W2)
    ("GET", "/api/v1/subjects/{subject_id:uuid}"): Case(),
    ("GET", "/api/v1/subjects/{subject_id:uuid}/photos/{photo_id:uuid}"): Case(),
    ("GET", "/studios/{subject_id:uuid}/photos/{photo_id:uuid}"): Case(),
    ("POST", "/api/v1/subjects/{subject_id:uuid}/renew"): Case(),
    ("POST", "/studios/{subject_id:uuid}/renew"): Case(form={}),
    ("POST", "/api/v1/subjects/{subject_id:uuid}/retry"): Case(),
    ("POST", "/studios/{subject_id:uuid}/retry"): Case(form={}),
    # jobs (W3)
    ("GET", "/api/v1/jobs/{job_id:uuid}"): Case(),
    ("GET", "/api/v1/subjects/{subject_id:uuid}/jobs"): Case(),
    ("POST", "/api/v1/jobs/{job_id:uuid}/cancel"): Case(),
    ("GET", "/api/v1/jobs/{job_id:uuid}/previews/{index:int}"): Case(),
    ("GET", "/studios/{subject_id:uuid}"): Case(),
    ("POST", "/studios/{subject_id:uuid}/jobs/{job_id:uuid}/cancel"): Case(form={}),
    # galleries (W3)
    ("GET", "/api/v1/subjects/{subject_id:uuid}/images"): Case(),
    ("GET", "/api/v1/images/{image_id:uuid}"): Case(),
    ("GET", "/api/v1/images/{image_id:uuid}/file"): Case(),
    ("PATCH", "/api/v1/images/{image_id:uuid}"): Case(json={"favourite": True}),
    ("POST", "/api/v1/subjects/{subject_id:uuid}/generate"): Case(json={"prompts": ["in the snow"]}),
    ("GET", "/api/v1/subjects/{subject_id:uuid}/download.zip"): Case(),
    ("GET", "/api/v1/subjects/{subject_id:uuid}/model"): Case(),
    ("GET", "/api/v1/subjects/{subject_id:uuid}/model/{variant}"): Case(),
    ("DELETE", "/api/v1/subjects/{subject_id:uuid}"): Case(),
    ("GET", "/studios/{subject_id:uuid}/gallery"): Case(),
    ("GET", "/studios/{subject_id:uuid}/images/{image_id:uuid}"): Case(),
    ("GET", "/studios/{subject_id:uuid}/images/{image_id:uuid}/file"): Case(),
    ("GET", "/studios/{subject_id:uuid}/images/{image_id:uuid}/download"): Case(),
    ("POST", "/studios/{subject_id:uuid}/images/{image_id:uuid}/favourite"): Case(form={"favourite": "true"}),
    ("POST", "/studios/{subject_id:uuid}/generate"): Case(form={"prompts": "in the snow", "images_per_prompt": "1"}),
    ("GET", "/studios/{subject_id:uuid}/download.zip"): Case(),
    ("GET", "/studios/{subject_id:uuid}/model/{variant}"): Case(),
    ("GET", "/studios/{subject_id:uuid}/delete"): Case(),
    ("POST", "/studios/{subject_id:uuid}/delete"): Case(form={}),
    # renaming, one picture's deletion, "more like this" (issue 15)
    ("PATCH", "/api/v1/subjects/{subject_id:uuid}"): Case(json={"name": "Stolen"}),
    ("POST", "/studios/{subject_id:uuid}/rename"): Case(form={"name": "Stolen"}),
    ("DELETE", "/api/v1/images/{image_id:uuid}"): Case(),
    ("POST", "/api/v1/images/{image_id:uuid}/more"): Case(),
    ("POST", "/studios/{subject_id:uuid}/images/{image_id:uuid}/delete"): Case(form={}),
    ("POST", "/studios/{subject_id:uuid}/images/{image_id:uuid}/more"): Case(form={}),
    # share links (issue 15)
    ("POST", "/api/v1/subjects/{subject_id:uuid}/shares"): Case(json={}),
    ("GET", "/api/v1/subjects/{subject_id:uuid}/shares"): Case(),
    ("DELETE", "/api/v1/shares/{share_id:uuid}"): Case(),
    ("POST", "/studios/{subject_id:uuid}/shares"): Case(form={"days": "7"}),
    ("POST", "/studios/{subject_id:uuid}/shares/{share_id:uuid}/revoke"): Case(form={}),
    ("GET", "/s/{token}"): Case(),
    ("GET", "/s/{token}/images/{image_id:uuid}/file"): Case(),
    # the operator console: a non-operator finds nothing, whoever owns the object
    ("POST", "/operator/jobs/{job_id:uuid}/cancel"): Case(form={}),
    ("POST", "/operator/studios/{subject_id:uuid}/retry"): Case(form={}),
    ("POST", "/operator/accounts/{user_id:uuid}/disable"): Case(form={}),
    ("POST", "/operator/accounts/{user_id:uuid}/enable"): Case(form={}),
    ("POST", "/operator/accounts/{user_id:uuid}/quotas"): Case(form={"studios_per_month": "0"}),
    ("POST", "/operator/priors/{bank_id:uuid}/clear"): Case(form={}),
    ("PATCH", "/api/v1/operator/accounts/{user_id:uuid}"): Case(json={"is_active": False}),
    ("POST", "/api/v1/operator/jobs/{job_id:uuid}/cancel"): Case(),
    ("POST", "/api/v1/operator/subjects/{subject_id:uuid}/retry"): Case(),
}
# What a share link shows is public by design: whoever has the link (its signed token) sees it, with or
# without an account. tests/app/galleries/test_sharing.py checks that a link shows nothing else, and
# nothing once revoked or expired; here only the owner's control request runs.
PUBLIC_BY_LINK = {("GET", "/s/{token}"), ("GET", "/s/{token}/images/{image_id:uuid}/file")}
# Console routes without an id: every one answers 404 to an account that is not an operator.
CONSOLE_PREFIXES = ("/operator", "/api/v1/operator")
# The owner may get a redirect (307 to a signed URL) or a 200; anything but 404 proves the route works.
OWNER_OK = {200, 307}


def object_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) of the app whose path carries an id."""
    found = set()
    for route in iter_route_contexts(app.routes):
        path = route.path
        if not path or "{" not in path:
            continue
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, path))
    return sorted(found)


def fill(path: str, ids: dict[str, str]) -> str:
    """The path with its placeholders ("{subject_id:uuid}") replaced by the owner's ids."""
    for name, value in ids.items():
        path = path.replace(f"{{{name}:uuid}}", value).replace(f"{{{name}:int}}", value).replace(f"{{{name}}}", value)
    assert "{" not in path, f"no id for a placeholder of {path}"
    return path


@dataclass
class Owned:
    owner: User
    ids: dict[str, str]
    owner_headers: dict[str, str]


@pytest.fixture
def sent_tasks() -> Iterator[list[str]]:
    sent: list[str] = []
    queue.set_sender(lambda name, kwargs, queue_name: sent.append(name))
    yield sent
    queue.set_sender(None)


@pytest.fixture
def owned(app: FastAPI, clean_db: Engine, make_user: Callable[..., User],
          api_headers: Callable[[User], dict[str, str]]) -> Owned:
    """The owner's account with one of every object: a trained studio, a photo, a running job with a
    preview, a generated image, an API token, a data export."""
    owner = make_user("owner@example.com")
    owner_headers = api_headers(owner)
    storage: Storage = app.state.storage
    with sessionmaker(bind=clean_db, expire_on_commit=False)() as session:
        subject = make_subject(session, owner, weights_key="users/weights/lora.safetensors")
        photo = make_photo(session, storage, subject)
        job = make_job(session, subject, status="running", stage="training", step=3, total=10)
        key = preview_key(owner.id, subject.id, job.id, "step-3.png")
        storage.put_bytes(key, png_bytes(1), "image/png")
        job.preview_keys = [key]
        image = make_image(session, storage, subject, job)
        token = session.scalars(select(ApiToken).where(ApiToken.user_id == owner.id)).one()
        share = sharing.create_share(session, subject, None, 7)
        export = DataExport(id=uuid.uuid4(), user_id=owner.id, status="ready", expires_at=utcnow() + timedelta(hours=1))
        export.storage_key = export_key(owner.id, export.id)
        storage.put_bytes(export.storage_key, b"zip", "application/zip")
        session.add(export)
        bank = PriorBank(key="isolation", model_fingerprint="f" * 64, class_prompt="a photo of a dog", resolution=64,
                         sampler="ddim", steps=4, guidance=7.5, image_count=0, storage_prefix="priors/isolation/")
        session.add(bank)
        session.commit()
        ids = {
            "subject_id": str(subject.id),
            "photo_id": str(photo.id),
            "job_id": str(job.id),
            "image_id": str(image.id),
            "token_id": str(token.id),
            "export_id": str(export.id),
            "index": "0",
            "variant": "zip",
            "share_id": str(share.id),
            "token": sharing.share_token(app.state.settings, share),
            "user_id": str(owner.id),
            "bank_id": str(bank.id),
        }
    return Owned(owner=owner, ids=ids, owner_headers=owner_headers)


def snapshot(engine: Engine, storage: Storage, owned: Owned) -> dict[str, Any]:
    """What the stranger must not be able to change."""
    with Session(engine) as session:
        subject_id, job_id = uuid.UUID(owned.ids["subject_id"]), uuid.UUID(owned.ids["job_id"])
        job = session.get(Job, job_id)
        image = session.get(GeneratedImage, uuid.UUID(owned.ids["image_id"]))
        token = session.get(ApiToken, uuid.UUID(owned.ids["token_id"]))
        return {
            "subject": session.get(Subject, subject_id) is not None,
            "name": subject.name if (subject := session.get(Subject, subject_id)) else None,
            "image": image is not None,
            "expires_at": subject.expires_at if (subject := session.get(Subject, subject_id)) else None,
            "job": (job.status, job.cancel_requested) if job else None,
            "jobs": session.scalar(select(func.count()).select_from(Job)),
            "favourite": image.favourite if image else None,
            "token_revoked": token.revoked_at is not None if token else None,
            "owner": (owner.is_active, owner.studios_per_month)
            if (owner := session.get(User, owned.owner.id)) else None,
            "banks": session.scalar(select(func.count()).select_from(PriorBank)),
            "files": len(storage.list(f"users/{owned.owner.id}/")),
            "shares": sorted((str(link.id), link.revoked_at is None) for link in session.scalars(select(ShareLink))),
        }


def test_every_object_route_has_a_case(app: FastAPI) -> None:
    missing = [f"{method} {path}" for method, path in object_routes(app) if (method, path) not in CASES]
    assert not missing, f"object routes without an isolation case in tests/app/test_isolation.py: {missing}"
    stale = [f"{method} {path}" for method, path in CASES if (method, path) not in object_routes(app)]
    assert not stale, f"cases for routes the app no longer has: {stale}"


def test_another_account_gets_404_on_every_object_route(
    app: FastAPI, client: TestClient, clean_db: Engine, owned: Owned, make_user: Callable[..., User],
    login: Callable[..., TestClient], csrf_token: Callable[[TestClient], str],
    api_headers: Callable[[User], dict[str, str]], sent_tasks: list[str],
) -> None:
    storage: Storage = app.state.storage
    stranger = make_user("stranger@example.com")
    stranger_headers = api_headers(stranger)
    login(client, stranger)
    token = csrf_token(client)
    before = snapshot(clean_db, storage, owned)
    assert before["files"] == 4  # photo, preview, image, export

    answers = {}
    for method, path in object_routes(app):
        if (method, path) in PUBLIC_BY_LINK:
            continue
        case = CASES[(method, path)]
        url = fill(path, owned.ids)
        if path.startswith("/api/"):
            response = client.request(method, url, json=case.json, headers=stranger_headers)
        elif method == "GET":
            response = client.get(url, follow_redirects=False)
        else:
            response = client.request(method, url, data={**case.form, "csrf_token": token}, follow_redirects=False)
        answers[f"{method} {path}"] = response.status_code

    leaks = {route: code for route, code in answers.items() if code != 404}
    assert not leaks, f"routes that did not answer 404 to another account: {leaks}"
    assert snapshot(clean_db, storage, owned) == before
    assert sent_tasks == []


def console_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) of the operator console, pages and API."""
    found = set()
    for route in iter_route_contexts(app.routes):
        if route.path and route.path.startswith(CONSOLE_PREFIXES):
            found.update((method, route.path) for method in route.methods or () if method != "HEAD")
    return sorted(found)


def test_a_non_operator_gets_404_on_every_console_route(
    app: FastAPI, client: TestClient, owned: Owned, login: Callable[..., TestClient],
    csrf_token: Callable[[TestClient], str], clean_db: Engine,
) -> None:
    """Pages with the session cookie and the API with a bearer token, of an account that is not an operator
    (it owns objects, so ownership alone opens nothing here); then the same GETs as an operator succeed."""
    routes = console_routes(app)
    assert len(routes) >= 15
    login(client, owned.owner)
    token = csrf_token(client)
    answers = {}
    for method, path in routes:
        url = fill(path, owned.ids)
        case = CASES.get((method, path), Case(form={}))
        if path.startswith("/api/"):
            response = client.request(method, url, json=case.json, headers=owned.owner_headers)
        elif method == "GET":
            response = client.get(url, follow_redirects=False)
        else:
            response = client.request(method, url, data={**case.form, "csrf_token": token}, follow_redirects=False)
        answers[f"{method} {path}"] = response.status_code
    leaks = {route: code for route, code in answers.items() if code != 404}
    assert not leaks, f"console routes that did not answer 404 to a non-operator: {leaks}"

    with Session(clean_db) as session:
        owner = session.get(User, owned.owner.id)
        assert owner is not None
        owner.is_operator = True
        session.commit()
    for method, path in routes:
        if method == "GET":
            headers = owned.owner_headers if path.startswith("/api/") else {}
            assert client.get(fill(path, owned.ids), headers=headers).status_code == 200, path


def test_the_owner_reaches_every_object_it_owns(
    app: FastAPI, client: TestClient, owned: Owned, login: Callable[..., TestClient]
) -> None:
    """The control: the same GET requests by the owner succeed, so the 404s above mean isolation."""
    login(client, owned.owner)
    answers = {}
    for method, path in object_routes(app):
        if method != "GET":
            continue
        url = fill(path, owned.ids)
        headers = owned.owner_headers if path.startswith("/api/") else {}
        answers[path] = client.get(url, headers=headers, follow_redirects=False).status_code
    failing = {path: code for path, code in answers.items() if code not in OWNER_OK}
    assert not failing, f"GET routes the owner could not use: {failing}"
