"""The upload checks of a person's studio: one face per photo, large enough, and the same person in all.

Runs in the web process before anything is stored or trained, on the sanitized picture (upright,
at most 2048 px long), with the engine's torch-free face model (``worker.engine.faces``: dlib).
Each refusal is a sentence the person can act on, named by file:

- no face found, several faces of similar size, a face too small to learn from (per photo);
- photos of someone else than most of the photos (by descriptor: the largest group of photos
  that are one person is kept, the others are named), and the whole set refused when no 3 photos
  show one person;
- near-identical photos of the face (the same shot cropped, scaled or recoloured again).

Pets and other animals do not come here: their checks are the sanitizer's alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from app.photos.sanitize import PhotoRejected
from worker.engine.faces import (
    CONFIDENT_SCORE,
    MATCH_THRESHOLD,
    FaceModelMissing,
    distance,
    face_model,
    largest_group,
)

logger = logging.getLogger(__name__)

# Below this box side (px, in the stored photo) a face is refused as too small. The descriptor is
# stable from ~60 px (bench/likeness.py's size sweep: distance to the full-size face <= 0.15), but a
# training crop spans 2.6 face heights: a 100 px face gives a 260 px crop, already upscaled twice
# for the smallest training size (512).
MIN_FACE_SIDE = 100
# A second face counts as "several faces" when its box side is at least this fraction of the main
# face's and the detector is sure of it: smaller faces are people in the background, and the studio
# uses the main face; unsure ones are mostly patches and hands (worker/engine/faces.py).
SEVERAL_FACES_RATIO = 0.5
# Descriptors closer than this are the same shot again. The same photo cropped at the same scale
# gives the very same face (0.0); anything that moves the detector's box (a rescale, a rotation of a
# few degrees, a recolouring) already costs 0.05-0.2 (bench/likeness.py): only the first is caught,
# so no two real shots are refused as one.
FACE_DUPLICATE_DISTANCE = 0.06
MIN_SAME_PERSON = 3  # no group of this many photos of one face: the studio is refused


def load_face_model() -> None:
    """Load the face model now, at the process's start, instead of in the first person's upload.

    The load is ~0.3 s of CPU once per process (bench/web.py --only faces); paid at start, a
    20-photo person studio's check costs the photos' work alone. A missing model is logged, not
    fatal: pet studios do not need it.
    """
    try:
        face_model()
    except FaceModelMissing as exc:
        logger.warning("face model not loaded: %s; person studios cannot be checked", exc)


@dataclass(frozen=True)
class FaceFound:
    """The face an upload is trained on: its box side in px and its 128-D descriptor."""

    side: int
    descriptor: tuple[float, ...]


def check_face(name: str, image: Image.Image) -> FaceFound:
    """The one face of a person's photo, or :class:`PhotoRejected` saying what is wrong with it."""
    analysis = face_model().analyse(image)
    faces = analysis.faces
    if not faces or analysis.descriptor is None:
        raise PhotoRejected(name, "no face found; use a photo where the face is clearly visible and "
                                  "turned towards the camera")
    main = faces[0]
    others = [face for face in faces[1:]
              if face.side >= main.side * SEVERAL_FACES_RATIO and face.score >= CONFIDENT_SCORE]
    if others:
        raise PhotoRejected(name, f"shows {len(others) + 1} faces; use a photo with only the person in it, "
                                  "or crop the others out")
    if main.side < MIN_FACE_SIDE:
        raise PhotoRejected(name, f"the face is too small to learn from ({main.side} px across; at least "
                                  f"{MIN_FACE_SIDE} px); use a closer photo or crop it around the person")
    return FaceFound(side=main.side, descriptor=tuple(float(v) for v in analysis.descriptor))


@dataclass
class IdentityProblems:
    """The photos refused for who they show, and the sentence for the whole set (None when fine)."""

    rejections: list[PhotoRejected]
    set_problem: str | None = None


def identity_problems(faces: Sequence[tuple[str, FaceFound]]) -> IdentityProblems:
    """Check that the photos' faces are one person, and no shot is there twice.

    ``faces`` are the (display name, face) pairs of the photos that passed every per-photo check,
    in upload order. With fewer than 3 of them there is no majority to judge by: the photo count
    check speaks instead.
    """
    result = IdentityProblems(rejections=[])
    if len(faces) < MIN_SAME_PERSON:
        return result
    group = largest_group([face.descriptor for _, face in faces], MATCH_THRESHOLD)
    if len(group) < MIN_SAME_PERSON:
        result.set_problem = (f"These photos do not show one person: no {MIN_SAME_PERSON} of them show the same "
                              f"face. Upload {MIN_SAME_PERSON} or more photos of the same person.")
        return result
    members = set(group)
    for index, (name, _) in enumerate(faces):
        if index not in members:
            result.rejections.append(PhotoRejected(
                name, f"shows someone else than the other {len(group)} photos; remove it or use a photo of "
                      "the same person"))
    kept: list[tuple[str, FaceFound]] = []
    for index in group:
        name, face = faces[index]
        twin = next((earlier for earlier, seen in kept
                     if distance(face.descriptor, seen.descriptor) < FACE_DUPLICATE_DISTANCE), None)
        if twin is not None:
            result.rejections.append(PhotoRejected(
                name, f"shows the face just as {twin} does (the same shot again); keep one and add a "
                      "different shot"))
        else:
            kept.append((name, face))
    return result
