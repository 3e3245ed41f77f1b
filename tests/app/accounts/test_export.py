"""Export my data: a cpu task builds a ZIP of the account, offered through a link that expires."""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.accounts import export
from app.models import DataExport, GeneratedImage, User, utcnow
from app.storage import Storage
from app.storage.base import image_key
from tests.mailbox import Mailbox, link_in
from tests.worker.factories import make_job, make_subject
from worker import settings as worker_settings_module
from worker.tasks.accounts import export_task

MakeUser = Callable[..., User]
Headers = Callable[[User], dict[str, str]]


def test_an_export_holds_the_account_its_studios_photos_and_pictures_until_its_link_expires(
        client: TestClient, db: Session, app_storage: Storage, make_user: MakeUser, api_headers: Headers,
        mailbox: Mailbox) -> None:
    user, stranger = make_user("ann@example.com"), make_user("bob@example.com")
    owner = db.get(User, user.id)
    assert owner is not None
    subject = make_subject(db, app_storage, owner, photos=2, name="Rex the dog")
    job = make_job(db, subject, status="done")
    image_id = uuid.uuid4()
    app_storage.put_bytes(image_key(user.id, subject.id, image_id), b"png bytes")
    db.add(GeneratedImage(id=image_id, subject_id=subject.id, job_id=job.id,
                          storage_key=image_key(user.id, subject.id, image_id), prompt="Rex on the beach",
                          prompt_template="p", seed=7, steps=1, guidance=1.0, width=8, height=8))
    db.commit()
    headers = api_headers(user)

    asked = client.post("/api/v1/me/exports", headers=headers)
    assert asked.status_code == 202 and asked.json()["status"] == "building"
    assert client.post("/api/v1/me/exports", headers=headers).status_code == 409  # one at a time
    export_id = asked.json()["id"]
    assert [kwargs for name, kwargs in mailbox.sent if name == "accounts.export"] == [{"export_id": export_id}]
    worker_settings_module.get_worker_settings.cache_clear()
    assert export_task(export_id) == "ready"

    ready = client.get(f"/api/v1/me/exports/{export_id}", headers=headers).json()
    assert ready["status"] == "ready" and ready["download_url"] == f"/api/v1/me/exports/{export_id}/download"
    download = client.get(ready["download_url"], headers=headers)
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(download.content))
    account = json.loads(archive.read("account.json"))
    [studio] = account["studios"]
    assert account["email"] == "ann@example.com" and studio["name"] == "Rex the dog"
    assert [picture["prompt"] for picture in studio["pictures"]] == ["Rex on the beach"]
    assert archive.read(studio["pictures"][0]["file"]) == b"png bytes"
    assert len(studio["photos"]) == 2 and all(archive.read(photo["file"]) for photo in studio["photos"])
    # Nobody else reaches it; the email's link is the account page's download.
    assert client.get(ready["download_url"], headers=api_headers(stranger)).status_code == 404
    [message] = mailbox.wait_for(1)
    assert message["To"] == "ann@example.com" and link_in(message, "/account/exports/").endswith(export_id)

    # Once expired, the link answers 404 and the retention pass removes the ZIP and the row.
    stored = db.get(DataExport, uuid.UUID(export_id))
    assert stored is not None and stored.storage_key is not None and app_storage.exists(stored.storage_key)
    assert export.remove_expired(db, app_storage, now=utcnow() + timedelta(hours=25)) == 1
    db.commit()
    assert not app_storage.exists(stored.storage_key) and db.get(DataExport, stored.id) is None
    assert client.get(ready["download_url"], headers=headers).status_code == 404


def test_an_export_of_an_account_deleted_meanwhile_leaves_nothing(client: TestClient, db: Session,
                                                                  app_storage: Storage, make_user: MakeUser,
                                                                  api_headers: Headers, mailbox: Mailbox) -> None:
    from tests.app.conftest import PASSWORD

    user = make_user("carl@example.com")
    headers = api_headers(user)
    export_id = client.post("/api/v1/me/exports", headers=headers).json()["id"]
    assert client.post("/api/v1/me/delete", headers=headers, json={"password": PASSWORD}).status_code == 204
    worker_settings_module.get_worker_settings.cache_clear()
    assert export_task(export_id) == "gone"
    assert app_storage.list(f"users/{user.id}/") == []
