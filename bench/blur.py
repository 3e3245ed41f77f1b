"""The upload blur check measured on a labelled set of real photographs, old measure against new.

The photographs are the ones scikit-image ships (``skimage.data``: the astronaut Eileen Collins, the
cameraman, Chelsea the cat, coffee, coins, a rocket, brick, grass, gravel, the Hubble deep field,
a stained tissue slide, the moon, a retina: public domain, CC0 or "no known copyright restrictions"
per each loader's docstring in skimage.data). From
each the benchmark makes the cases people upload:

- sharp (label: keep): the photo; the photo as a sharp subject on a plain wall, filling 35 %, 20 %
  and 10 % of the frame; the photo's centre sharp in front of a soft background (a phone's portrait mode);
- blurred (label: refuse): Gaussian blur of 1 % of the shorter side (5 px at 512 px) of the photo,
  of the wall picture and of the portrait-mode picture; horizontal motion of 2.5 % of the shorter
  side; and skimage's real motion-blurred photograph (``clock_motion.png``);
- soft (no label, shown only): Gaussian blur of 0.5 % and motion of 1.25 %.

For each measure it prints the scores per case, the accuracy at the measure's threshold, the
threshold with the fewest mistakes (a sharp photo refused counts twice, a blurred one kept once), and
a two-fold check of that choice: chosen on half of the photographs (by name), tested on the other.

    python bench/blur.py        (needs scikit-image: pip install scikit-image)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.sharpness import BLUR_THRESHOLD, sharpness  # noqa: E402

PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "brick", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina",
)
OLD_THRESHOLD = 40.0  # the measure and threshold before this benchmark (variance of the Laplacian)
KEEP, REFUSE, SOFT = "keep", "refuse", "soft"


def global_laplacian_variance(image: Image.Image) -> float:
    """The old measure: variance of the 4-neighbour Laplacian over the whole picture at 256 px."""
    gray = image.convert("L")
    scale = 256 / min(gray.size)
    size = (round(gray.width * scale), round(gray.height * scale))
    pixels = np.asarray(gray.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR), np.float32)
    laplacian = pixels[:-2, 1:-1] + pixels[2:, 1:-1] + pixels[1:-1, :-2] + pixels[1:-1, 2:] - 4 * pixels[1:-1, 1:-1]
    return float(laplacian.var())


def load(name: str) -> Image.Image:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.dtype != np.uint8:
        pixels = (pixels * 255).astype(np.uint8) if pixels.max() <= 1 else pixels.astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def on_plain_wall(photo: Image.Image, share: float, seed: int = 0) -> Image.Image:
    """The photo as a sharp subject in the middle of a 1200×900 painted wall with a soft light gradient."""
    width, height = 1200, 900
    rng = np.random.default_rng(seed)
    wall = np.linspace(150, 190, width)[None, :, None] * np.ones((height, 1, 3)) * np.array([1.0, 0.95, 0.85])
    wall += rng.normal(0, 1.5, wall.shape)  # a camera's faint sensor noise
    canvas = Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))
    subject = photo.copy()
    side = (width * height * share) ** 0.5
    subject.thumbnail((round(side * photo.width / min(photo.size)), round(side * photo.height / min(photo.size))))
    canvas.paste(subject, ((width - subject.width) // 2, (height - subject.height) // 2))
    return canvas


def portrait_mode(photo: Image.Image) -> Image.Image:
    """The middle of the photo sharp, the rest blurred as a wide aperture would."""
    soft = photo.filter(ImageFilter.GaussianBlur(min(photo.size) / 40))
    box = (photo.width * 3 // 10, photo.height // 4, photo.width * 7 // 10, photo.height * 3 // 4)
    soft.paste(photo.crop(box), box[:2])
    return soft


def gaussian(photo: Image.Image, share: float) -> Image.Image:
    return photo.filter(ImageFilter.GaussianBlur(min(photo.size) * share))


def motion(photo: Image.Image, share: float) -> Image.Image:
    """Horizontal motion blur: a moving average over ``share`` of the shorter side."""
    length = max(3, round(min(photo.size) * share))
    pixels = np.asarray(photo, np.float32)
    padded = np.pad(pixels, ((0, 0), (length // 2, length - 1 - length // 2), (0, 0)), mode="edge")
    sums = np.cumsum(np.pad(padded, ((0, 0), (1, 0), (0, 0))), axis=1)
    smeared = (sums[:, length:] - sums[:, :-length]) / length
    return Image.fromarray(np.clip(smeared, 0, 255).astype(np.uint8))


def cases(photo: Image.Image) -> list[tuple[str, str, Image.Image]]:
    wall = on_plain_wall(photo, 0.35)
    soft_background = portrait_mode(photo)
    return [
        ("sharp photo", KEEP, photo),
        ("on a plain wall, 35 %", KEEP, wall),
        ("on a plain wall, 20 %", KEEP, on_plain_wall(photo, 0.20)),
        ("on a plain wall, 10 %", KEEP, on_plain_wall(photo, 0.10)),
        ("soft background", KEEP, soft_background),
        ("Gaussian 1 %", REFUSE, gaussian(photo, 0.01)),
        ("wall, Gaussian 1 %", REFUSE, gaussian(wall, 0.01)),
        ("soft background, Gaussian 1 %", REFUSE, gaussian(soft_background, 0.01)),
        ("motion 2.5 %", REFUSE, motion(photo, 0.025)),
        ("Gaussian 0.5 %", SOFT, gaussian(photo, 0.005)),
        ("motion 1.25 %", SOFT, motion(photo, 0.0125)),
    ]


Scored = list[tuple[str, str, str, float]]  # photo, case, label, score


def score_all(measure: Callable[[Image.Image], float]) -> Scored:
    import skimage.data

    rows: Scored = []
    for name in PHOTOS:
        for case, label, image in cases(load(name)):
            rows.append((name, case, label, measure(image)))
    clock = Image.open(Path(skimage.data.__file__).parent / "clock_motion.png").convert("RGB")
    rows.append(("clock_motion", "real motion blur", REFUSE, measure(clock)))
    return rows


def accuracy(rows: Scored, threshold: float) -> tuple[float, list[str], list[str]]:
    labelled = [row for row in rows if row[2] != SOFT]
    right = sum((score >= threshold) == (label == KEEP) for _, _, label, score in labelled)
    refused = [f"{name}: {case}" for name, case, label, score in labelled if label == KEEP and score < threshold]
    passed = [f"{name}: {case}" for name, case, label, score in labelled if label == REFUSE and score >= threshold]
    return right / len(labelled), refused, passed


REFUSAL_COST = 2  # a sharp photo refused costs a person a photo and a retry; a blurred one kept, some quality


def errors(rows: Scored, threshold: float) -> int:
    """Weighted mistakes at ``threshold``: each sharp photo refused counts REFUSAL_COST, each blurred one kept 1."""
    _, refused, passed = accuracy(rows, threshold)
    return REFUSAL_COST * len(refused) + len(passed)


def best_threshold(rows: Scored) -> float:
    """The threshold with the fewest weighted mistakes; among ties the lowest."""
    candidates = sorted({score for *_, score in rows})
    return min(candidates, key=lambda threshold: (errors(rows, threshold), threshold))


def two_fold(rows: Scored) -> float:
    """Accuracy with the threshold chosen on one half of the photographs and tested on the other."""
    halves = (set(PHOTOS[0::2]), set(PHOTOS[1::2]) | {"clock_motion"})
    right = total = 0
    for train, test in (halves, halves[::-1]):
        threshold = best_threshold([row for row in rows if row[0] in train])
        tested = [row for row in rows if row[0] in test and row[2] != SOFT]
        right += round(accuracy(tested, threshold)[0] * len(tested))
        total += len(tested)
    return right / total


def main() -> None:
    measures = (
        ("whole-picture Laplacian (old)", global_laplacian_variance, OLD_THRESHOLD),
        ("sharpest 5 % of tiles (new)", sharpness, BLUR_THRESHOLD),
    )
    scored = [(title, score_all(measure), threshold) for title, measure, threshold in measures]
    case_names = [case for case, _, _ in cases(Image.new("RGB", (64, 64)))] + ["real motion blur"]
    print("Median score per case over the photographs (min–max)")
    print(f"| case | label | {' | '.join(title for title, _, _ in scored)} |")
    print("|---|---|" + "---:|" * len(scored))
    for case in case_names:
        cells = []
        label = ""
        for _, rows, _ in scored:
            values = [score for _, row_case, row_label, score in rows if row_case == case]
            label = next(row_label for _, row_case, row_label, _ in rows if row_case == case)
            cells.append(f"{np.median(values):.0f} ({min(values):.0f}–{max(values):.0f})")
        print(f"| {case} | {label} | {' | '.join(cells)} |")
    print()
    print("| measure | threshold | accuracy | two-fold accuracy | best threshold | sharp refused | blurred passed |")
    print("|---|---:|---:|---:|---:|---|---|")
    for title, rows, threshold in scored:
        right, refused, passed = accuracy(rows, threshold)
        labelled = sum(1 for row in rows if row[2] != SOFT)
        print(
            f"| {title} | {threshold:.0f} | {right:.1%} of {labelled} | {two_fold(rows):.1%} | "
            f"{best_threshold(rows):.1f} | {len(refused)}: {', '.join(refused) or '-'} | "
            f"{len(passed)}: {', '.join(passed) or '-'} |"
        )


if __name__ == "__main__":
    main()
