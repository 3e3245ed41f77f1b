"""How sharp a photo is where it is sharpest: the one blur measure of the upload check and the trainer.

A photo is scaled down so its shorter side is :data:`SHARPNESS_SIDE` px (a 12 MP phone photo and a
small one then compare), cut into :data:`TILE` px tiles, and each tile scores the variance of its second
derivative, across and along. The photo's sharpness is the score of its sharpest
:data:`SHARPEST_SHARE` of tiles in the weaker of the two directions (so a photo smeared in one
direction by motion scores low).

Why tiles and not the variance of the Laplacian over the whole picture: that older measure averages
the subject with everything around it, so a sharp dog against a plain wall, or a portrait with a
soft background, scored like a blurred photo and was refused. What the trainer needs is a subject in
focus somewhere; a picture in which no part is sharp is the one to refuse. ``bench/blur.py`` measures
both measures on a labelled set of real photographs (docs/benchmarks.md).

Only Pillow and numpy: the web process imports this at upload time without torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SHARPNESS_SIDE = 256  # shorter side of the grayscale copy the measure is taken on
TILE = 32  # px of that copy: 8 tiles across the shorter side
SHARPEST_SHARE = 0.05  # the sharpest 5 % of tiles: a subject filling a twentieth of the frame is enough
# Below this the sharpest part of the picture has no fine detail. Chosen on bench/blur.py's labelled
# set (sharp photos, sharp subjects on plain walls and soft backgrounds, against Gaussian and motion
# blur); see docs/benchmarks.md for the accuracy it measured.
BLUR_THRESHOLD = 55.0


def sharpness(image: Image.Image) -> float:
    """Second-derivative variance of the sharpest :data:`SHARPEST_SHARE` of the picture's tiles."""
    gray = image.convert("L")
    # Only ever scaled down: scaling a small photo up would blur it by itself.
    scale = min(1.0, SHARPNESS_SIDE / min(gray.size))
    size = (max(TILE + 2, round(gray.width * scale)), max(TILE + 2, round(gray.height * scale)))
    pixels = np.asarray(gray.resize(size, Image.Resampling.BOX), dtype=np.float32)
    centre = pixels[1:-1, 1:-1]
    across = pixels[1:-1, :-2] + pixels[1:-1, 2:] - 2.0 * centre
    along = pixels[:-2, 1:-1] + pixels[2:, 1:-1] - 2.0 * centre
    # Each direction on its own tiles: one straight edge is sharp in a single direction, but a photo
    # in focus has sharp tiles in both; motion smears every tile along one.
    return min(float(np.quantile(_tile_variances(second), 1.0 - SHARPEST_SHARE)) for second in (across, along))


def _tile_variances(values: np.ndarray) -> np.ndarray:
    rows, columns = values.shape[0] // TILE, values.shape[1] // TILE
    tiles = values[: rows * TILE, : columns * TILE].reshape(rows, TILE, columns, TILE)
    return tiles.var(axis=(1, 3)).ravel()
