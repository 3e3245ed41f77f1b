"""The trained model as downloads: the JSON description, each file, the ZIP, and the gallery's card."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.galleries.model_export import trained_model
from app.models import Subject, User
from app.storage import Storage
from app.storage.base import weights_prefix
from tests.app.factories import make_subject

Headers = Callable[[User], dict[str, str]]

LORA_FILES = {
    "pytorch_lora_weights.safetensors": b"diffusers-lora-bytes",
    "lora_kohya.safetensors": b"kohya-lora-bytes",
    "run.json": b'{"identifier": "qzx"}',
}
FULL_FILES = {
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": b"unet-bytes",
    "run.json": b"{}",
}


def trained_subject(db: Session, storage: Storage, user: User, files: dict[str, bytes],
                    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5", demo: bool = False) -> Subject:
    subject = make_subject(db, user, name="Rex the Dog", identifier="qzx", base_model=base_model)
    prefix = f"{weights_prefix(user.id, subject.id)}job-1/"
    for name, data in files.items():
        storage.put_bytes(prefix + name, data, "application/octet-stream")
    subject.weights_key = prefix
    subject.model_info = {"base_model": base_model, "demo_model": demo, "weights_files": sorted(files)}
    db.commit()
    return subject


def test_a_lora_studio_offers_both_lora_formats_and_a_zip(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User], api_headers: Headers
) -> None:
    user = make_user()
    subject = trained_subject(db, app_storage, user, LORA_FILES)
    headers = api_headers(user)

    described = client.get(f"/api/v1/subjects/{subject.id}/model", headers=headers).json()
    assert described["method"] == "lora" and described["trigger"] == "qzx dog"
    assert described["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert [d["variant"] for d in described["downloads"]] == ["a1111", "diffusers", "zip"]

    a1111 = client.get(described["downloads"][0]["url"], headers=headers)
    assert a1111.status_code == 200 and a1111.content == b"kohya-lora-bytes"
    assert 'attachment; filename="rex-the-dog-qzx.safetensors"' in a1111.headers["content-disposition"]
    diffusers = client.get(f"/api/v1/subjects/{subject.id}/model/diffusers", headers=headers)
    assert diffusers.content == b"diffusers-lora-bytes"
    assert "rex-the-dog-qzx-diffusers.safetensors" in diffusers.headers["content-disposition"]

    with client.stream("GET", f"/api/v1/subjects/{subject.id}/model/zip", headers=headers) as response:
        assert response.headers["content-type"] == "application/zip" and "content-length" not in response.headers
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
    assert sorted(archive.namelist()) == sorted([*LORA_FILES, "manifest.json"])
    assert archive.read("lora_kohya.safetensors") == b"kohya-lora-bytes"
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["trigger"] == "qzx dog" and manifest["method"] == "lora" and manifest["missing"] == []
    assert [entry["file"] for entry in manifest["files"]] == sorted(LORA_FILES)


def test_a_full_fine_tune_is_one_zip_of_its_folders(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User], api_headers: Headers
) -> None:
    user = make_user()
    subject = trained_subject(db, app_storage, user, FULL_FILES)
    headers = api_headers(user)
    described = client.get(f"/api/v1/subjects/{subject.id}/model", headers=headers).json()
    assert described["method"] == "full" and [d["variant"] for d in described["downloads"]] == ["zip"]
    refused = client.get(f"/api/v1/subjects/{subject.id}/model/a1111", headers=headers)
    assert refused.status_code == 404 and "only a ZIP" in refused.json()["detail"]
    zipped = client.get(f"/api/v1/subjects/{subject.id}/model/zip", headers=headers)
    archive = zipfile.ZipFile(io.BytesIO(zipped.content))
    assert archive.read("unet/diffusion_pytorch_model.safetensors") == b"unet-bytes"


def test_an_untrained_studio_has_no_model(
    client: TestClient, db: Session, make_user: Callable[..., User], api_headers: Headers
) -> None:
    user = make_user()
    subject = make_subject(db, user)
    db.commit()
    assert trained_model(subject) is None
    for path in ("model", "model/zip"):
        response = client.get(f"/api/v1/subjects/{subject.id}/{path}", headers=api_headers(user))
        assert response.status_code == 404 and response.json()["detail"] == "This studio has no trained model yet."
    assert client.get(f"/api/v1/subjects/{subject.id}/model/other", headers=api_headers(user)).status_code == 422


def test_the_gallery_shows_the_model_card_with_its_downloads(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User],
    login: Callable[..., TestClient],
) -> None:
    user = make_user()
    subject = trained_subject(db, app_storage, user, LORA_FILES)
    login(client, user)
    page = client.get(f"/studios/{subject.id}/gallery").text
    assert "Your model" in page and "<code>qzx dog</code>" in page
    for variant in ("a1111", "diffusers", "zip"):
        assert f'href="/studios/{subject.id}/model/{variant}"' in page
    download = client.get(f"/studios/{subject.id}/model/a1111")
    assert download.status_code == 200 and download.content == b"kohya-lora-bytes"

    untrained = make_subject(db, user, name="Untrained")
    db.commit()
    assert "Your model" not in client.get(f"/studios/{untrained.id}/gallery").text


def test_a_demo_model_says_it_only_works_here(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User],
    login: Callable[..., TestClient],
) -> None:
    user = make_user()
    subject = trained_subject(db, app_storage, user, LORA_FILES, base_model="tiny", demo=True)
    login(client, user)
    assert "built-in demo model, which exists only here" in client.get(f"/studios/{subject.id}/gallery").text
