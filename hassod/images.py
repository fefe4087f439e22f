"""Reading images from a collection: listing files and decoding them safely.

Every reader of pixels in the project goes through :func:`load_rgb`, so that
EXIF orientation, unusual modes and hostile files are handled in one place.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

if TYPE_CHECKING:
    import torch

# Refuse images above this many pixels before decoding them: a 30000 x 30000
# photo would need 2.7 GB as RGB and far more in the CRF.
DEFAULT_MAX_PIXELS = 64_000_000

# We do our own size check, so PIL's decompression-bomb guard would only get in
# the way of giving a clear message.
Image.MAX_IMAGE_PIXELS = None


class ImageError(UserError):
    """An input file that cannot be used as an image; ``str()`` is the reason."""


def list_images(inputs: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike | None] = ()) -> list[Path]:
    """Every candidate file under ``inputs`` (files or folders, recursive), sorted.

    Hidden files and folders are ignored. Files are not filtered by extension:
    a non-image file is reported as skipped by the reader rather than silently
    dropped here. ``exclude``: files and folders the command itself writes
    (output and progress files, an overlay folder, an index directory), left
    out even inside an input folder, so that a re-run does not take its own
    output for images; ``None`` entries (an option not given) are ignored.
    """
    excluded = tuple(os.path.abspath(p) for p in exclude if p is not None)
    inside = tuple(p + os.sep for p in excluded)

    def kept(path: str) -> bool:
        absolute = os.path.abspath(path)
        return absolute not in excluded and not absolute.startswith(inside)

    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".") and kept(os.path.join(root, d))]
                found.update(Path(root, f) for f in files if not f.startswith(".") and kept(os.path.join(root, f)))
        elif path.is_file():
            found.add(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(found)


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into an (H, W, 3) uint8 RGB array, upright per its EXIF tag.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are
    converted. Raises :class:`ImageError` with a one-line reason for files that
    are not images, are truncated or corrupt, or exceed ``max_pixels``.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image too large: {width}x{height} = {width * height / 1e6:.3g} MP "
                    f"exceeds the limit of {max_pixels / 1e6:.3g} MP (raise --max-pixels)"
                )
            if width == 0 or height == 0:
                raise ImageError("image has zero size")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # a copy otherwise, even when upright (docs/benchmarks.md)
            return to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"unreadable image: {exc}") from None


def to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as (H, W, 3) uint8 RGB: 16-bit and float grayscale scaled by their range,
    transparency composited on white (what every stage sees, and what the server shows)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High-bit-depth grayscale: PIL's own conversion to 8 bit clips at 255,
        # so scale by the actual range instead.
        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        gray = np.round(scaled).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3) uint8, bilinear with antialiasing; aspect not kept."""
    return resize_image(image, (size, size))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 → (*size, 3) uint8 (size = (height, width) pixels), bilinear with antialiasing
    (torch's, in float32, rounded once at the end), so colours stay true on downscaling.

    Resamplers that round to uint8 between their two passes (PIL, torch on
    uint8) differ by one level on some pixels and gave a lower box AR@100
    (docs/benchmarks.md, "Images").
    """
    import torch  # here: every command line imports this module, most never resize

    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).permute(2, 0, 1)[None]
    return resample(pixels, size)[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def resample(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, H, W) uint8 → (1, C, *size) float32 (0..255, not rounded), on the same device:
    torch's antialiased bilinear (align_corners=False).

    The filter is separable, so the rows are resampled a strip at a time and
    then the columns: the float32 copies are of one strip and of the narrow
    intermediate, not of the whole photo (768 MB at 64 MP), and it is faster
    on a CPU (docs/benchmarks.md, "Images"). The result is the same as one 2-D
    call (tested).
    """
    import torch
    import torch.nn.functional as F

    height, width = pixels.shape[-2:]
    step = max(1, _RESIZE_STRIP_ELEMENTS // (pixels.shape[1] * width))
    strips = [
        F.interpolate(pixels[:, :, top:top + step].float(), size=(min(step, height - top), size[1]),
                      mode="bilinear", antialias=True, align_corners=False)
        for top in range(0, height, step)
    ]
    return F.interpolate(torch.cat(strips, dim=2), size=size, mode="bilinear", antialias=True, align_corners=False)


# Elements of the float32 strips resample converts at a time (16 MB).
_RESIZE_STRIP_ELEMENTS = 1 << 22
