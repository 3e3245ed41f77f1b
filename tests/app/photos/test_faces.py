"""The person studio's checks across photos: no three photos of one person refuses the whole set."""

from __future__ import annotations

from app.config import Settings
from app.photos import sanitize_uploads
from app.photos.faces import FaceFound, identity_problems
from tests import face_photos


def test_no_three_photos_of_one_person_refuses_the_set(settings: Settings) -> None:
    hoppers = face_photos.variations(face_photos.hopper())[:2]
    collinses = face_photos.variations(face_photos.collins())[:2]
    files = [(f"photo-{index}.jpg", face_photos.jpeg(image)) for index, image in enumerate([*hoppers, *collinses])]
    batch = sanitize_uploads(files, settings, faces=True)
    assert batch.rejections == [] and len(batch.photos) == 4
    assert batch.set_problem == ("These photos do not show one person: no 3 of them show the same face. "
                                 "Upload 3 or more photos of the same person.")
    assert sanitize_uploads(files, settings).set_problem is None  # a pet's studio: no face checks


def test_fewer_than_three_faces_leave_the_judgement_to_the_photo_count() -> None:
    faces = [("a.jpg", FaceFound(200, (0.0,) * 128)), ("b.jpg", FaceFound(200, (1.0,) * 128))]
    assert identity_problems(faces).rejections == [] and identity_problems(faces).set_problem is None
