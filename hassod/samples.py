"""Sample photos that exist on any machine with the project installed.

scikit-image ships a few real photographs inside its package, among them a
stereo pair of one motorcycle (two views of the same object, which makes a
natural search example). The demo copies them into a folder of the user's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import skimage.data

SAMPLE_FILES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
)


def write_samples(folder: str | Path) -> list[Path]:
    """Copy the bundled sample photos into ``folder`` (created); returns their paths, sorted."""
    source = Path(skimage.data.__file__).parent
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLE_FILES:
        destination = target / name
        if not destination.exists():
            shutil.copyfile(source / name, destination)
        written.append(destination)
    return sorted(written)
