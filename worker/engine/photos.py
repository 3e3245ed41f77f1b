"""Turn a person's uploaded photos into square training images, and say which ones are unusable.

For every photo: decode it, apply its EXIF orientation, convert to RGB, check it (too small, blurred,
a near-duplicate of an earlier photo, unreadable), crop a square that keeps the subject whole, and
resize to the training resolution with LANCZOS. Problem photos are left out and reported with a
reason a person can act on ("photo3.jpg: blurry: no part is in sharp focus (sharpness 12 < 55)").

The crop is subject-aware because a random or centre crop that cuts off a head teaches the model a
headless subject:

- people: framed on the main face's landmarks (dlib's 5 points, ``worker.engine.faces``): the
  square spans ``EYE_SPAN`` eye distances and puts the eyes ``EYE_HEIGHT`` of the way down, so
  every training image shows head and shoulders with the eyes at the same height and scale
  (bench/likeness.py measures this against the Haar framing it replaced); where dlib finds no face,
  the largest face of OpenCV's frontal-face Haar cascade, with room above the head;
- animals (and people without a detectable face): a saliency window, centred on the weighted
  centroid of coarse gradient energy plus colour distinctness from the photo's border.

Only Pillow, numpy, OpenCV and dlib are used, so the web app can run :func:`check_photo` and
:func:`image_problems` at upload time without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.engine.errors import EngineInputError, PhotosUnusable
from worker.engine.sharpness import BLUR_THRESHOLD, sharpness

try:  # HEIC/HEIF from phones, when pillow-heif is installed (a project dependency)
    from pillow_heif import register_heif_opener
except ImportError:  # pragma: no cover - only without the optional decoder
    pass
else:
    register_heif_opener()

SubjectKind = Literal["pet", "person"]
SUBJECT_KINDS: tuple[str, ...] = ("pet", "person")

MIN_SIDE_ABSOLUTE = 64  # below this no resolution is worth training on
DUPLICATE_MAX_BITS = 6  # dHash Hamming distance (of 64 bits) at or below which photos are near-duplicates
HASH_SIZE = 8
# Face crop geometry, in units of the detected face box's height: the square spans this many face
# heights, and its top edge sits this far above the face's top (room for hair and ears).
FACE_CROP_SPAN = 2.6
FACE_HEAD_ROOM = 0.7
# Landmark framing: the square's side in eye distances (centre to centre), and where the eyes sit,
# as a fraction of the side from the top. 6.5 and 0.42 frame like the Haar numbers above on an
# average face, without their spread (the Haar box's size and place vary with the light and pose).
EYE_SPAN = 6.5
EYE_HEIGHT = 0.42

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)


@dataclass(frozen=True)
class PhotoProblem:
    """A photo that was left out, and why, in words a person can act on."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class PreparedPhotos:
    """The square training images written, the photos left out, and how many faces cropped on."""

    images: list[Path]
    problems: list[PhotoProblem] = field(default_factory=list)
    faces_found: int = 0


def load_photo(path: Path) -> Image.Image:
    """Decode ``path`` fully, apply its EXIF orientation and return an RGB image.

    Raises :class:`EngineInputError` naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            oriented = ImageOps.exif_transpose(opened)
            return oriented.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise EngineInputError(f"{path.name}: unreadable (too many pixels)") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise EngineInputError(f"{path.name}: unreadable (not an image Pillow can decode)") from exc


def dhash(image: Image.Image, hash_size: int = HASH_SIZE) -> int:
    """Difference hash: one bit per horizontally adjacent pixel pair of a tiny grayscale copy."""
    small = image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hash_distance(first: int, second: int) -> int:
    """Hamming distance between two hashes."""
    return (first ^ second).bit_count()


def min_side_for(resolution: int) -> int:
    """The shortest side a photo may have for training at ``resolution``."""
    return max(MIN_SIDE_ABSOLUTE, resolution // 2)


def image_problems(image: Image.Image, resolution: int) -> list[str]:
    """Reasons ``image`` is unfit for training at ``resolution`` (empty when it is fine)."""
    problems: list[str] = []
    width, height = image.size
    needed = min_side_for(resolution)
    if min(width, height) < needed:
        problems.append(f"too small ({width}x{height}; the shorter side must be at least {needed} px)")
        return problems  # a tiny image's sharpness says nothing useful
    score = sharpness(image)
    if score < BLUR_THRESHOLD:
        problems.append(f"blurry: no part is in sharp focus (sharpness {score:.0f} < {BLUR_THRESHOLD:.0f})")
    return problems


def check_photo(path: Path, resolution: int) -> list[PhotoProblem]:
    """Problems of one photo file on its own (unreadable, too small, blurry); empty when it is fine."""
    try:
        image = load_photo(path)
    except EngineInputError as exc:
        return [PhotoProblem(path.name, str(exc).split(": ", 1)[-1])]
    return [PhotoProblem(path.name, reason) for reason in image_problems(image, resolution)]


@lru_cache(maxsize=1)
def _face_cascade() -> cv2.CascadeClassifier:
    cascade_path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")  # type: ignore[attr-defined]
    cascade = cv2.CascadeClassifier(cascade_path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV's face cascade could not be loaded from {cascade_path}")
    return cascade


def detect_faces(image: Image.Image) -> list[Box]:
    """Frontal faces found by the Haar cascade, as boxes in the image's pixel coordinates."""
    gray = np.asarray(image.convert("L"))
    height, width = gray.shape
    # Detection on a copy of at most 640 px is as reliable and far faster on 12 MP photos.
    scale = min(1.0, 640 / max(height, width))
    small = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    small = cv2.equalizeHist(small)
    min_face = max(20, round(min(small.shape) * 0.08))
    found = _face_cascade().detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
    return [
        (round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale))
        for (x, y, w, h) in np.asarray(found).reshape(-1, 4)
    ]


