"""Real photographs of two people, read from installed packages at test time (nothing is downloaded
or copied into the repository), and variations of them that stand for more photos of one person.

- Grace Hopper: matplotlib's ``mpl-data/sample_data/grace_hopper.jpg`` (US Navy photograph, public domain).
- Eileen Collins: scikit-image's ``data/astronaut.png`` (NASA, public domain).
- A cat: scikit-image's ``data/chelsea.png`` (CC0, Stefan van der Walt).

The files are located without importing matplotlib or scikit-image (both are test dependencies).
"""

from __future__ import annotations

import importlib.util
import io
from functools import cache
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is a test dependency"
    return Path(next(iter(spec.submodule_search_locations))) / relative


@cache
def _open(package: str, relative: str) -> Image.Image:
    with Image.open(_package_file(package, relative)) as image:
        return image.convert("RGB")


def hopper() -> Image.Image:
    """Grace Hopper, 512×600, one face of ~216 px."""
    return _open("matplotlib", "mpl-data/sample_data/grace_hopper.jpg").copy()


def collins() -> Image.Image:
    """Eileen Collins, scaled 1.5× to 768 px so her face (~130 px) passes the size check."""
    image = _open("skimage", "data/astronaut.png")
    return image.resize((768, 768), Image.Resampling.LANCZOS)


def cat() -> Image.Image:
    """Chelsea the cat, 451×300: a photo without a human face."""
    return _open("skimage", "data/chelsea.png").copy()


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _recolour(image: Image.Image, factors: tuple[float, float, float]) -> Image.Image:
    bands = [band.point(lambda value, k=k: min(255, int(value * k))) for band, k in zip(image.split(), factors,
                                                                                            strict=True)]
    return Image.merge("RGB", bands)


def variations(image: Image.Image) -> list[Image.Image]:
    """Five different-looking photos of the one face: flipped, turned, recoloured, cropped, re-encoded.

    Each is far enough from the others for the upload checks to take it as another shot (pixel hash
    and face descriptor both), and they stay the same person under the model's threshold.
    """
    grey = (128, 128, 128)
    return [
        ImageOps.mirror(image),
        image.rotate(8, resample=Image.Resampling.BICUBIC, fillcolor=grey),
        _recolour(ImageOps.mirror(image.rotate(-8, resample=Image.Resampling.BICUBIC, fillcolor=grey)),
                  (1.15, 1.0, 0.85)),
        ImageEnhance.Contrast(image.crop((0, 0, image.width, image.height * 9 // 10)).rotate(
            -12, resample=Image.Resampling.BICUBIC, fillcolor=grey)).enhance(1.3),
        Image.open(io.BytesIO(jpeg(image.convert("L").convert("RGB"), 40))).convert("RGB"),
    ]


def side_by_side(first: Image.Image, second: Image.Image) -> Image.Image:
    """A group photo: the two pictures pasted next to each other at the same height."""
    height = min(first.height, second.height)
    scaled = [image.resize((round(image.width * height / image.height), height)) for image in (first, second)]
    group = Image.new("RGB", (scaled[0].width + scaled[1].width, height))
    group.paste(scaled[0], (0, 0))
    group.paste(scaled[1], (scaled[0].width, 0))
    return group


def person_uploads(count: int = 3) -> list[tuple[str, bytes]]:
    """``count`` (at most 5) photos of Grace Hopper as a person's studio uploads."""
    return [(f"hopper-{index}.jpg", jpeg(image)) for index, image in enumerate(variations(hopper())[:count])]


def same_shot_again(image: Image.Image) -> Image.Image:
    """The same photo cropped on the side: other pixels for the hash, the very same face."""
    return image.crop((0, 0, image.width - 60, image.height))


def small_face(background: Image.Image) -> Image.Image:
    """Grace Hopper shrunk to a face of ~85 px, pasted on ``background`` (a sharp picture of 640×480)."""
    picture = background.copy()
    shrunk = hopper().resize((205, 240), Image.Resampling.LANCZOS)
    picture.paste(shrunk, (220, 120))
    return picture
