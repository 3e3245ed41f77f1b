"""Tests for DINO / CLIP-I / CLIP-T scoring and ranking (random small encoders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.worker.engine.conftest import make_subject_photo
from worker.engine.errors import EngineInputError
from worker.engine.evaluate import Scorer, Scores, default_scorer, mean_scores, preprocess, rank, strip_identifier


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer.random(seed=0)


def _noise_image(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_preprocess_shape_and_normalization() -> None:
    batch = preprocess([Image.new("RGB", (80, 40), (255, 0, 0)), Image.new("RGB", (30, 60))], 32,
                       (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[0, 0], torch.ones(32, 32)) and torch.allclose(batch[0, 1], -torch.ones(32, 32))
    assert torch.allclose(batch[1], -torch.ones(3, 32, 32))


def test_identical_images_score_one(scorer: Scorer, tmp_path: Path) -> None:
    photo = make_subject_photo(tmp_path / "a.jpg", seed=1)
    (scores,) = scorer.score([photo], [photo], ["a photo of dog"])
    assert scores.dino == pytest.approx(1.0, abs=1e-4)
    assert scores.clip_i == pytest.approx(1.0, abs=1e-4)
    assert -1.0 <= scores.clip_t <= 1.0


def test_scores_are_aligned_bounded_and_deterministic(scorer: Scorer, tmp_path: Path) -> None:
    references = [make_subject_photo(tmp_path / f"r{i}.jpg", seed=i) for i in range(3)]
    generated = [references[0], _noise_image(tmp_path / "noise.png", 5), references[2]]
    prompts = ["a photo of dog", "a photo of dog in the snow", "a dog"]
    first = scorer.score(generated, references, prompts)
    again = Scorer.random(seed=0).score(generated, references, prompts)
    assert len(first) == 3 and first == again
    for scores in first:
        for value in (scores.dino, scores.clip_i, scores.clip_t):
            assert -1.0 - 1e-5 <= value <= 1.0 + 1e-5
    # an image that is one of the references is closer to them than noise is
    assert first[0].dino > first[1].dino


def test_clip_t_depends_on_the_prompt(scorer: Scorer, tmp_path: Path) -> None:
    photo = make_subject_photo(tmp_path / "a.jpg", seed=1)
    (one,) = scorer.score([photo], [photo], ["a photo of dog"])
    (other,) = scorer.score([photo], [photo], ["an oil painting of a castle at night"])
    assert one.clip_t != other.clip_t and one.dino == other.dino


def test_score_checks_its_input(scorer: Scorer, tmp_path: Path) -> None:
    photo = make_subject_photo(tmp_path / "a.jpg", seed=1)
    assert scorer.score([], [photo], []) == []
    with pytest.raises(EngineInputError, match="2 prompts for 1"):
        scorer.score([photo], [photo], ["a", "b"])
    with pytest.raises(EngineInputError, match="no reference"):
        scorer.score([photo], [], ["a"])
    broken = tmp_path / "broken.png"
    broken.write_text("x")
    with pytest.raises(EngineInputError, match="unreadable"):
        scorer.score([broken], [photo], ["a"])


def test_rank_orders_by_combined_score_deterministically() -> None:
    scores = [Scores(0.2, 0.5, 0.3), Scores(0.9, 0.8, 0.2), Scores(0.2, 0.5, 0.3), Scores(0.5, 0.1, 0.9)]
    assert rank(scores) == [1, 3, 0, 2]
    assert rank(scores) == rank(list(scores))
    assert rank([]) == []


def test_mean_scores_and_strip_identifier() -> None:
    mean = mean_scores([Scores(0.2, 0.4, 0.1), Scores(0.4, 0.6, 0.3)])
    assert mean is not None and mean.dino == pytest.approx(0.3) and mean.clip_t == pytest.approx(0.2)
    assert mean_scores([]) is None
    assert strip_identifier("a photo of xqz dog, on a skateboard", "xqz") == "a photo of dog, on a skateboard"


def test_from_pretrained_loads_saved_encoders_and_scores_the_same(scorer: Scorer, tmp_path: Path) -> None:
    scorer.dino.save_pretrained(tmp_path / "dino")
    scorer.clip.save_pretrained(tmp_path / "clip")
    scorer.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = Scorer.from_pretrained(str(tmp_path / "dino"), str(tmp_path / "clip"))
    photo = make_subject_photo(tmp_path / "a.jpg", seed=1)
    other = make_subject_photo(tmp_path / "b.jpg", seed=2)
    expected = scorer.score([other], [photo], ["a photo of dog"])[0]
    actual = loaded.score([other], [photo], ["a photo of dog"])[0]
    assert actual.dino == pytest.approx(expected.dino, abs=1e-5)
    assert actual.clip_i == pytest.approx(expected.clip_i, abs=1e-5)
    assert actual.clip_t == pytest.approx(expected.clip_t, abs=1e-5)


def test_from_pretrained_names_what_it_could_not_load(tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="could not load the scoring models"):
        Scorer.from_pretrained(str(tmp_path / "missing-dino"), str(tmp_path / "missing-clip"))


def test_the_default_scorer_is_none_with_a_warning_when_the_encoders_cannot_be_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(cls: type[Scorer], *args: object, **kwargs: object) -> Scorer:
        raise EngineInputError("could not load the scoring models: offline")

    monkeypatch.setattr(Scorer, "from_pretrained", classmethod(unavailable))
    default_scorer.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert default_scorer() is None
    finally:
        default_scorer.cache_clear()
    assert "will not be scored" in caplog.text