def _place_window(centre: float, side: int, length: int) -> int:
    """Start of a window of ``side`` centred on ``centre`` and kept inside ``[0, length)``."""
    start = round(centre - side / 2)
    return int(min(max(start, 0), length - side))


def face_crop_box(image_size: tuple[int, int], face: Box) -> Box:
    """A square crop around ``face`` with head room, as large as the framing asks but inside the image.

    The square spans ``FACE_CROP_SPAN`` face heights (head, hair and shoulders), is centred on the
    face horizontally, and its top sits ``FACE_HEAD_ROOM`` face heights above the face. When the
    image is too narrow or short for that, the square shrinks to the shorter side and slides to stay
    inside; the face stays whole in every case because the square is never smaller than the face.
    """
    width, height = image_size
    left, top, right, bottom = face
    face_height = bottom - top
    face_width = right - left
    if face_width <= 0 or face_height <= 0:
        raise EngineInputError(f"face box {face} is empty")
    side = min(width, height, max(round(face_height * FACE_CROP_SPAN), face_width, face_height))
    crop_left = _place_window((left + right) / 2, side, width)
    wanted_top = round(top - face_height * FACE_HEAD_ROOM)
    crop_top = int(min(max(wanted_top, 0), height - side))
    return crop_left, crop_top, crop_left + side, crop_top + side


def landmark_crop_box(image_size: tuple[int, int], eyes: tuple[tuple[float, float], tuple[float, float]],
                      face: Box) -> Box:
    """A square framed on the eyes: ``EYE_SPAN`` eye distances wide, centred between the eyes, the
    eyes ``EYE_HEIGHT`` of the side from the top. Where the image is too small or the face too near
    an edge, the square shrinks to the shorter side and slides to stay inside, never smaller than
    the face box, so the face stays whole."""
    width, height = image_size
    (left_x, left_y), (right_x, right_y) = eyes
    span = float(np.hypot(right_x - left_x, right_y - left_y))
    if span <= 0:
        raise EngineInputError(f"eyes {eyes} are one point")
    face_side = max(face[2] - face[0], face[3] - face[1])
    side = int(min(width, height, max(round(span * EYE_SPAN), face_side)))
    centre_x, centre_y = (left_x + right_x) / 2, (left_y + right_y) / 2
    crop_left = _place_window(centre_x, side, width)
    crop_top = int(min(max(round(centre_y - EYE_HEIGHT * side), 0), height - side))
    return crop_left, crop_top, crop_left + side, crop_top + side


def _main_face(image: Image.Image) -> tuple[tuple[tuple[float, float], tuple[float, float]], Box] | None:
    """The eyes and box of the main face dlib finds, or None."""
    from worker.engine.faces import face_model

    found = face_model().detect(image)
    return (found[0].eyes, found[0].box) if found else None


def saliency_map(image: Image.Image, size: int = 64) -> np.ndarray:
    """A coarse map of where the subject probably is: edges plus colours unlike the border's.

    Working on a ``size``-px copy averages away fine texture (fur, noise, grass), so the subject's
    outline and its colour contrast with the background dominate.
    """
    width, height = image.size
    scale = size / max(width, height)
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32) / 255.0
    gray = pixels.mean(axis=2)
    grad_x = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    grad_y = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    energy = np.sqrt(grad_x**2 + grad_y**2)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distinct = np.linalg.norm(pixels - np.median(border, axis=0), axis=2)
    combined = energy / (energy.max() + 1e-6) + distinct / (distinct.max() + 1e-6)
    return np.asarray(combined, dtype=np.float32)


