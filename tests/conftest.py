"""Fixtures shared by the whole suite: the real-photo data folder and bad input files."""
from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real photos with ground truth)."""
    if not (SHARED_DATA / "coco128" / "instances.json").exists():
        pytest.fail(f"the development data folder is missing: expected {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco128_images(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "coco128" / "images").glob("*.jpg"))


@pytest.fixture
def bad_inputs(tmp_path: Path, coco128_images: list[Path]) -> dict[str, Path]:
    """One file of every kind discovery must skip with a reason, keyed by kind."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.jpg").write_bytes(b"")
    data = coco128_images[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    huge = folder / "huge.png"
    # A 1-bit image is tiny on disk yet has many pixels: the size check must refuse it unread.
    Image.new("1", (9000, 8000)).save(huge)
    return {p.stem: p for p in folder.iterdir()}


def limit_file_size(nbytes: int) -> None:
    """Make writes past ``nbytes`` of any file fail with EFBIG in this process and its children.

    A real refused write, like a full disk, without mounting a small file
    system (which needs privileges). SIGXFSZ would kill the process instead.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """:func:`limit_file_size` for the ``with`` block only."""
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    limit_file_size(nbytes)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def write_image(path: Path, array: np.ndarray, **save_args) -> Path:
    Image.fromarray(array).save(path, **save_args)
    return path


@pytest.fixture(scope="session")
def offline_backbone():
    """The offline default backbone (real ImageNet weights), on the CPU, loaded once."""
    from hassod.features import build_backbone

    return build_backbone("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def instance_scenes():
    """Synthetic instance-search set: 8 images, 6 objects pasted at random scales (hassod.synthetic)."""
    from hassod.synthetic import make_instance_scenes

    return make_instance_scenes(seed=0, n_objects=6, n_images=8)


@pytest.fixture
def instance_folder(tmp_path: Path, instance_scenes) -> tuple[Path, Path]:
    """(folder of the scenes as PNGs, path of their true regions as COCO json, outside the folder)."""
    from hassod.synthetic import save_scenes

    folder = tmp_path / "collection"
    truth = save_scenes(instance_scenes, folder, tmp_path / "truth.json")
    return folder, truth
