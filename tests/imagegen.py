"""Makes small real JPEG image folders for tests (no downloads, no files in the repo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, counts: dict[str, int], size: int = 48, seed: int = 0) -> Path:
    """root/<class>/<class>_<i>.jpg, each class with its own colour cast so a model can learn it."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        cast = np.array([255 * (k % 2), 128, 255 * ((k + 1) % 2)], np.float32)
        for i in range(n):
            pixels = 0.5 * rng.integers(0, 256, size=(size, size + i % 3, 3)) + 0.5 * cast
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}_{i}.jpg", quality=90)
    return root