def saliency_crop_box(image: Image.Image) -> Box:
    """The largest square (the shorter side) slid along the longer side to cover the salient mass.

    The window is centred on the saliency centroid, then moved, where the window is long enough, so
    that it covers the central 90 % of the saliency mass: a subject off to one side is not cut.
    """
    width, height = image.size
    side = min(width, height)
    if width == height:
        return 0, 0, side, side
    weights = saliency_map(image)
    horizontal = width > height
    profile = weights.sum(axis=0 if horizontal else 1).astype(np.float64)
    length = width if horizontal else height
    positions = (np.arange(profile.size) + 0.5) * (length / profile.size)
    total = profile.sum()
    if total <= 0:
        start = (length - side) // 2
    else:
        centroid = float((profile * positions).sum() / total)
        cumulative = np.cumsum(profile) / total
        low = float(positions[np.searchsorted(cumulative, 0.05)])
        high = float(positions[min(profile.size - 1, np.searchsorted(cumulative, 0.95))])
        start = _place_window(centroid, side, length)
        if high - low <= side:  # the mass fits: slide just enough to include both ends
            start = int(min(max(start, round(high) - side), round(low)))
            start = min(max(start, 0), length - side)
    if horizontal:
        return start, 0, start + side, side
    return 0, start, side, start + side


def crop_square(image: Image.Image, subject_kind: SubjectKind) -> tuple[Image.Image, bool]:
    """The subject-aware square crop of ``image``; the flag says whether a face decided it."""
    if subject_kind == "person":
        main = _main_face(image)
        if main is not None:
            return image.crop(landmark_crop_box(image.size, *main)), True
        faces = detect_faces(image)
        if faces:
            largest = max(faces, key=lambda box: (box[2] - box[0]) * (box[3] - box[1]))
            return image.crop(face_crop_box(image.size, largest)), True
    return image.crop(saliency_crop_box(image)), False


def _write_png(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def prepare_photos(paths: list[Path], out_dir: Path, resolution: int, subject_kind: SubjectKind) -> PreparedPhotos:
    """Check, crop and resize ``paths`` into ``out_dir`` as ``photo-NN.png`` squares of ``resolution``.

    Problem photos are left out and listed in ``problems``. Raises :class:`EngineInputError` when
    no photo is given, the subject kind or resolution is wrong, or no usable photo remains (the
    message names each photo and its problem).
    """
    if not paths:
        raise PhotosUnusable("no photos given")
    if subject_kind not in SUBJECT_KINDS:
        raise EngineInputError(f"unknown subject kind {subject_kind!r}; choose one of {', '.join(SUBJECT_KINDS)}")
    if resolution <= 0 or resolution % 8:
        raise EngineInputError(f"resolution {resolution} must be a positive multiple of 8")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("photo-*.png"):  # a re-run must not train on a previous run's leftovers
        stale.unlink()

    result = PreparedPhotos(images=[])
    kept_hashes: list[tuple[str, int]] = []
    for path in paths:
        try:
            image = load_photo(path)
        except EngineInputError as exc:
            result.problems.append(PhotoProblem(path.name, str(exc).split(": ", 1)[-1]))
            continue
        reasons = image_problems(image, resolution)
        if reasons:
            result.problems.append(PhotoProblem(path.name, "; ".join(reasons)))
            continue
        fingerprint = dhash(image)
        duplicate = next(
            ((name, hash_distance(fingerprint, seen)) for name, seen in kept_hashes
             if hash_distance(fingerprint, seen) <= DUPLICATE_MAX_BITS),
            None,
        )
        if duplicate is not None:
            result.problems.append(
                PhotoProblem(path.name, f"near-duplicate of {duplicate[0]} (hash distance {duplicate[1]})")
            )
            continue
        kept_hashes.append((path.name, fingerprint))
        square, used_face = crop_square(image, subject_kind)
        result.faces_found += int(used_face)
        target = out_dir / f"photo-{len(result.images):02d}.png"
        _write_png(square.resize((resolution, resolution), Image.Resampling.LANCZOS), target)
        result.images.append(target)

    if not result.images:
        details = "; ".join(str(problem) for problem in result.problems)
        raise PhotosUnusable(f"no usable photo among {len(paths)}: {details}")
    return result
