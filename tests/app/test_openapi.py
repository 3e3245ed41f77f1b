"""The published OpenAPI document tells the truth: schemathesis sends what it describes, and every
answer must be one the document names, in the shape it gives. Plus what it cannot see by itself."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from app import queue
from app.accounts import service as accounts_service
from app.models import User
from app.storage import Storage
from app.storage.base import preview_key
from tests.app.factories import make_image, make_job, make_photo, make_subject, png_bytes
from tests.app.serving import serving

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture
def no_broker() -> Iterator[None]:
    queue.set_sender(lambda name, kwargs, queue_name: None)
    yield
    queue.set_sender(None)


def seeded_ids(app: FastAPI, engine: Engine, owner: User) -> tuple[dict[str, str | int], dict[str, str]]:
    """One of every object of ``owner`` (a trained studio with a photo, a running job with a preview, a
    picture), so that requests reach past the 404; and a second studio and token to delete."""
    storage: Storage = app.state.storage
    with sessionmaker(bind=engine, expire_on_commit=False)() as session:
        subject = make_subject(session, owner, weights_key="users/weights/", identifier="qzx",
                               model_info={"weights_files": ["pytorch_lora_weights.safetensors"]})
        storage.put_bytes("users/weights/pytorch_lora_weights.safetensors", b"weights", "application/octet-stream")
        photo = make_photo(session, storage, subject)
        job = make_job(session, subject, status="running", stage="training", step=3, total=10)
        key = preview_key(owner.id, subject.id, job.id, "step-3.png")
        storage.put_bytes(key, png_bytes(1), "image/png")
        job.preview_keys = [key]
        image = make_image(session, storage, subject, job)
        doomed_subject = make_subject(session, owner, name="To delete")
        doomed_token = accounts_service.create_api_token(session, session.get_one(User, owner.id), "to revoke")
        session.commit()
        ids: dict[str, str | int] = {
            "path.subject_id": str(subject.id), "path.photo_id": str(photo.id), "path.job_id": str(job.id),
            "path.image_id": str(image.id), "path.index": 0,
        }
        doomed = {"subject_id": str(doomed_subject.id), "token_id": str(doomed_token.api_token.id)}
    return ids, doomed


def config_with_ids(path: Path, ids: dict[str, str | int], doomed: dict[str, str]) -> Path:
    """The checked-in configuration plus the seeded ids (deletions get objects of their own)."""
    parameters = [f'"{name}" = {json.dumps(value)}' for name, value in ids.items()]
    lines = [CONFIG.read_text(), "", "[parameters]", *parameters, "",
             "[[operations]]", 'include-name = "DELETE /api/v1/subjects/{subject_id}"',
             f'parameters = {{ "path.subject_id" = "{doomed["subject_id"]}" }}', "",
             "[[operations]]", 'include-name = "DELETE /api/v1/tokens/{token_id}"',
             f'parameters = {{ "path.token_id" = "{doomed["token_id"]}" }}', ""]
    path.write_text("\n".join(lines))
    return path


def test_schemathesis_finds_no_answer_the_document_does_not_describe(
    app: FastAPI, clean_db: Engine, make_user: Callable[..., User], api_headers: Callable[[User], dict[str, str]],
    tmp_path: Path, no_broker: None,
) -> None:
    """Every phase (examples, coverage, fuzzing, stateful) and every check, with a fixed seed."""
    owner = make_user()
    headers = api_headers(owner)
    config = config_with_ids(tmp_path / "schemathesis.toml", *seeded_ids(app, clean_db, owner))
    with serving(app) as url:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "--no-color", "run",
             f"{url}/api/v1/openapi.json", "-H", f"Authorization: {headers['Authorization']}"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,  # its cache goes there, not into the checkout
        )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-2000:]


def test_the_document_declares_authentication_and_limits(client: TestClient) -> None:
    document = client.get("/api/v1/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert schemes["session"]["in"] == "cookie"
    paths = document["paths"]
    assert paths["/api/v1/auth/signup"]["post"]["security"] == []
    assert paths["/api/v1/me"]["get"]["security"] == [{"bearer": []}, {"session": []}]
    assert set(paths["/api/v1/auth/signup"]["post"]["responses"]) >= {"201", "400", "403", "409", "413", "429", "503"}
    assert "Retry-After" in paths["/api/v1/auth/signup"]["post"]["responses"]["429"]["headers"]
    assert set(paths["/api/v1/subjects"]["post"]["responses"]) >= {"201", "400", "401", "403", "413", "415", "422",
                                                                   "429"}
    assert "404" in paths["/api/v1/subjects/{subject_id}"]["delete"]["responses"]
    assert "409" in paths["/api/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    schemas = document["components"]["schemas"]
    assert schemas["SignupIn"]["properties"]["password"]["minLength"] == 10
    photos = paths["/api/v1/subjects"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"][
        "properties"]["photos"]
    assert (photos["minItems"], photos["maxItems"]) == (3, 20)


@pytest.mark.parametrize(("path", "allowed"), [
    ("/api/v1/tokens", "GET, POST"),
    ("/api/v1/subjects", "GET, POST"),
    ("/api/v1/subjects/00000000-0000-0000-0000-000000000001", "DELETE, GET, PATCH"),
    ("/api/v1/images/00000000-0000-0000-0000-000000000001", "DELETE, GET, PATCH"),
])
def test_a_405_names_every_method_of_the_path(client: TestClient, path: str, allowed: str) -> None:
    response = client.options(path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
