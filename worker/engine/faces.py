"""Faces with dlib's pretrained models: detection, 5-point landmarks, aligned crops, 128-D descriptors.

The models come from the ``face-recognition-models`` package (weights inside the package, CC0):
the HOG frontal-face detector (built into dlib), the optional CNN (MMOD) detector, the 5-point
landmark predictor and the ResNet face descriptor, whose authors report 99.38 % on LFW with the
rule "two faces are the same person when their descriptors are closer than 0.6"
(:data:`MATCH_THRESHOLD`). ``bench/likeness.py`` measures that rule on the photos this machine has.

Torch-free on purpose (dlib, numpy and Pillow only): the web process runs the upload checks with
it, and the worker its crops and likeness scores. It lives in the engine because it is ML, beside
``photos.py`` which the web process already imports the same way. The models load lazily, once
per process (:func:`face_model`), the first time a face is looked for.

Detection runs on a copy whose long side is at most :data:`DETECT_SIDE` px: HOG finds faces of
80 px and more on it (about a sixth of the photo's long side), and costs ~20 ms instead of a
second on a 12 MP photo. When nothing is found there it looks again at twice the size (faces
down to about a thirteenth of the long side), which costs ~4x and is paid only by such photos.
Landmarks and descriptors are computed on the full-size pixels around the face (the box scaled
back up, with a margin), never on a copy of the whole photo. The descriptor network runs on
numpy's BLAS (``face_network.py``; dlib's wheels have none), for a ninth of dlib's CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from threadpoolctl import ThreadpoolController

from worker.engine.face_network import FaceNetwork, FaceNetworkError

logger = logging.getLogger(__name__)

MATCH_THRESHOLD = 0.6  # dlib's documented rule: descriptors closer than this are the same person
STRONG_MATCH = 0.5  # closer than this, a generated face is clearly the person (bench/likeness.py)
DETECT_SIDE = 512
MIN_DETECTION_SCORE = 0.0  # dlib's own default for the HOG detector
# HOG also "finds" faces in patches, badges and hands, with low scores: on rotated copies of
# scikit-image's astronaut photo such false faces scored 0.04-0.35 and were as large as her face
# (bench/likeness.py). A face scoring at least this is taken as certain.
CONFIDENT_SCORE = 0.5
DESCRIPTOR_SIZE = 128
CHIP_SIZE = 150  # the descriptor network's input side
CHIP_PADDING = 0.25

Box = tuple[int, int, int, int]  # left, top, right, bottom in the image's pixels
Detector = Literal["hog", "cnn"]
MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
}


class FaceModelMissing(RuntimeError):
    """dlib or the face-recognition-models package is not installed."""


@dataclass(frozen=True)
class Face:
    """One face found in an image: its box, the detector's confidence and the 5 landmarks
    (eye corners, nose base) in the image's pixels."""

    box: Box
    score: float
    landmarks: tuple[tuple[float, float], ...]

    @property
    def side(self) -> int:
        """The box's shorter side in px: how large the face is."""
        left, top, right, bottom = self.box
        return min(right - left, bottom - top)

    @property
    def eyes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The centres of the two eyes (each the mean of its two corner landmarks), left one first."""
        points = self.landmarks
        first = ((points[0][0] + points[1][0]) / 2, (points[0][1] + points[1][1]) / 2)
        second = ((points[2][0] + points[3][0]) / 2, (points[2][1] + points[3][1]) / 2)
        return (first, second) if first[0] <= second[0] else (second, first)


@dataclass(frozen=True)
class FaceAnalysis:
    """Every face of an image, the main one first (:func:`main_face_first`), and the descriptor of the
    main one (None without faces)."""

    faces: list[Face]
    descriptor: np.ndarray | None

    @property
    def main(self) -> Face | None:
        return self.faces[0] if self.faces else None


def _area(face: Face) -> int:
    left, top, right, bottom = face.box
    return (right - left) * (bottom - top)


def main_face_first(faces: Sequence[Face]) -> list[Face]:
    """``faces`` with the main face first, then the others from the largest.

    The main face is the largest of those the detector is sure of (score >= CONFIDENT_SCORE), or,
    when it is sure of none, the one it scores highest: a large false face in the background must
    not win over a real one by size alone.
    """
    if not faces:
        return []
    confident = [face for face in faces if face.score >= CONFIDENT_SCORE]
    main = max(confident, key=_area) if confident else max(faces, key=lambda face: face.score)
    return [main, *sorted((face for face in faces if face is not main), key=lambda face: -_area(face))]


def models_folder() -> Path:
    """Where face-recognition-models keeps its weights (found without importing the package, whose
    ``__init__`` imports the deprecated ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelMissing("the face-recognition-models package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def detection_copy(image: Image.Image) -> Image.Image:
    """``image`` with its long side brought down to at most DETECT_SIDE: first by a whole factor
    (box averaging, 2 ms for a 12 MP photo where a resampling filter takes 9), then the rest."""
    factor = max(1, max(image.size) // DETECT_SIDE)
    small = image.reduce(factor) if factor > 1 else image
    if max(small.size) > DETECT_SIDE:
        scale = DETECT_SIDE / max(small.size)
        small = small.resize((max(1, round(small.width * scale)), max(1, round(small.height * scale))),
                             Image.Resampling.BILINEAR)
    return small


class FaceModel:
    """dlib's detectors, landmark predictor and descriptor network, loaded once.

    dlib's objects are not documented as thread-safe, and the web process runs photos in a few
    threads at once: each call takes the model's lock (the work is CPU-bound anyway).
    """

    def __init__(self, folder: Path | None = None) -> None:
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - dlib is a dependency
            raise FaceModelMissing("dlib is not installed (pip install dlib-bin)") from exc
        self._dlib: Any = dlib
        self.folder = folder or models_folder()
        self._hog = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(self.folder / MODEL_FILES["landmarks"]))
        self._network = _descriptor_network(dlib, self.folder / MODEL_FILES["descriptor"])
        self._cnn: Any = None
        self._lock = threading.Lock()

    def _cnn_detector(self) -> Any:
        if self._cnn is None:  # 10x slower than HOG on a CPU; loaded only when asked for
            self._cnn = self._dlib.cnn_face_detection_model_v1(str(self.folder / MODEL_FILES["cnn"]))
        return self._cnn

    def detect(self, image: Image.Image, detector: Detector = "hog") -> list[Face]:
        """Faces of ``image`` (any mode), the main one first (:func:`main_face_first`), with landmarks,
        in the image's pixels."""
        rgb = _rgb(image)
        with self._lock:
            return [face for face, _ in self._detect(rgb, detector)]

    def _detect(self, rgb: Image.Image, detector: Detector) -> list[tuple[Face, _Region]]:
        """Faces with their regions and dlib landmark objects (the caller holds the lock)."""
        small = detection_copy(rgb)
        # One scale for both axes, from the long sides: a box must map back the same way in two crops
        # of one photo (1 px off moves the landmarks, and the descriptor by ~0.09).
        scale_x = scale_y = max(small.size) / max(rgb.size)
        # HOG looks at gradients: the grey copy finds the same faces ~15 % faster than colour.
        pixels = np.asarray(small if detector == "cnn" else small.convert("L"))
        found = self._find(pixels, 0, detector)
        if not found:  # small faces: look again at twice the size
            found = self._find(pixels, 1, detector)
        regions = {}
        faces = []
        for (left, top, right, bottom), score in found:
            box = (round(left / scale_x), round(top / scale_y), round(right / scale_x), round(bottom / scale_y))
            region = self._region(rgb, box)
            face = Face(box=box, score=score, landmarks=region.points())
            regions[id(face)] = region
            faces.append(face)
        return [(face, regions[id(face)]) for face in main_face_first(faces)]

    def _find(self, pixels: np.ndarray, upsample: int, detector: Detector) -> list[tuple[Box, float]]:
        if detector == "cnn":
            return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence))
                    for d in self._cnn_detector()(pixels, upsample)]
        rects, scores, _ = self._hog.run(pixels, upsample, MIN_DETECTION_SCORE)
        return [((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores, strict=True)]

    def _region(self, rgb: Image.Image, box: Box) -> _Region:
        """The pixels around ``box`` (one box side of margin each way) and the landmarks in them.

        Landmarks, chips and descriptors need only the face's surroundings: working on those instead
        of the whole photo spares a copy of all its pixels and dlib's pyramid over them (~15 ms of a
        12 MP photo's 100)."""
        left, top, right, bottom = box
        side = max(right - left, bottom - top)
        bounds = (max(0, left - side), max(0, top - side), min(rgb.width, right + side), min(rgb.height, bottom + side))
        pixels = np.asarray(rgb.crop(bounds))
        offset = (bounds[0], bounds[1])
        shape = self._landmarks(pixels, self._dlib.rectangle(left - offset[0], top - offset[1],
                                                              right - offset[0], bottom - offset[1]))
        return _Region(pixels=pixels, offset=offset, shape=shape)

    def descriptor(self, image: Image.Image, face: Face) -> np.ndarray:
        """The 128-D descriptor of ``face`` in ``image`` (computed on the aligned 150 px face chip)."""
        with self._lock:
            region = self._region(_rgb(image), face.box)
            return self._network(region)

    def aligned_crop(self, image: Image.Image, face: Face, size: int = CHIP_SIZE,
                     padding: float = CHIP_PADDING) -> Image.Image:
        """The face rotated upright and scaled so its eyes and nose land where dlib's chips put them."""
        with self._lock:
            region = self._region(_rgb(image), face.box)
            chip = self._dlib.get_face_chip(region.pixels, region.shape, size=size, padding=padding)
        return Image.fromarray(np.asarray(chip, dtype=np.uint8), "RGB")

    def analyse(self, image: Image.Image, detector: Detector = "hog") -> FaceAnalysis:
        """Every face of ``image`` and the descriptor of the main one: :meth:`detect` and
        :meth:`descriptor` in one pass (what the upload check and the scoring use)."""
        with self._lock:
            found = self._detect(_rgb(image), detector)
            if not found:
                return FaceAnalysis(faces=[], descriptor=None)
            vector = self._network(found[0][1])
        return FaceAnalysis(faces=[face for face, _ in found], descriptor=vector)


@dataclass(frozen=True)
class _Region:
    """A face's surroundings cut from a photo, where they were, and dlib's landmarks in them."""

    pixels: np.ndarray
    offset: tuple[int, int]
    shape: Any

    def points(self) -> tuple[tuple[float, float], ...]:
        """The landmarks in the photo's pixels."""
        return tuple((float(self.shape.part(i).x + self.offset[0]), float(self.shape.part(i).y + self.offset[1]))
                     for i in range(self.shape.num_parts))


def _descriptor_network(dlib: Any, path: Path) -> Callable[[_Region], np.ndarray]:
    """What turns a face's region into its 128-D descriptor: the network on numpy's BLAS, one thread,
    or dlib's own (the same numbers, ~9x the CPU) when the file is not the network face_network.py
    reads. bench/likeness.py times both."""
    try:
        network = FaceNetwork(path)
    except FaceNetworkError as exc:
        logger.warning("face descriptor runs on dlib's own network (slower): %s", exc)
        slow = dlib.face_recognition_model_v1(str(path))
        return lambda region: np.asarray(slow.compute_face_descriptor(region.pixels, region.shape), dtype=np.float64)
    blas = ThreadpoolController()

    def describe(region: _Region) -> np.ndarray:
        # The chip dlib's compute_face_descriptor cuts (150 px, padding 0.25), then the network.
        chip = np.asarray(dlib.get_face_chip(region.pixels, region.shape, size=CHIP_SIZE, padding=CHIP_PADDING))
        # One BLAS thread: the products are small, and OpenBLAS's second thread spins on a busy box
        # (bench/likeness.py, load average 3: 14-16 ms of CPU a face with one, 377-556 ms with two).
        with blas.limit(limits=1, user_api="blas"):
            return network.describe(chip[None])[0].astype(np.float64)

    return describe


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


@lru_cache(maxsize=1)
def face_model() -> FaceModel:
    """The process's face model, loaded on first use (~0.4 s of CPU, +54 MB resident).

    The web process loads it at its start (app.photos.faces.load_face_model)."""
    return FaceModel()


def distance(first: np.ndarray | Sequence[float], second: np.ndarray | Sequence[float]) -> float:
    """Euclidean distance between two descriptors: under :data:`MATCH_THRESHOLD` means the same person."""
    return float(np.linalg.norm(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)))


