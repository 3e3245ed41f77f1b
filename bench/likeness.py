"""Face-model benchmark: detection, same/different-person distances and accuracy at the threshold.

Runs worker/engine/faces.py (dlib's HOG detector, 5-point landmarks, ResNet descriptor) over a
labelled set and prints:

1. detection: faces found in the photos of people, and faces "found" in photos without one;
2. distances between photos of the same person and of different people (min, median, p95, max);
3. the accuracy of "same person when closer than T" over all pairs, for T = 0.5, 0.6 (the model's
   documented threshold, used by the studio) and 0.7, and of the duplicate rule (< 0.06);
4. how far a face's descriptor drifts as the face shrinks (what the upload check's minimum size
   rests on);
5. training crops: the Haar framing the engine used before against the landmark framing
   (worker/engine/photos.py), on every photo of a person set in a larger grey canvas (so no edge
   clamps the frame): faces found, and where the eyes land in the square (height and eye distance
   as fractions of the side; a stable framing has a small spread);
6. CPU per photo: detection, landmarks and descriptor;
7. the descriptor network alone on one face: dlib's own, and worker/engine/face_network.py's on
   numpy with one BLAS thread (what the studio runs) and with OpenBLAS's default threads.

The built-in set needs nothing downloaded: the real photographs that ship in installed packages
(Grace Hopper from matplotlib, Eileen Collins from scikit-image; both public domain), each turned
into photos of "the same person" by crops, flips, colour shifts, small rotations and JPEG
re-encoding; and scikit-image's photos without people (a cat, coffee, a rocket, coins...). Two
people are few: for a real measurement give a folder with one sub-folder of photos per person
(for example Labeled Faces in the Wild):

    python bench/likeness.py [--folder DIR] [--variations 12] [--detector hog|cnn]

Prints a table; the results go into docs/benchmarks.md by hand, with the machine and command.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.photos.faces import FACE_DUPLICATE_DISTANCE as DUPLICATE  # noqa: E402
from worker.engine.face_network import FaceNetwork  # noqa: E402
from worker.engine.faces import (  # noqa: E402
    CHIP_PADDING,
    CHIP_SIZE,
    CONFIDENT_SCORE,
    MATCH_THRESHOLD,
    MODEL_FILES,
    FaceModel,
    distance,
    face_model,
    models_folder,
)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def jpeg_again(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return open_rgb(buffer)  # type: ignore[arg-type]


def variations(image: Image.Image, count: int, seed: int) -> list[Image.Image]:
    """``count`` photos of one face: a random crop, flip, colour shift, rotation and JPEG quality each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        width, height = image.size
        left, top = int(rng.integers(0, width // 10)), int(rng.integers(0, height // 10))
        right, bottom = width - int(rng.integers(0, width // 10)), height - int(rng.integers(0, height // 10))
        picture = image.crop((left, top, right, bottom))
        if rng.random() < 0.5:
            picture = ImageOps.mirror(picture)
        gains = np.clip(np.arange(256)[None, :] * rng.uniform(0.85, 1.15, size=(3, 1)), 0, 255).astype(int)
        picture = picture.point([int(value) for value in gains.flatten()])
        picture = ImageEnhance.Contrast(picture).enhance(float(rng.uniform(0.8, 1.25)))
        picture = picture.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BICUBIC,
                                 fillcolor=(128, 128, 128))
        out.append(jpeg_again(picture, int(rng.integers(40, 95))))
    return out


def builtin_set(count: int) -> tuple[dict[str, list[Image.Image]], list[Image.Image]]:
    hopper = open_rgb(package_file("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))
    collins = open_rgb(package_file("skimage", "data/astronaut.png")).resize((768, 768), Image.Resampling.LANCZOS)
    people = {"Grace Hopper": [hopper, *variations(hopper, count, 1)],
              "Eileen Collins": [collins, *variations(collins, count, 2)]}
    no_faces = [open_rgb(package_file("skimage", f"data/{name}")) for name in
                ("chelsea.png", "coffee.png", "rocket.jpg", "coins.png", "horse.png", "hubble_deep_field.jpg",
                 "motorcycle_left.png", "retina.jpg", "brick.png", "grass.png")]
    return people, no_faces


def folder_set(folder: Path) -> tuple[dict[str, list[Image.Image]], list[Image.Image]]:
    people = {}
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = [open_rgb(p) for p in sorted(person.iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES]
        if photos:
            people[person.name] = photos
    return people, []


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    p5 = ordered[round(0.05 * (len(ordered) - 1))]
    return (f"n {len(values)}: min {ordered[0]:.3f}, p5 {p5:.3f}, median {statistics.median(ordered):.3f}, "
            f"p95 {p95:.3f}, max {ordered[-1]:.3f}")


def size_sweep(model: FaceModel, image: Image.Image) -> str:
    """Descriptor distance to the full-size face as the face shrinks to a given box side (px)."""
    full = model.detect(image)[0]
    reference = model.descriptor(image, full)
    cells = []
    for side in (40, 60, 80, 100, 140):
        scale = side / full.side
        small = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        found = model.detect(small)
        cells.append(f"{side} px: {distance(model.descriptor(small, found[0]), reference):.3f}" if found
                     else f"{side} px: not found")
    return ", ".join(cells)


def framing(people: dict[str, list[Image.Image]], model: FaceModel) -> list[tuple[str, str, str]]:
    """Haar framing against landmark framing: faces found, and the eyes' height and distance in the square."""
    from worker.engine import photos

    results: dict[str, tuple[int, list[float], list[float]]] = {}
    images = [image for group in people.values() for image in group]
    for method in ("Haar (before)", "landmarks (now)"):
        found, heights, spans = 0, [], []
        for image in images:
            canvas = Image.new("RGB", (image.width * 2, image.height * 2), (128, 128, 128))
            canvas.paste(image, (image.width // 2, image.height // 2))
            truth = model.detect(canvas)
            if not truth:
                continue
            (lx, ly), (rx, ry) = truth[0].eyes
            if method.startswith("Haar"):
                boxes = photos.detect_faces(canvas)
                if not boxes:
                    continue
                box = photos.face_crop_box(canvas.size, max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])))
            else:
                box = photos.landmark_crop_box(canvas.size, truth[0].eyes, truth[0].box)
            found += 1
            side = box[2] - box[0]
            heights.append(((ly + ry) / 2 - box[1]) / side)
            spans.append(float(np.hypot(rx - lx, ry - ly)) / side)
        results[method] = (found, heights, spans)
    rows = []
    for method, (found, heights, spans) in results.items():
        rows.append((f"training crop, {method}", f"{found} of {len(images)} framed; eyes at "
                     f"{statistics.mean(heights):.3f} ± {statistics.pstdev(heights):.3f} of the side from the top",
                     f"eye distance {statistics.mean(spans):.3f} ± {statistics.pstdev(spans):.3f} of the side"))
    return rows


def descriptor_cpu(model: FaceModel, image: Image.Image, rounds: int = 15) -> str:
    """CPU ms of the descriptor network on one face chip, interleaved so that the box's load falls on
    all alike: dlib's own network, and the numpy one with one BLAS thread and with OpenBLAS's default."""
    import dlib
    from threadpoolctl import ThreadpoolController

    chip = np.asarray(model.aligned_crop(image, model.detect(image)[0], size=CHIP_SIZE, padding=CHIP_PADDING))
    theirs = dlib.face_recognition_model_v1(str(models_folder() / MODEL_FILES["descriptor"]))
    ours = FaceNetwork(models_folder() / MODEL_FILES["descriptor"])
    blas = ThreadpoolController()

    def one_thread() -> None:
        with blas.limit(limits=1, user_api="blas"):
            ours.describe(chip[None])

    runs: dict[str, Callable[[], Any]] = {"dlib's network": lambda: theirs.compute_face_descriptor(chip),
                                          "numpy, 1 BLAS thread": one_thread,
                                          "numpy, default BLAS threads": lambda: ours.describe(chip[None])}
    spent = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.process_time()
            run()
            spent[name] += time.process_time() - started
    return ", ".join(f"{name} {1000 * seconds / rounds:.0f} ms" for name, seconds in spent.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="one sub-folder of photos per person")
    parser.add_argument("--variations", type=int, default=12, help="built-in set: photos made of each face")
    parser.add_argument("--detector", choices=["hog", "cnn"], default="hog")
    args = parser.parse_args()

    started = time.process_time()
    model = face_model()
    load_seconds = time.process_time() - started
    people, no_faces = folder_set(args.folder) if args.folder else builtin_set(args.variations)

    analyse_cpu: list[float] = []
    descriptors: dict[str, list[np.ndarray]] = {}
    photos = found = unsure_extra = 0
    for name, images in people.items():
        for image in images:
            photos += 1
            started = time.process_time()
            analysis = model.analyse(image, args.detector)
            analyse_cpu.append(time.process_time() - started)
            if analysis.descriptor is None:
                continue
            found += 1
            unsure_extra += sum(face.score < CONFIDENT_SCORE for face in analysis.faces[1:])
            descriptors.setdefault(name, []).append(analysis.descriptor)
    false_scores = [face.score for image in no_faces for face in model.detect(image, args.detector)]
    false_faces = len(false_scores)

    same = [distance(a, b) for rows in descriptors.values() for a, b in itertools.combinations(rows, 2)]
    different = [distance(a, b) for (_, first), (_, second) in itertools.combinations(descriptors.items(), 2)
                 for a in first for b in second]
    rows = [
        ("set", f"{len(people)} people, {photos} photos; {len(no_faces)} photos without a face",
         str(args.folder) if args.folder else "built-in (matplotlib, scikit-image)"),
        ("detection (" + args.detector + ")", f"{found} of {photos} faces found ({100 * found / max(1, photos):.1f} %)",
         f"{false_faces} faces in the {len(no_faces)} photos without one, "
         f"{sum(s >= CONFIDENT_SCORE for s in false_scores)} of them sure (score >= {CONFIDENT_SCORE}); "
         f"{unsure_extra} unsure extra faces beside the people's"),
        ("same person", spread(same), ""),
        ("different people", spread(different), ""),
    ]
    for threshold in (0.5, MATCH_THRESHOLD, 0.7):
        correct = sum(d < threshold for d in same) + sum(d >= threshold for d in different)
        total = len(same) + len(different)
        rows.append((f"accuracy at {threshold:.2f}", f"{100 * correct / max(1, total):.2f} % of {total} pairs",
                     f"same missed {sum(d >= threshold for d in same)}, "
                     f"different taken as same {sum(d < threshold for d in different)}"))
    rows.append((f"duplicate rule (< {DUPLICATE})", f"{sum(d < DUPLICATE for d in same)} same-person pairs",
                 f"{sum(d < DUPLICATE for d in different)} different-person pairs"))
    first_person = next(iter(people.values()))[0]
    rows.append(("descriptor drift by face size", size_sweep(model, first_person), "distance to the full-size face"))
    rows.extend(framing(people, model))
    rows.append(("CPU per photo", f"detection, landmarks and descriptor: median "
                 f"{1000 * statistics.median(analyse_cpu):.0f} ms, max {1000 * max(analyse_cpu):.0f} ms",
                 f"model load {load_seconds:.2f} s"))
    rows.append(("descriptor network, one face", descriptor_cpu(model, first_person), "CPU, mean of 15 rounds"))
    width = max(len(row[0]) for row in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value}" + (f"  ({note})" if note else ""))


if __name__ == "__main__":
    main()
