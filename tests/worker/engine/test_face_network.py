"""dlib's face descriptor network read from its file and run on numpy: the same numbers as dlib's
own on real faces, and a clear refusal of a file it does not know."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import dlib
import numpy as np
import pytest

from tests import face_photos
from worker.engine import faces
from worker.engine.face_network import FaceNetwork, FaceNetworkError
from worker.engine.faces import MODEL_FILES, face_model, models_folder


@lru_cache(maxsize=1)
def dlib_network() -> Any:
    return dlib.face_recognition_model_v1(str(models_folder() / MODEL_FILES["descriptor"]))


def chip_of(image: Any) -> np.ndarray:
    model = face_model()
    aligned = model.aligned_crop(image, model.detect(image)[0], size=faces.CHIP_SIZE, padding=faces.CHIP_PADDING)
    return np.asarray(aligned)


def test_the_descriptors_are_dlibs_own_on_real_faces() -> None:
    images = [face_photos.hopper(), face_photos.collins(), face_photos.variations(face_photos.collins())[0]]
    chips = np.stack([chip_of(image) for image in images])
    ours = FaceNetwork(models_folder() / MODEL_FILES["descriptor"]).describe(chips)
    theirs = np.array([dlib_network().compute_face_descriptor(chip) for chip in chips])
    assert ours.shape == (3, faces.DESCRIPTOR_SIZE)
    assert np.abs(ours - theirs).max() < 1e-5  # float rounding; the match threshold is 0.6
    # The face model's descriptor of a photo is the one dlib computes from the photo and the landmarks
    # (the descriptors stored before this network was run on numpy stay comparable).
    portrait = face_photos.hopper()
    found = face_model().detect(portrait)[0]
    shape = dlib.full_object_detection(dlib.rectangle(*found.box),
                                       [dlib.point(round(x), round(y)) for x, y in found.landmarks])
    from_photo = np.asarray(dlib_network().compute_face_descriptor(np.asarray(portrait), shape))
    assert np.abs(face_model().descriptor(portrait, found) - from_photo).max() < 1e-5


def test_chips_of_the_wrong_size_are_refused() -> None:
    network = FaceNetwork(models_folder() / MODEL_FILES["descriptor"])
    with pytest.raises(ValueError, match="N x 150 x 150 x 3"):
        network.describe(np.zeros((1, 120, 120, 3), dtype=np.uint8))


def test_another_models_file_is_refused_by_name() -> None:
    with pytest.raises(FaceNetworkError, match="shape_predictor_5_face_landmarks.dat: no input_rgb_image_sized"):
        FaceNetwork(models_folder() / MODEL_FILES["landmarks"])


@pytest.mark.parametrize(("change", "message"), [
    (lambda data: data.replace(b"\x0amax_pool_2", b"\x0amax_poox_2", 1), "not the layers of dlib's face descriptor"),
    (lambda data: data[:len(data) // 2], "unreadable at byte"),
])
def test_a_network_laid_out_otherwise_or_cut_short_is_refused(tmp_path: Path, change: Any, message: str) -> None:
    altered = tmp_path / "descriptor.dat"
    altered.write_bytes(change((models_folder() / MODEL_FILES["descriptor"]).read_bytes()))
    with pytest.raises(FaceNetworkError, match=message):
        FaceNetwork(altered)


def test_the_face_model_falls_back_to_dlibs_network_when_the_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> FaceNetwork:
        raise FaceNetworkError(f"{path.name}: refused for the test")

    monkeypatch.setattr(faces, "FaceNetwork", refuse)
    model = faces.FaceModel()
    portrait = face_photos.hopper()
    expected = dlib_network().compute_face_descriptor(chip_of(portrait))
    assert np.abs(model.descriptor(portrait, model.detect(portrait)[0]) - np.asarray(expected)).max() < 1e-5