def match_distance(descriptor: np.ndarray | Sequence[float],
                   references: Sequence[np.ndarray | Sequence[float]]) -> float:
    """The mean distance from ``descriptor`` to each reference (the uploads): one number per picture."""
    if not references:
        raise ValueError("no reference descriptors to compare with")
    return float(np.mean([distance(descriptor, reference) for reference in references]))


MatchWords = Literal["strong match", "weak match", "not a match", "no face found"]


def match_words(value: float | None) -> MatchWords:
    """How a face-match distance reads to a person; None is a picture in which no face was found."""
    if value is None:
        return "no face found"
    if value < STRONG_MATCH:
        return "strong match"
    if value < MATCH_THRESHOLD:
        return "weak match"
    return "not a match"


def largest_group(descriptors: Sequence[np.ndarray | Sequence[float]],
                  threshold: float = MATCH_THRESHOLD) -> list[int]:
    """The indices of the largest set of faces that are all one person.

    Each face gathers the faces within ``threshold`` of it; the face with the most such neighbours
    (ties: the smaller total distance to them, then the earlier face) names the group. Anchoring on
    one face, rather than chaining neighbours, keeps two similar-looking people from merging through
    a photo in between.
    """
    count = len(descriptors)
    if count == 0:
        return []
    matrix = np.asarray([np.asarray(d, dtype=np.float64) for d in descriptors])
    distances = np.linalg.norm(matrix[:, None, :] - matrix[None, :, :], axis=2)
    best: tuple[int, float, int] | None = None
    for index in range(count):
        close = distances[index] < threshold
        key = (-int(close.sum()), float(distances[index][close].sum()), index)
        if best is None or key < best:
            best = key
    assert best is not None
    anchor = best[2]
    return [index for index in range(count) if distances[anchor][index] < threshold]
