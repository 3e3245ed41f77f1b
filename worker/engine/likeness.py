"""Face likeness of a person's generated pictures: how close each face is to the uploads' faces.

The score of a picture is the mean distance from its main face's descriptor to the descriptor
of each upload (``worker.engine.faces``): under 0.6 (the model's documented threshold) the face is
the person's, under 0.5 clearly so; None when the picture shows no face. Smaller is better, so
pictures rank by it ascending, those without a face last.

The uploads' descriptors are kept in the run's ``run.json`` (``run_info.faces.references``), so
pictures sampled later from the trained run ("generate more", ``studio sample``) are scored the
same way after the photos themselves are deleted; they are deleted with the run. The scores of a
job's gallery are written to ``run.json`` too (``likeness``).

Torch-free: dlib, numpy and Pillow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from worker.engine.faces import MATCH_THRESHOLD, STRONG_MATCH, face_model, match_distance

RUN_FILE = "run.json"  # the same file as worker.engine.weights.RUN_FILE (that module imports torch)
DECIMALS = 5  # descriptors are kept to 5 decimals: far below the distances that matter (0.01)

Descriptor = list[float]


def _main_face_descriptor(path: Path) -> Descriptor | None:
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    descriptor = face_model().analyse(image).descriptor
    return None if descriptor is None else [round(float(value), DECIMALS) for value in descriptor]


def reference_descriptors(photos: Sequence[Path]) -> list[Descriptor]:
    """The descriptor of the main face of each photo that shows one (unreadable photos are skipped:
    the photo checks name them)."""
    references = []
    for path in photos:
        try:
            descriptor = _main_face_descriptor(path)
        except (OSError, ValueError):
            continue
        if descriptor is not None:
            references.append(descriptor)
    return references


def face_distances(images: Sequence[Path], references: Sequence[Descriptor]) -> list[float | None]:
    """Each image's main face's mean distance to ``references``; None for an image without a face, and for every
    image when there are no references."""
    if not references:
        return [None] * len(images)
    distances: list[float | None] = []
    for path in images:
        descriptor = _main_face_descriptor(path)
        distances.append(None if descriptor is None else round(match_distance(descriptor, references), DECIMALS))
    return distances


def face_ranking(distances: Sequence[float | None], fallback: Sequence[int] = ()) -> list[int]:
    """Indices from the closest face to the farthest, pictures without a face last; ties (and the
    faceless) keep the order of ``fallback`` (e.g. the DINO/CLIP ranking), else generation order."""
    place = {index: position for position, index in enumerate(fallback)}
    return sorted(range(len(distances)), key=lambda index: (
        distances[index] is None, distances[index] or 0.0, place.get(index, len(place) + index)))


def references_of(run_info: dict[str, Any]) -> list[Descriptor]:
    """The uploads' descriptors a run recorded (empty for a pet's run, or one made before faces)."""
    faces = run_info.get("faces") or {}
    return [list(map(float, row)) for row in faces.get("references") or []]


def faces_info(references: Sequence[Descriptor]) -> dict[str, Any]:
    """What ``run.json`` records about the uploads' faces."""
    return {"references": [list(row) for row in references], "threshold": MATCH_THRESHOLD,
            "strong_match": STRONG_MATCH}


def record_likeness(run_dir: Path, files: Sequence[str], distances: Sequence[float | None]) -> None:
    """Write the gallery's face distances into ``run_dir/run.json`` (``likeness``), atomically."""
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text())
    found = [value for value in distances if value is not None]
    record["likeness"] = {
        "measure": "mean face-descriptor distance to the uploads (smaller is closer; same person under "
                   f"{MATCH_THRESHOLD})",
        "images": [{"file": name, "face_distance": value} for name, value in zip(files, distances, strict=True)],
        "faces_found": len(found),
        "mean_face_distance": round(sum(found) / len(found), DECIMALS) if found else None,
    }
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)
