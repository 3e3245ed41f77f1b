"""A person's pictures scored by face against the uploads: the numbers, the order, run.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests import face_photos
from worker.engine.cli import _face_words, main
from worker.engine.faces import MATCH_THRESHOLD, STRONG_MATCH
from worker.engine.job import JobSpec, run_job
from worker.engine.likeness import face_distances, face_ranking, record_likeness, reference_descriptors, references_of
from worker.engine.models import BaseModel


def _save(images: list[Image.Image], folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{stem}-{index}.jpg"
        path.write_bytes(face_photos.jpeg(image))
        paths.append(path)
    return paths


def test_pictures_of_the_person_score_close_others_far_and_faceless_last(tmp_path: Path) -> None:
    hoppers = face_photos.variations(face_photos.hopper())
    uploads = _save(hoppers[:3], tmp_path / "uploads", "upload")
    references = reference_descriptors([*uploads, *_save([face_photos.cat()], tmp_path / "uploads", "cat")])
    assert len(references) == 3 and all(len(row) == 128 for row in references)  # the cat adds none
    generated = _save([face_photos.cat(), face_photos.collins(), hoppers[3]], tmp_path / "samples", "sample")
    distances = face_distances(generated, references)
    assert distances[0] is None
    assert distances[1] is not None and distances[1] > MATCH_THRESHOLD
    assert distances[2] is not None and distances[2] < STRONG_MATCH
    assert face_ranking(distances) == [2, 1, 0]
    assert face_ranking([None, 0.4, None, 0.4], fallback=[3, 2, 1, 0]) == [3, 1, 2, 0]
    assert face_distances(generated, []) == [None, None, None]
    assert _face_words(distances[2]).endswith("strong match") and _face_words(None) == "no face found"

    (tmp_path / "run.json").write_text(json.dumps({"complete": True}))
    record_likeness(tmp_path, [path.name for path in generated], distances)
    likeness = json.loads((tmp_path / "run.json").read_text())["likeness"]
    assert likeness["faces_found"] == 2 and likeness["images"][0] == {"file": "sample-0.jpg", "face_distance": None}


def test_a_person_job_keeps_the_upload_faces_and_scores_its_gallery(
    tiny_model: BaseModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = _save(face_photos.variations(face_photos.hopper())[:3], tmp_path / "photos", "me")
    spec = JobSpec(photos=photos, class_noun="woman", subject_kind="person", work_dir=tmp_path / "job",
                   bank_root=tmp_path / "bank", quality="fast", prior_images=0, prompts=["a photo of {subject}"],
                   images_per_prompt=2, sample_steps=1, batch_size=2, resolution=64,
                   train_overrides={"method": "lora", "steps": 1, "rank": 4, "checkpoint_every": 0, "preview_every": 0})
    result = run_job(spec, tiny_model)
    record = json.loads((result.run_dir / "run.json").read_text())
    assert len(references_of(record["run_info"])) == 3
    # The demo model paints noise: no face, so every picture says so and none is ranked by face.
    assert result.face_distances == [None, None]
    assert [entry["face_distance"] for entry in record["likeness"]["images"]] == [None, None]
    scores = json.loads((tmp_path / "job" / "samples" / "scores.json").read_text())
    assert [entry["face_distance"] for entry in scores["images"]] == [None, None]
    # `studio sample` on the run scores its pictures against the faces the run kept.
    assert main(["sample", "--run", str(tmp_path / "job"), "--prompt", "{subject}", "--images", "1", "--steps", "1",
                 "--out", str(tmp_path / "more"), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("(no face found)")
