"""Tests for ``studio train`` / ``studio sample`` (worker.engine.cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from worker.engine.cli import main


def _train_args(photos: Path, out: Path, bank: Path, *extra: str) -> list[str]:
    return [
        "train", "--photos", str(photos), "--class-noun", "dog", "--base-model", "tiny", "--out", str(out),
        "--bank", str(bank), "--method", "lora", "--steps", "2", "--rank", "4", "--prior-images", "2",
        "--prior-steps", "2", "--sample-steps", "2", "--images-per-prompt", "1", "--quality", "fast",
        "--device", "cpu", *extra,
    ]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error the command printed: exactly one line starting with "studio <command>: error:"."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line, got: {lines!r}"
    assert lines[0].startswith(("studio train: error: ", "studio sample: error: ", "studio: error: "))
    return lines[0]


def test_train_then_sample_end_to_end(subject_photos: list[Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job"
    status = main(_train_args(subject_photos[0].parent, out, tmp_path / "bank",
                              "--prompt", "a photo of {subject} on the beach", "--prompt", "in the snow"))
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "class priors: 2 generated, 0 reused" in captured.out
    assert "priors" in captured.err and "training" in captured.err and "sampling" in captured.err  # tqdm bars
    samples = sorted((out / "samples").glob("sample-*.png"))
    assert len(samples) == 2
    info = json.loads((out / "run" / "run.json").read_text())["run_info"]
    assert info["class_noun"] == "dog" and info["base_model"]["spec"] == "tiny"

    more = tmp_path / "more"
    status = main(["sample", "--run", str(out), "--prompt", "{subject} on the moon", "--images", "2",
                   "--seed", "9", "--steps", "2", "--out", str(more), "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    written = sorted(more.glob("sample-*.png"))
    assert len(written) == 2
    with Image.open(written[1]) as image:
        record = json.loads(image.text["studio"])  # type: ignore[attr-defined]
    assert record["prompt"] == f"{info['identifier']} dog on the moon" and record["seed"] == 10
    assert f"seed 9  {info['identifier']} dog on the moon" in captured.out


def test_no_photos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_train_args(empty, tmp_path / "out", tmp_path / "bank")) == 2
    assert _error_line(capsys).startswith(f"studio train: error: no photos in {empty}")


def test_missing_photo_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train_args(tmp_path / "nope", tmp_path / "out", tmp_path / "bank")) == 2
    assert "photo folder" in _error_line(capsys)


def test_unreadable_photos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "one.jpg").write_text("not a photo")
    (folder / "two.png").write_bytes(b"\x89PNG broken")
    assert main(_train_args(folder, tmp_path / "out", tmp_path / "bank")) == 2
    line = _error_line(capsys)
    assert "no readable photo among 2" in line and "one.jpg: unreadable" in line and "two.png: unreadable" in line


def test_unknown_base_model(subject_photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _train_args(subject_photos[0].parent, tmp_path / "out", tmp_path / "bank")
    args[args.index("tiny")] = "no-such-model"
    assert main(args) == 2
    assert "unknown base model 'no-such-model'" in _error_line(capsys)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--resolution", "60", "argument --resolution: 60 is not a multiple of 8"),
        ("--steps", "0", "argument --steps: 0 must be greater than 0"),
        ("--steps", "-3", "argument --steps: -3 must be greater than 0"),
        ("--steps", "many", "argument --steps: 'many' is not a whole number"),
        ("--lr", "0", "argument --lr: 0.0 must be greater than 0"),
        ("--method", "dora", "argument --method: invalid choice"),
    ],
)
def test_bad_options(subject_photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     option: str, value: str, message: str) -> None:
    assert main([*_train_args(subject_photos[0].parent, tmp_path / "out", tmp_path / "bank"), option, value]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_required_option_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--class-noun", "dog"]) == 2
    assert "required" in _error_line(capsys)
    assert main(["paint"]) == 2
    assert "invalid choice" in _error_line(capsys)


def test_sample_needs_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a finished training run" in _error_line(capsys)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    assert "--class-noun" in capsys.readouterr().out
