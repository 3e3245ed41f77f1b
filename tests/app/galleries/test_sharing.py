"""Share links: nothing is shared until the owner makes a link; a link shows its picture or the whole
gallery to anyone, without an account, until it expires or is turned off; deleting removes its links."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.galleries import sharing
from app.models import ShareLink, User, utcnow
from app.storage import Storage
from tests.app.factories import make_image, make_job, make_subject, png_bytes

Headers = Callable[[User], dict[str, str]]


def test_a_link_shows_what_it_shares_to_anyone_until_it_ends(
    app: FastAPI, client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User],
    api_headers: Headers,
) -> None:
    user = make_user()
    subject = make_subject(db, user)
    job = make_job(db, subject, status="done", stage="finished")
    shown = make_image(db, app_storage, subject, job, seed=1)
    other = make_image(db, app_storage, subject, job, "a photo of {subject} in the snow", seed=2)
    elsewhere = make_subject(db, user, name="Bella")
    not_shared = make_image(db, app_storage, elsewhere, make_job(db, elsewhere), seed=3)
    db.commit()
    headers = api_headers(user)

    assert client.get(f"/api/v1/subjects/{subject.id}/shares", headers=headers).json() == []  # private by default
    picture = client.post(f"/api/v1/subjects/{subject.id}/shares", headers=headers,
                          json={"image_id": str(shown.id), "days": 1})
    assert picture.status_code == 201
    link = picture.json()
    assert link["image_id"] == str(shown.id) and link["url"].startswith("/s/") and link["revoked"] is False

    with TestClient(app) as stranger:  # no account, no cookie
        page = stranger.get(link["url"])
        assert page.status_code == 200 and "Shared with you" in page.text
        assert page.headers["referrer-policy"] == "no-referrer"
        assert stranger.get(f"{link['url']}/images/{shown.id}/file").content == png_bytes(1)
        # Only what the link shares: not the studio's other pictures, nor another studio's.
        assert stranger.get(f"{link['url']}/images/{other.id}/file").status_code == 404
        assert stranger.get(f"{link['url']}/images/{not_shared.id}/file").status_code == 404
        # A made-up or altered token shows nothing.
        assert stranger.get("/s/not-a-token").status_code == 404
        assert stranger.get(link["url"][:-2] + "xx").status_code == 404

        album = client.post(f"/api/v1/subjects/{subject.id}/shares", headers=headers, json={}).json()
        assert album["image_id"] is None
        assert stranger.get(f"{album['url']}/images/{other.id}/file").status_code == 200
        assert stranger.get(f"{album['url']}/images/{not_shared.id}/file").status_code == 404

        # Turned off: gone at once, and gone from the owner's list.
        assert client.delete(f"/api/v1/shares/{album['id']}", headers=headers).status_code == 204
        assert stranger.get(album["url"]).status_code == 404
        assert [each["id"] for each in client.get(f"/api/v1/subjects/{subject.id}/shares", headers=headers).json()
                ] == [link["id"]]

        # Expired: nothing either.
        row = db.get(ShareLink, uuid.UUID(link["id"]))
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        db.commit()
        assert stranger.get(link["url"]).status_code == 404

    # Another account can neither make a link of this studio nor turn one off.
    stranger_headers = api_headers(make_user("stranger@example.com"))
    assert client.post(f"/api/v1/subjects/{subject.id}/shares", headers=stranger_headers, json={}).status_code == 404
    assert client.delete(f"/api/v1/shares/{link['id']}", headers=stranger_headers).status_code == 404
    assert client.post(f"/api/v1/subjects/{subject.id}/shares", headers=headers,
                       json={"image_id": str(not_shared.id)}).status_code == 404


def test_deleting_the_picture_deletes_its_links(
    db: Session, app_storage: Storage, make_user: Callable[..., User], settings: Settings,
) -> None:
    from app.galleries.service import delete_image

    subject = make_subject(db, make_user())
    image = make_image(db, app_storage, subject, make_job(db, subject))
    link = sharing.create_share(db, subject, image, 7)
    album = sharing.create_share(db, subject, None, 30)
    token = sharing.share_token(settings, link)
    assert sharing.open_share(db, settings, token) is not None
    delete_image(db, app_storage, image)
    db.commit()
    assert list(db.scalars(select(ShareLink.id))) == [album.id]
    assert sharing.open_share(db, settings, token) is None


def test_the_gallery_page_makes_and_turns_off_links(
    client: TestClient, db: Session, app_storage: Storage, make_user: Callable[..., User],
    login: Callable[..., TestClient], csrf_token: Callable[[TestClient], str],
) -> None:
    user = make_user()
    subject = make_subject(db, user)
    make_image(db, app_storage, subject, make_job(db, subject, status="done", stage="finished"))
    db.commit()
    login(client, user)
    made = client.post(f"/studios/{subject.id}/shares", data={"days": "30", "csrf_token": csrf_token(client)})
    assert "A link to the gallery is ready below" in made.text
    link = db.scalars(select(ShareLink)).one()
    assert "/s/" in made.text and "data-share-revoke" in made.text
    off = client.post(f"/studios/{subject.id}/shares/{link.id}/revoke", data={"csrf_token": csrf_token(client)})
    assert "The link is turned off." in off.text and "data-share-revoke" not in off.text
    refused = client.post(f"/studios/{subject.id}/shares", data={"days": "365", "csrf_token": csrf_token(client)})
    assert "A link lasts 1, 7 or 30 days." in refused.text
