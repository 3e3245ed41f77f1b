"""The base models on offer: the choice on the form and in the API, what a studio records, and what the
studio page, the gallery's model card, the API and the ZIP manifests say about the model afterwards."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import BaseModelOption, Settings
from app.main import create_app
from app.models import Photo, Subject, User
from app.storage import Storage
from app.storage.base import weights_prefix
from app.subjects import base_models
from tests.app.conftest import page_context
from tests.app.factories import make_image, make_job, make_subject
from tests.app.subjects.conftest import SentTask

SD_LICENCE_URL = "https://huggingface.co/spaces/CompVis/stable-diffusion-license"
TWO_MODELS = [
    BaseModelOption(key="tiny", name="Tiny SD (demo)", spec="tiny", licence="CreativeML OpenRAIL-M",
                    licence_url=SD_LICENCE_URL),
    BaseModelOption(key="tiny-xl", name="Tiny SDXL (demo)", spec="tiny-sdxl", licence="CreativeML Open RAIL++-M"),
]
FIELDS = {"name": "Rex", "kind": "dog", "consent": "yes"}
XL_CHOICE = {"key": "tiny-xl", "name": "Tiny SDXL (demo)", "spec": "tiny-sdxl",
             "licence": "CreativeML Open RAIL++-M", "licence_url": None}


def upload(photos: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("photos", (name, data, "image/jpeg")) for name, data in photos]


def subjects_and_photos(engine: Engine) -> tuple[int, int]:
    with sessionmaker(bind=engine)() as session:
        return (session.scalar(select(func.count()).select_from(Subject)) or 0,
                session.scalar(select(func.count()).select_from(Photo)) or 0)


@pytest.fixture
def two_models_app(settings: Settings, clean_db: Engine) -> FastAPI:
    return create_app(settings.model_copy(update={"base_models": TWO_MODELS}))


@pytest.fixture
def two_models(two_models_app: FastAPI) -> Any:
    with TestClient(two_models_app, base_url="http://testserver") as test_client:
        yield test_client


@pytest.fixture
def owner(make_user: Callable[..., User]) -> User:
    return make_user("owner@example.com")


@pytest.fixture
def headers(owner: User, api_headers: Callable[[User], dict[str, str]]) -> dict[str, str]:
    return api_headers(owner)


# --- what is offered ------------------------------------------------------------------------------


def test_without_a_list_the_one_configured_model_is_the_only_choice(settings: Settings) -> None:
    assert base_models.offered(settings) == [base_models.Offer("default", "The studio's standard model", None)]
    named = settings.model_copy(update={"base_model": "stabilityai/stable-diffusion-2-1"})
    assert [(offer.key, offer.name, offer.spec) for offer in base_models.offered(named)] == [
        ("default", "stabilityai/stable-diffusion-2-1", None)]  # the worker's own setting decides the spec
    assert not base_models.has_choice(named)
    listed = settings.model_copy(update={"base_models": TWO_MODELS})
    assert [offer.key for offer in base_models.offered(listed)] == ["tiny", "tiny-xl"]
    assert base_models.has_choice(listed)
    assert base_models.choose(listed, "") == base_models.offered(listed)[0]
    assert base_models.choose(listed, "tiny-xl") is not None and base_models.choose(listed, "sd15") is None


def test_the_api_lists_the_offered_models_with_their_licences(two_models: TestClient, client: TestClient) -> None:
    listed = two_models.get("/api/v1/base-models")
    assert listed.status_code == 200
    assert listed.json() == [
        {"key": "tiny", "name": "Tiny SD (demo)", "licence": "CreativeML OpenRAIL-M", "licence_url": SD_LICENCE_URL,
         "default": True},
        {"key": "tiny-xl", "name": "Tiny SDXL (demo)", "licence": "CreativeML Open RAIL++-M", "licence_url": None,
         "default": False},
    ]
    # Specs (hub ids, the operator's paths) are not part of it.
    assert "spec" not in listed.text
    assert client.get("/api/v1/base-models").json() == [
        {"key": "default", "name": "The studio's standard model", "licence": None, "licence_url": None,
         "default": True}]


def test_the_openapi_document_names_this_servers_keys(two_models: TestClient) -> None:
    document = two_models.get("/api/v1/openapi.json").json()
    body = document["paths"]["/api/v1/subjects"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["base_model"]["enum"] == ["tiny", "tiny-xl"]
    assert body["properties"]["base_model"]["default"] == "tiny"
    assert "/api/v1/base-models" in document["paths"]


# --- choosing through the API ---------------------------------------------------------------------


def test_a_studio_records_the_chosen_model(
    two_models: TestClient, owner: User, valid_photos: list[tuple[str, bytes]], sent_tasks: list[SentTask],
    clean_db: Engine, api_headers: Callable[[User], dict[str, str]],
) -> None:
    response = two_models.post("/api/v1/subjects", data={**FIELDS, "base_model": "tiny-xl"},
                               files=upload(valid_photos), headers=api_headers(owner))
    assert response.status_code == 201, response.text
    info = response.json()["subject"]["base_model_info"]
    assert info == {"key": "tiny-xl", "name": "Tiny SDXL (demo)", "family": None, "family_id": None,
                    "licence": "CreativeML Open RAIL++-M", "licence_url": None, "spec": None}
    with sessionmaker(bind=clean_db)() as session:
        subject = session.scalars(select(Subject)).one()
    assert subject.base_model_choice == XL_CHOICE


def test_without_base_model_the_first_offered_is_chosen(
    two_models: TestClient, owner: User, valid_photos: list[tuple[str, bytes]], sent_tasks: list[SentTask],
    clean_db: Engine, api_headers: Callable[[User], dict[str, str]],
) -> None:
    response = two_models.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos),
                               headers=api_headers(owner))
    assert response.status_code == 201, response.text
    assert response.json()["subject"]["base_model_info"]["key"] == "tiny"
    with sessionmaker(bind=clean_db)() as session:
        assert session.scalars(select(Subject)).one().base_model_choice["spec"] == "tiny"  # type: ignore[index]


def test_an_unknown_model_is_refused_naming_the_allowed_keys_and_nothing_is_stored(
    two_models: TestClient, owner: User, valid_photos: list[tuple[str, bytes]], sent_tasks: list[SentTask],
    clean_db: Engine, api_headers: Callable[[User], dict[str, str]],
) -> None:
    response = two_models.post("/api/v1/subjects", data={**FIELDS, "base_model": "sd15"},
                               files=upload(valid_photos), headers=api_headers(owner))
    assert response.status_code == 422
    assert response.json()["fields"] == {
        "base_model": "“sd15” is not one of this studio's base models; choose one of: tiny, tiny-xl."}
    assert subjects_and_photos(clean_db) == (0, 0) and sent_tasks == []


def test_with_one_model_nothing_changes_for_the_person(
    client: TestClient, headers: dict[str, str], valid_photos: list[tuple[str, bytes]], sent_tasks: list[SentTask],
    clean_db: Engine,
) -> None:
    refused = client.post("/api/v1/subjects", data={**FIELDS, "base_model": "tiny-xl"}, files=upload(valid_photos),
                          headers=headers)
    assert refused.status_code == 422
    assert refused.json()["fields"]["base_model"].endswith("choose one of: default.")
    created = client.post("/api/v1/subjects", data=FIELDS, files=upload(valid_photos), headers=headers)
    assert created.status_code == 201, created.text
    # Before a worker loads it, the single model is only "the standard one"; its spec and family come later.
    assert created.json()["subject"]["base_model_info"] == {
        "key": "default", "name": "The studio's standard model", "family": None, "family_id": None,
        "licence": None, "licence_url": None, "spec": None}
    with sessionmaker(bind=clean_db)() as session:
        choice = session.scalars(select(Subject)).one().base_model_choice
    assert choice == {"key": "default", "name": "The studio's standard model", "spec": None, "licence": None,
                      "licence_url": None}


# --- choosing on the form -------------------------------------------------------------------------


def test_the_form_offers_several_models_as_cards_with_name_and_licence(
    two_models: TestClient, owner: User, login: Callable[..., TestClient],
) -> None:
    login(two_models, owner)
    page = two_models.get("/studios/new")
    assert page.status_code == 200
    assert [offer.key for offer in page_context(page)["base_models"]] == ["tiny", "tiny-xl"]
    text = page.text
    assert 'name="base_model" value="tiny" checked' in text and 'name="base_model" value="tiny-xl" >' in text
    assert "Tiny SDXL (demo)" in text and "CreativeML Open RAIL++-M" in text
    assert f'<a href="{SD_LICENCE_URL}"' in text


def test_with_one_model_the_form_has_no_choice(
    client: TestClient, owner: User, login: Callable[..., TestClient],
) -> None:
    login(client, owner)
    page = client.get("/studios/new")
    assert page_context(page)["base_models"] == []
    assert "base_model" not in page.text and "Licence" not in page.text


def test_the_form_post_records_the_choice_and_a_reshown_form_keeps_it(
    two_models: TestClient, owner: User, login: Callable[..., TestClient],
    csrf_token: Callable[[TestClient], str], valid_photos: list[tuple[str, bytes]], sent_tasks: list[SentTask],
    clean_db: Engine,
) -> None:
    login(two_models, owner)
    fields = {**FIELDS, "csrf_token": csrf_token(two_models), "base_model": "tiny-xl"}
    reshown = two_models.post("/studios", data={**fields, "consent": ""}, files=upload(valid_photos))
    assert reshown.status_code == 422
    assert 'name="base_model" value="tiny-xl" checked' in reshown.text
    unknown = two_models.post("/studios", data={**fields, "base_model": "nope"}, files=upload(valid_photos))
    assert unknown.status_code == 422 and "choose one of: tiny, tiny-xl" in unknown.text
    created = two_models.post("/studios", data=fields, files=upload(valid_photos), follow_redirects=False)
    assert created.status_code == 303, created.text
    with sessionmaker(bind=clean_db)() as session:
        assert session.scalars(select(Subject)).one().base_model_choice == XL_CHOICE


# --- what the pages, the API and the manifests say afterwards -------------------------------------


def trained_xl_subject(db: Session, storage: Storage, user: User, files: dict[str, bytes]) -> Subject:
    """A studio trained on the chosen tiny-sdxl, as the worker publishes it."""
    subject = make_subject(db, user, name="Rex", identifier="qzx", base_model="tiny-sdxl",
                           base_model_choice=XL_CHOICE)
    prefix = f"{weights_prefix(user.id, subject.id)}job-1/"
    for name, data in files.items():
        storage.put_bytes(prefix + name, data, "application/octet-stream")
    subject.weights_key = prefix
    subject.model_info = {"base_model": "tiny-sdxl", "demo_model": True, "family": "sdxl",
                          "family_label": "Stable Diffusion XL", "weights_files": sorted(files)}
    job = make_job(db, subject, status="done", stage="finished",
                   details={"base_model": "tiny-sdxl", "family": "sdxl", "family_label": "Stable Diffusion XL"})
    make_image(db, storage, subject, job)
    db.commit()
    return subject


LORA_WITH_KOHYA = {"pytorch_lora_weights.safetensors": b"diffusers", "lora_kohya.safetensors": b"kohya",
                   "run.json": b"{}"}
LORA_WITHOUT_KOHYA = {"pytorch_lora_weights.safetensors": b"diffusers", "run.json": b"{}"}


def test_the_studio_page_names_the_model_its_family_and_licence(
    two_models: TestClient, two_models_app: FastAPI, db: Session, owner: User, login: Callable[..., TestClient],
) -> None:
    subject = trained_xl_subject(db, two_models_app.state.storage, owner, LORA_WITH_KOHYA)
    login(two_models, owner)
    page = two_models.get(f"/studios/{subject.id}")
    facts = page_context(page)["base_model"]
    assert (facts.name, facts.family, facts.licence) == ("Tiny SDXL (demo)", "Stable Diffusion XL",
                                                         "CreativeML Open RAIL++-M")
    assert "data-base-model" in page.text and "Stable Diffusion XL" in page.text
    assert "Licence: CreativeML Open RAIL++-M" in page.text


def test_while_training_the_family_comes_from_the_jobs_details(
    two_models: TestClient, db: Session, owner: User, login: Callable[..., TestClient],
    headers: dict[str, str],
) -> None:
    subject = make_subject(db, owner, base_model_choice=XL_CHOICE)
    make_job(db, subject, status="running", stage="training",
             details={"base_model": "tiny-sdxl", "family": "sdxl", "family_label": "Stable Diffusion XL"})
    db.commit()
    login(two_models, owner)
    assert page_context(two_models.get(f"/studios/{subject.id}"))["base_model"].family == "Stable Diffusion XL"
    info = two_models.get(f"/api/v1/subjects/{subject.id}", headers=headers).json()["base_model_info"]
    assert info["family"] == "Stable Diffusion XL" and info["spec"] == "tiny-sdxl"


def test_a_family_without_a_kohya_file_offers_no_a1111_download(
    two_models: TestClient, two_models_app: FastAPI, db: Session, owner: User, login: Callable[..., TestClient],
    headers: dict[str, str],
) -> None:
    subject = trained_xl_subject(db, two_models_app.state.storage, owner, LORA_WITHOUT_KOHYA)
    described = two_models.get(f"/api/v1/subjects/{subject.id}/model", headers=headers).json()
    assert [d["variant"] for d in described["downloads"]] == ["diffusers", "zip"]
    assert two_models.get(f"/api/v1/subjects/{subject.id}/model/a1111", headers=headers).status_code == 404
    login(two_models, owner)
    gallery = two_models.get(f"/studios/{subject.id}/gallery")
    assert "/model/a1111" not in gallery.text and "/model/diffusers" in gallery.text


def test_the_model_card_api_and_manifests_say_which_model_and_licence(
    two_models: TestClient, two_models_app: FastAPI, db: Session, owner: User, login: Callable[..., TestClient],
    headers: dict[str, str],
) -> None:
    subject = trained_xl_subject(db, two_models_app.state.storage, owner, LORA_WITH_KOHYA)
    expected = {"key": "tiny-xl", "name": "Tiny SDXL (demo)", "family": "Stable Diffusion XL", "family_id": "sdxl",
                "licence": "CreativeML Open RAIL++-M", "licence_url": None, "spec": "tiny-sdxl"}

    described = two_models.get(f"/api/v1/subjects/{subject.id}/model", headers=headers).json()
    assert described["base_model_info"] == expected
    assert [d["variant"] for d in described["downloads"]] == ["a1111", "diffusers", "zip"]
    assert two_models.get(f"/api/v1/subjects/{subject.id}", headers=headers).json()["base_model_info"] == expected

    with two_models.stream("GET", f"/api/v1/subjects/{subject.id}/model/zip", headers=headers) as response:
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
    assert json.loads(archive.read("manifest.json"))["base_model_info"] == expected
    gallery_zip = two_models.get(f"/api/v1/subjects/{subject.id}/download.zip", headers=headers)
    assert gallery_zip.status_code == 200
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(gallery_zip.content)).read("manifest.json"))
    assert manifest["base_model_info"] == expected

    login(two_models, owner)
    card = two_models.get(f"/studios/{subject.id}/gallery").text
    model_card = card[card.index('id="model"'):]
    assert "Tiny SDXL (demo) · Stable Diffusion XL" in model_card
    assert "CreativeML Open RAIL++-M" in model_card and "/model/a1111" in model_card
